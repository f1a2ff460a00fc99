"""dvc.yaml's code deps are exactly the code each stage runs: a code change re-runs the stages it affects, no other.

The closure is taken over ``import`` statements (at any depth in a module) of the project's own modules,
both ways: every module a stage imports is one of its deps, and every code dep is imported. Package
``__init__`` files other than ``stages/__init__.py`` are left out: Python runs them on import, but they
hold a docstring and nothing else (checked below), so no change to them can change an output.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.project_copy import PROJECT_ROOT

PROJECT_PACKAGES = ("pipeline", "stages")
USER_MODELS = "models"  # the folder of users' model files, which pipeline/models.py loads


# Files a module reads as package data: a stage that runs the module depends on them too.
MODULE_DATA = {"pipeline/export/c_ops.py": {"pipeline/export/c_kernels"}}


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


def code_deps(definition: dict) -> set[str]:
    """The stage's deps that are project code: files of the project's packages."""
    deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in definition["deps"]}
    return {dep for dep in deps if dep.split("/")[0] in PROJECT_PACKAGES}


def runs(definition: dict) -> set[str]:
    """The project modules the stage's command imports; stages/__init__.py runs before every stage (it pins the
    CPU kernels), though no import names it."""
    closure = import_closure(_module_file(definition["cmd"].split()[-1])) | {"stages/__init__.py"}
    return closure | {data for module in closure for data in MODULE_DATA.get(module, ())}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    missing = runs(STAGES[stage]) - code_deps(STAGES[stage])
    assert not missing, f"dvc.yaml stage {stage!r} runs code it does not list in deps: {sorted(missing)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_code_dep_of_a_stage_is_code_it_runs(stage):
    extra = code_deps(STAGES[stage]) - runs(STAGES[stage])
    assert not extra, f"dvc.yaml stage {stage!r} lists code it never imports: {sorted(extra)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_that_builds_models_depends_on_the_users_model_files(stage):
    deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in STAGES[stage]["deps"]}
    assert ("pipeline/models.py" in runs(STAGES[stage])) == (USER_MODELS in deps), stage


def test_package_init_files_hold_only_a_docstring():
    for init in sorted(PROJECT_ROOT.glob("pipeline/**/__init__.py")):
        body = ast.parse(init.read_text()).body
        docstring_only = len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        assert docstring_only, f"{init.relative_to(PROJECT_ROOT)} runs code on import: list it in dvc.yaml's deps"


def test_import_closure_follows_imports_through_modules_not_packages():
    closure = import_closure(PROJECT_ROOT / "stages" / "profile.py")
    # stages.profile -> pipeline.profile -> pipeline.transforms (normalized_batches feeds the calibration images)
    assert {"stages/profile.py", "pipeline/profile.py", "pipeline/transforms.py", "pipeline/quant/observers.py"} <= closure
    assert not any(path.endswith("__init__.py") for path in closure)


def test_no_stage_reads_another_stages_params_section():
    """Each stage lists its own section (or none): what an earlier stage decided reaches it through an artifact."""
    sections = {stage: stage.replace("-", "_") for stage in STAGES}
    for stage, definition in STAGES.items():
        if stage == "check-params":  # it validates the whole file, by design
            continue
        read = {(key if isinstance(key, str) else next(iter(key))).split(".")[0] for key in definition.get("params", [])}
        assert read <= {sections[stage]}, f"dvc.yaml stage {stage!r} reads params of {sorted(read - {sections[stage]})}"
