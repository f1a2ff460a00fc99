"""dvc.yaml's code deps cover the code each stage runs, so a code change re-runs the stages it affects.

The closure is taken over ``import`` statements (at any depth in a module) of the project's own
modules. Package ``__init__`` files are not followed: they only re-export, and following them
would make every stage depend on every module of its package. A few imports are left out on
purpose, named below with the reason; anything else a stage imports must be one of its deps.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.project_copy import PROJECT_ROOT

PROJECT_PACKAGES = ("pipeline", "stages")
# Imported, but unable to change any stage's outputs.
NEVER_A_DEP = {"pipeline/progress.py"}  # progress bars only
# Imported by these stages, but not run by them: a change there must not re-run them (training above all).
NOT_RUN_BY_STAGE = {
    # params.py imports the model and calibrator names and the calibrators' settings types only to validate
    # params.yaml;
    # stages/common.py imports build_model for the stages after train.
    # stages/common.py imports the graph capture and equalization for the stages after train.
    "download": {"pipeline/models.py", "pipeline/quant/calibrators.py", "pipeline/quant/ranges.py",
                 "pipeline/quant/settings.py", "pipeline/graph/capture.py", "pipeline/graph/nodes.py", "pipeline/graph/rewrite.py", "pipeline/graph/run.py", "pipeline/quant/equalization.py"},
    # check-params only validates; stages/common.py imports pipeline.io for the other stages' checkpoints.
    "check-params": {"pipeline/io.py", "pipeline/models.py", "pipeline/quant/calibrators.py",
                     "pipeline/quant/ranges.py", "pipeline/graph/capture.py", "pipeline/graph/nodes.py", "pipeline/graph/rewrite.py", "pipeline/graph/run.py", "pipeline/quant/equalization.py"},
    # train captures the untrained model only to refuse, before training, one the quantizer cannot take.
    "train": {"pipeline/quant/calibrators.py", "pipeline/quant/ranges.py", "pipeline/quant/settings.py",
              "pipeline/graph/capture.py", "pipeline/graph/nodes.py", "pipeline/graph/rewrite.py", "pipeline/graph/run.py", "pipeline/quant/equalization.py"},
    # pipeline.export.artifacts imports them for export_agreement, which the evaluate stage runs.
    "export": {"pipeline/evaluation.py", "pipeline/train.py", "pipeline/quant/equalization.py"},
}


def _module_file(dotted: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[Path]:
    """Project modules ``path`` imports: ``from a.b import c`` is a/b/c.py if that exists, else a/b.py."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if _module_file(name) else node.module for name in names]
        else:
            continue
        found |= {_module_file(name) for name in names if name.split(".")[0] in PROJECT_PACKAGES}
    return {module for module in found if module is not None and module.name != "__init__.py"}


def import_closure(start: Path) -> set[str]:
    """``start`` and every project module it imports, directly or not, as paths relative to the project."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imported_modules(module))
    return {module.relative_to(PROJECT_ROOT).as_posix() for module in seen}


STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    definition = STAGES[stage]
    entry = _module_file(definition["cmd"].split()[-1])
    deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in definition["deps"]}
    # stages/__init__.py runs before every stage (it pins the CPU kernels), though no import names it.
    runs = import_closure(entry) | {"stages/__init__.py"}
    missing = runs - deps - NEVER_A_DEP - NOT_RUN_BY_STAGE.get(stage, set())
    assert not missing, f"dvc.yaml stage {stage!r} runs code it does not list in deps: {sorted(missing)}"


def test_import_closure_follows_imports_through_modules_not_packages():
    closure = import_closure(PROJECT_ROOT / "stages" / "profile.py")
    # stages.profile -> pipeline.profile -> pipeline.data (sample_indices picks the calibration images)
    assert {"stages/profile.py", "pipeline/profile.py", "pipeline/data.py", "pipeline/quant/observers.py"} <= closure
    assert not any(path.endswith("__init__.py") for path in closure)
