"""The README's Python example runs as written, on a tiny dataset."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.data import CifarArrays, save_arrays

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_example_runs_on_tiny_data(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), np.arange(count, dtype=np.int64) % 10

    train_images, train_labels = split(64)
    test_images, test_labels = split(20)
    save_arrays(
        CifarArrays(train_images, train_labels, test_images, test_labels, tuple(f"c{i}" for i in range(10))),
        tmp_path / "data/dataset.npz",
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"fp32 accuracy \d+\.\d\d%", printed)
    assert re.search(r"full int8 accuracy \d+\.\d\d%", printed)
    assert "conv1 int8 weights (6, 3, 5, 5)" in printed
