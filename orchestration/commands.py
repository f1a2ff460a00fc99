"""dvc and git in subprocesses: each in a session of its own, its output spooled to files and logged line by line.

A command runs detached so that it survives its flow run: a cancelled, killed or crashed flow run never takes
DVC down mid-write (see ``run_detached``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from orchestration import OFFLINE_ENV

STDERR_TAIL_LINES = 30  # enough for a Python traceback plus DVC's own error line
OUTPUT_POLL_SECONDS = 0.1  # how often a running command's spooled output is read into the log


class CommandFailed(RuntimeError):
    """A DVC command exited non-zero; the message ends with its stderr tail."""


@dataclass(frozen=True)
class Finished:
    """A streamed command's exit status, its stdout lines and the last lines of its stderr."""

    returncode: int
    stdout: list[str]
    stderr_tail: list[str]


def stage_env() -> dict[str, str]:
    """Environment for DVC subprocesses: this venv first on PATH, offline settings, unbuffered Python."""
    env = dict(os.environ)
    # Stage commands run whatever `python` is first on PATH: it must be this venv's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name, value in OFFLINE_ENV.items():
        env.setdefault(name, value)
    # A piped Python stage block-buffers its stdout; unbuffered, its lines reach the log as they happen.
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Spool:
    """A temporary file a child process writes and this one reads, line by line, as it grows.

    A file, not a pipe: a pipe dies with its reader, and a DVC writing to a dead pipe dies too
    (SIGPIPE, or a BrokenPipeError at its next line of output), mid-stage, perhaps mid-way through
    dvc.lock. A file outlives this process; its name is removed at once, so nothing is left behind.
    """

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="dvc-output-", suffix=".log")
        self.writer = os.fdopen(fd, "wb")
        self._reader = open(name, "rb")  # its own file offset, independent of the writer's
        os.unlink(name)
        self._partial = b""

    def new_lines(self, final: bool = False) -> list[str]:
        """The complete lines written since the last call; with ``final``, an unterminated last line too."""
        data = self._partial + self._reader.read()
        *lines, self._partial = data.split(b"\n")
        if final and self._partial:
            lines, self._partial = [*lines, self._partial], b""
        return [line.decode(errors="replace").rstrip() for line in lines]

    def close(self) -> None:
        self.writer.close()
        self._reader.close()


def run_detached(args: list[str], cwd: Path, on_stdout: Callable[[str], None],
                 on_stderr: Callable[[str], None]) -> int:
    """Run a command in a session of its own with its output spooled to files; hand each line to a callback.

    The command survives this process: a cancelled, killed or crashed flow run never takes DVC down
    mid-write (no signal to its process group reaches it, and it never writes to a dead pipe).
    No timeout, for the same reason: a stage finishes or fails on its own.
    """
    out, err = _Spool(), _Spool()
    try:
        with subprocess.Popen(args, cwd=cwd, env=stage_env(), stdin=subprocess.DEVNULL, stdout=out.writer,
                              stderr=err.writer, start_new_session=True) as process:
            while True:
                done = process.poll() is not None
                for line in out.new_lines(final=done):
                    on_stdout(line)
                for line in err.new_lines(final=done):
                    on_stderr(line)
                if done:
                    return process.returncode
                time.sleep(OUTPUT_POLL_SECONDS)
    finally:
        out.close()
        err.close()


def stream(args: list[str], cwd: Path) -> Finished:
    """Run a command detached (see ``run_detached``), logging stdout and stderr line by line as they arrive."""
    logger = get_run_logger()
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    stdout: list[str] = []
    logger.info("$ %s", " ".join(args))

    def log_stdout(line: str) -> None:
        stdout.append(line)
        if line.strip():
            logger.info(line)

    def log_stderr(line: str) -> None:
        if line.strip():
            stderr_tail.append(line)
            logger.info(line)

    returncode = run_detached(args, cwd, log_stdout, log_stderr)
    return Finished(returncode, stdout, list(stderr_tail))


def capture(args: list[str], cwd: Path) -> str:
    """Run a short DVC query (detached too: even a read-only query takes DVC's rwlock) and return its stdout;
    a failure raises with its stderr."""
    stdout: list[str] = []
    stderr: list[str] = []
    returncode = run_detached(args, cwd, stdout.append, stderr.append)
    if returncode != 0:
        raise CommandFailed(f"{' '.join(args)} failed (exit {returncode}):\n" + "\n".join(stderr).strip())
    return "".join(f"{line}\n" for line in stdout)


def failure(args: list[str], finished: Finished) -> CommandFailed:
    """The error for a failed streamed command, carrying its stderr tail."""
    tail = "\n".join(finished.stderr_tail) or "(no stderr)"
    return CommandFailed(f"{' '.join(args)} failed (exit {finished.returncode}); last stderr lines:\n{tail}")


def git(args: list[str], project: Path) -> str:
    """A git query's stdout, stripped; a failure raises with its stderr."""
    return capture(["git", *args], project).strip()
