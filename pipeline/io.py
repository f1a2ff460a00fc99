"""I/O at the edges: atomic writes, JSON, checkpoints.

Every artifact is written to a temporary file in the destination folder and
renamed into place, so an interrupted stage never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name carries the writer's process id, ``.<name>.<pid>.<random>.tmp``, so that a
    later write of the same file removes what a killed writer left (a SIGKILL runs no cleanup).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary files of ``target`` whose writing process is gone.

    A temporary whose name holds no process id (an older name format) is stale too.
    """
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if not (pid.isdigit() and _process_alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


HASH_CHUNK_BYTES = 1 << 20  # read a file to hash a MiB at a time


def file_hash(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest of a file's bytes by ``algorithm`` (a hashlib name), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically; NaN or infinity is a ValueError (JSON has neither)."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Save a checkpoint dict (state_dict plus plain metadata), atomically; equal checkpoints give equal bytes."""
    # A file object, not the path: torch.save names the archive's root folder after a path
    # (here the random temporary name), so equal checkpoints would differ in bytes and md5.
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(checkpoint, file)


class UnreadableCheckpointError(ValueError):
    """A file torch.load cannot read without running code: truncated, foreign, or a pickle that would run code."""


def load_checkpoint(path: str | os.PathLike, writer: str = "train") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``).

    A file that cannot be loaded so is an UnreadableCheckpointError naming it, in one line: torch's own
    message for a refused pickle tells the user to retry with ``weights_only=False``, which would run its code.
    ``writer`` names the stage that writes the file, to rerun.
    """
    try:
        with warnings.catch_warnings():
            # A foreign pickle's protocol draws a UserWarning before the refusal; this pipeline's files never do.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing or unreadable: the OS's message names the file
    except pickle.UnpicklingError as error:  # torch's weights-only unpickler refused what the file holds
        detail = "; ".join(line.strip().rstrip(".") for line in str(error).splitlines()
                           if line.strip() and "weights_only" not in line)  # what torch refused, not its advice
        raise UnreadableCheckpointError(
            f"{os.fspath(path)}: refused: it holds Python objects other than tensors and plain data, which could run "
            f"code when loaded{f' ({detail})' if detail else ''}; rerun the {writer} stage to rewrite it"
        ) from None
    except Exception as error:  # a truncated or foreign file fails in many ways (zip reader, unpickler, EOF)
        first_sentence = str(error).split(". ")[0].strip()  # torch's zip reader goes on with generic advice
        cause = f"{type(error).__name__}: {first_sentence}" if first_sentence else type(error).__name__
        raise UnreadableCheckpointError(
            f"{os.fspath(path)}: not a PyTorch checkpoint, or a truncated or corrupted one ({cause}); "
            f"rerun the {writer} stage to rewrite it"
        ) from None
