import os
import stat

import pytest
import torch

from pipeline.io import atomic_path, load_checkpoint, save_checkpoint, write_json


def test_atomic_outputs_get_the_usual_file_mode(tmp_path):
    write_json(tmp_path / "out.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_the_same_checkpoint_saves_to_the_same_bytes(tmp_path):
    # DVC tracks outputs by md5: a retrain with the same weights must not look like a change.
    checkpoint = {"model": "net", "state_dict": {"w": torch.arange(6.0).view(2, 3)}, "mean": [0.5]}
    save_checkpoint(tmp_path / "a.pt", checkpoint)
    save_checkpoint(tmp_path / "b" / "model.pt", checkpoint)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["state_dict"]["w"], checkpoint["state_dict"]["w"])


def test_json_with_nan_is_an_error_and_writes_nothing(tmp_path):
    # A diverged run once wrote {"loss": NaN}: not JSON, and DVC cannot read it as a metric.
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(tmp_path / "metrics.json", {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from pipeline.arrays import CifarArrays, save_arrays

images = np.zeros((2000, 32, 32, 3), dtype=np.uint8)  # 6 MB: the npz is half written when we die
import zipfile
original = zipfile.ZipFile.open
def open_then_die(self, name, mode="r", **kwargs):
    handle = original(self, name, mode, **kwargs)
    if mode == "w" and name.startswith("test_images"):
        os.kill(os.getpid(), signal.SIGKILL)
    return handle
zipfile.ZipFile.open = open_then_die
labels = np.zeros(2000, dtype=np.int64)
save_arrays(CifarArrays(images, labels, images, labels, ("a",)), __import__("pathlib").Path(sys.argv[1]))
"""


def test_a_writer_killed_with_sigkill_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    import signal
    import subprocess
    import sys

    import numpy as np

    from pipeline.arrays import CifarArrays, save_arrays
    from tests.project_copy import PROJECT_ROOT

    target = tmp_path / "dataset.npz"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=PROJECT_ROOT)
    assert killed.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".dataset.npz.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 1_000_000 and not target.exists()

    images, labels = np.ones((3, 32, 32, 3), dtype=np.uint8), np.zeros(3, dtype=np.int64)
    save_arrays(CifarArrays(images, labels, images, labels, ("a",)), target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset.npz"]


def test_a_temporary_of_a_live_writer_is_left_alone(tmp_path):
    live = tmp_path / f".out.json.{os.getpid()}.abc.tmp"  # this process: alive
    live.write_text("being written")
    old_format = tmp_path / ".out.json.k3x9a.tmp"  # no process id: from an older version, stale
    old_format.write_text("stale")
    other_file = tmp_path / ".other.json.1.abc.tmp"  # another target's temporary: not ours to judge
    other_file.write_text("x")
    write_json(tmp_path / "out.json", {"a": 1})
    assert live.exists() and other_file.exists() and not old_format.exists()
