"""Stand-ins for several machines on this one: a Prefect server on loopback and process workers, each in an
empty directory of its own, every process in a session of its own so that it can be stopped with its children.

Everything ``LocalPool`` starts it stops on exit, workers before the server, with bounded waits.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from tests.project_copy import tool_env

PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_START_SECONDS = 180  # a loaded 2-core machine takes 10-60 s to import the server and migrate its database
STOP_GRACE_SECONDS = 20  # for a polite SIGTERM before SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_session(process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to a process's whole session (it leads one), SIGKILL after ``grace`` seconds, then reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait(timeout=grace)


def processes_under(root: Path) -> list[int]:
    """Ids of the processes whose working directory is ``root`` or below it: everything a stand-in machine runs."""
    root = root.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:  # gone, or not ours to read
                continue
            if cwd == root or root in cwd.parents:
                found.append(int(entry.name))
    return found


def kill_machine(root: Path, grace: float = STOP_GRACE_SECONDS) -> list[int]:
    """Stop every process of a stand-in machine as a shutdown does: SIGTERM to all, SIGKILL to what is left after
    ``grace`` seconds. Returns the ids signalled."""
    signalled = processes_under(root)
    for pid in signalled:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return signalled


class LocalPool:
    """A Prefect server on 127.0.0.1 and process workers of one work pool, each worker in its own directory."""

    def __init__(self, root: Path, pool: str) -> None:
        self.root = root
        self.pool = pool
        self.api_url = f"http://127.0.0.1:{free_port()}/api"
        self.workers: dict[str, Path] = {}
        self._stack = ExitStack()

    def env(self, home: Path) -> dict[str, str]:
        """Environment of a process that talks to this server, with its own Prefect home (profiles, settings)."""
        home.mkdir(parents=True, exist_ok=True)
        return {**tool_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}

    def start(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        """Start a command in a session of its own, output to ``<root>/<name>.log``; stopped when the pool closes."""
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed by the exit stack
        self._stack.callback(log.close)
        process = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self._stack.callback(stop_session, process)
        return process

    def __enter__(self) -> LocalPool:
        self._stack.__enter__()
        server_home = self.root / "server-home"
        port = self.api_url.split(":")[-1].split("/")[0]
        server = self.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui"],
                            self.root, self.env(server_home))
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no healthy Prefect server at {self.api_url}:\n{self.log('server')}")
                time.sleep(0.5)
        self.prefect(["work-pool", "create", self.pool, "--type", "process"], self.root)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Each stand-in machine first, everything on it: the worker, its flow runs, and the DVC they run
        # detached in sessions of their own. The exit stack unwinds in reverse, so these go before the
        # worker's own stop (then a no-op) and the server.
        for directory in self.workers.values():
            self._stack.callback(kill_machine, directory, 5)
        self._stack.__exit__(*exc_info)

    def log(self, name: str) -> str:
        """The tail of a started command's output."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no log)"

    def prefect(self, args: list[str], cwd: Path, timeout: float = 300) -> str:
        """Run a prefect CLI command against this server; a failure raises with its output."""
        result = subprocess.run([PREFECT, *args], cwd=cwd, env=self.env(self.root / "cli-home"), capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def add_worker(self, name: str) -> Path:
        """Start a worker of the pool, one run at a time, in an empty directory of its own; returns the directory."""
        directory = self.root / name
        (directory / "tmp").mkdir(parents=True)
        # TMPDIR: the process worker runs each flow run in a temporary directory, so its clones land here.
        env = {**self.env(directory / "prefect-home"), "TMPDIR": str(directory / "tmp"),
               "PREFECT_WORKER_QUERY_SECONDS": "2"}  # picks a run up in seconds, not Prefect's 10
        self.start(name, [PREFECT, "worker", "start", "--pool", self.pool, "--type", "process", "--name", name,
                          "--limit", "1"], directory, env)
        self.workers[name] = directory
        return directory
