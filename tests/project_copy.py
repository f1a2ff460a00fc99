"""Copy this project's tracked files into a fresh temporary git repo, for tests that run DVC for real.

Only files git knows about (tracked, or untracked but not ignored) travel, so
``.venv`` (gigabytes) and ``data/`` outputs never do.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.data import CLASS_NAMES

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_files() -> list[str]:
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return [name for name in listing.split("\0") if name and (PROJECT_ROOT / name).is_file()]


def tool_env() -> dict[str, str]:
    """Environment for DVC subprocesses: this venv first on PATH, offline settings on."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", GIT_AUTHOR_NAME="test",
               GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with ``tool_env``; with ``check``, a failure raises with its output."""
    result = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def copy_project(destination: Path) -> Path:
    """Copy the project into ``destination`` and make it a git repo with one commit."""
    for name in project_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, target)
    run(["git", "init", "--quiet", "--initial-branch=main"], destination)
    run(["git", "add", "--all"], destination)
    run(["git", "commit", "--quiet", "-m", "project copy"], destination)
    return destination


def run_graph_stage(project: Path) -> None:
    """Run the graph stage in ``project`` (on its data/model.pt and params.yaml): the float graph file every stage after
    train reads."""
    from stages import graph as graph_stage

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        graph_stage.main()


def write_image_folder(root: Path, classes: list[str], per_class: dict[str, int], seed: int = 0) -> Path:
    """Write a tiny train|test/<class>/<n>.png dataset; each class has its own mean colour, so it is learnable."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                base = np.array([(37 * label) % 256, (91 * label) % 256, (151 * label) % 256])
                pixels = np.clip(base + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return root


def set_params(project: Path, updates: dict[str, dict]) -> None:
    """Change keys of params.yaml, section by section."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in updates.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


CLASSES = list(CLASS_NAMES)  # the download stage accepts exactly CIFAR-10's ten class folders
# Params that make a whole pipeline run take seconds on the tiny dataset (8 train, 3 test images per class).
TINY_PARAMS = {"train": {"epochs": 1, "batch_size": 16}, "profile": {"num_samples": 40, "batch_size": 40},
               "sensitivity": {"num_samples": 40}}


def tiny_project_copy(root: Path) -> Path:
    """A git copy of the project under ``root`` whose params point at a tiny image-folder dataset."""
    dataset = write_image_folder(root / "tiny-cifar", CLASSES, {"train": 8, "test": 3})
    project = copy_project(root / "project")
    set_params(project, {"download": {"source": str(dataset)}, **TINY_PARAMS})
    return project


ALL_STAGES = {"check-params", "download", "train", "graph", "profile", "sensitivity", "quantize-weights",
              "quantize-biases", "export", "evaluate", "plot"}


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` ran, from its output."""
    return set(re.findall(r"Running stage '([\w-]+)'", output))
