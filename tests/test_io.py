import os
import stat

import pytest

from pipeline.io import atomic_path, write_json


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
