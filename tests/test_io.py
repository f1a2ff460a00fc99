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
