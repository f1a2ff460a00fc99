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


ACTIVATE = ". .venv/bin/activate"
NEEDS_THE_VENV = ("dvc", "python", "prefect", "pytest")  # commands whose stages or imports need the venv's packages


def readme_shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)


def test_every_readme_shell_block_activates_the_venv_before_a_command_that_needs_it():
    """`.venv/bin/dvc ...` from a fresh shell runs its stages with the system python (no torch): the
    README activates the venv in each block that needs it, so every block works as pasted."""
    offenders = []
    for block in readme_shell_blocks():
        activated = False
        for line in block.splitlines():
            command = line.strip()
            activated |= command.startswith(ACTIVATE)
            if command.startswith(".venv/bin/") or (command.split(" ", 1)[0] in NEEDS_THE_VENV and not activated):
                offenders.append(command)
    assert readme_shell_blocks() and offenders == []


def test_a_stage_run_by_a_python_without_the_project_packages_says_how_to_fix_it():
    import subprocess
    import sys

    # -S: no site-packages, as a system python without the project's packages.
    result = subprocess.run([sys.executable, "-S", "-m", "stages.check_params"], cwd=README.parent,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "lacks torch, numpy, ruamel.yaml: the project's venv is not first on PATH. Activate it first" in result.stderr


def test_ci_uses_the_readmes_offline_step_word_for_word():
    offline_step = next(line for block in readme_shell_blocks() for line in block.splitlines()
                        if line.startswith("sed -i") and "source:" in line)
    for script in (".ci/run", ".ci/e2e-mirror.sh"):
        assert offline_step in (README.parent / script).read_text().splitlines(), script


def test_the_readme_speaks_of_the_project_alone_with_the_metric_names_it_writes():
    import json

    text = README.read_text()
    # No design notes or issues outside the repository: a newcomer has neither.
    assert "DESIGN.md" not in text and "STYLE.md" not in text
    assert not re.search(r"\bthe issue\b", text, re.IGNORECASE)
    # Every `section.key` of data/metrics.json the README names is a key the evaluate stage writes.
    metrics = json.loads((README.parent / "data/metrics.json").read_text())
    named = set(re.findall(r"`(accuracy|mismatches|size_bytes|agreement)\.(\w+)`", text))
    assert named, "the README names no metrics.json key"
    assert {f"{section}.{key}" for section, key in named if key not in metrics[section]} == set()
    accuracy_keys = json.loads((README.parent / "data/accuracy.json").read_text())
    header = next(line for line in text.splitlines() if line.startswith("Path ") and "c_mismatches" in line)
    assert header.split()[1:] == sorted(accuracy_keys)
