"""Prefect flows that orchestrate the DVC pipeline; DVC alone decides what is cached.

``ptq_pipeline`` runs every stage of ``dvc.yaml`` in file order, one task per
stage, each as ``dvc repro --single-item <stage>`` in a subprocess, and
publishes the accuracy table as Prefect artifacts. ``ptq_sweep`` runs a grid of
parameter overrides as ``dvc exp run --temp`` experiments side by side, or, given
a deployment of ``ptq_experiment``, one flow run per grid point on any worker of
its pool: each run clones the git remote at the sweep's commit, pulls from the
shared DVC remote what other runs already made, and pushes its experiment back: its
outputs to the DVC remote first, its git ref last, and a point counts as done only
when both are there.

These three are the entrypoints of ``prefect.yaml``; ``python -m orchestration`` runs the first two.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from orchestration import dvc_tasks
from orchestration.commands import CommandFailed, git
from orchestration.grid import DEFAULT_GRID, point_label
from orchestration.tables import (
    TABLE_PREFIXES,
    experiments_table,
    format_table,
    metrics_table,
)
from orchestration.work_pool import EXPERIMENT_FLOW, GIT_COMMIT_ENV, sweep_on_pool

PIPELINE_TABLE_KEY = "ptq-accuracy"
PIPELINE_DIFF_KEY = "ptq-metrics-diff"
SWEEP_TABLE_KEY = "ptq-sweep"
EXPERIMENT_OUTPUTS_KEY = "ptq-experiment-outputs"
SWEEP_TIMEOUT_SECONDS = 6 * 3600  # how long a sweep on a pool waits for all its runs, default
# What an experiment run reports the SHA-256 of: the integer model and the C sources made from it.
EXPERIMENT_OUTPUTS = ("data/integer_model.npz", "data/export/model.c", "data/export/model.h",
                      "data/export/model_data.h")


def stage_names(project: Path) -> list[str]:
    """The stages of ``dvc.yaml`` in file order, which is their dependency order."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text()).get("stages") or {}
    return list(stages)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@flow(name=EXPERIMENT_FLOW, log_prints=True)
def ptq_experiment(overrides: dict[str, Any], commit: str | None = None, project: str = ".",
                   git_remote: str = "origin") -> dict[str, Any]:
    """One sweep point in a checkout of its own: run it with what the DVC remote already holds, push it back,
    and publish the SHA-256 of the integer model and C sources it made."""
    root = Path(project).resolve()
    head = git(["rev-parse", "HEAD"], root)
    # The deployment's pull step checks out the sweep's commit; an experiment of any other would mix baselines.
    if commit is not None and head != commit:
        raise CommandFailed(f"checkout {root} is at commit {head}, not the sweep's commit {commit}: "
                            f"the deployment's pull step must check out ${GIT_COMMIT_ENV}")
    name = dvc_tasks.run_experiment(str(root), overrides, in_workspace=True)
    dvc_tasks.push_experiment(str(root), git_remote, name)
    outputs = {path: sha256_of(root / path) for path in EXPERIMENT_OUTPUTS}
    create_table_artifact(table=[{"file": path, "sha256": digest} for path, digest in outputs.items()],
                          key=EXPERIMENT_OUTPUTS_KEY, description=f"Outputs of experiment {name} at {head[:7]}")
    print(f"Experiment {name} ({point_label(overrides)}) pushed to {git_remote}")
    return {"experiment": name, "commit": head, "outputs": outputs}


def sweep_here(root: Path, grid: list[dict[str, Any]], max_parallel: int) -> tuple[list[str], list[str]]:
    """Each point as ``dvc exp run --temp`` in this checkout, ``max_parallel`` at a time; the experiment names of
    those that succeeded, and a line per point that failed."""
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        futures = [runner.submit(dvc_tasks.run_experiment, {"project": str(root), "overrides": overrides})
                   for overrides in grid]
        for future in futures:
            future.wait()
    names = [future.result() for future in futures if future.state.is_completed()]
    failed = [f"{point_label(overrides)}: {future.state.name}" for future, overrides in zip(futures, grid)
              if not future.state.is_completed()]
    return names, failed


@flow(name="ptq-pipeline", log_prints=True)
def ptq_pipeline(project: str = ".", metric_prefixes: tuple[str, ...] = TABLE_PREFIXES) -> dict[str, dict[str, Any]]:
    """Reproduce every DVC stage in order, then publish the accuracy table and the diff against HEAD."""
    logger = get_run_logger()
    root = Path(project).resolve()
    stages = stage_names(root)
    ran = [stage for stage in stages if dvc_tasks.stage_task(stage)(str(root), stage)]
    logger.info("stages run: %s; up to date: %s", ", ".join(ran) or "none",
                ", ".join(stage for stage in stages if stage not in ran) or "none")

    metrics = dvc_tasks.read_metrics(str(root))
    rows = metrics_table(metrics, metric_prefixes)
    create_table_artifact(table=rows, key=PIPELINE_TABLE_KEY, description=f"Accuracy of the pipeline in {root} (%)")
    create_markdown_artifact(markdown=f"## Metrics against HEAD\n\n{dvc_tasks.metrics_diff(str(root))}\n",
                             key=PIPELINE_DIFF_KEY, description="dvc metrics diff HEAD --md")
    print(f"Accuracy (%) in {root}:\n{format_table(rows)}")
    return metrics


@flow(name="ptq-sweep", log_prints=True)
def ptq_sweep(project: str = ".", grid: list[dict[str, Any]] | None = None, max_parallel: int = 2,
              metric_prefixes: tuple[str, ...] = TABLE_PREFIXES, deployment: str | None = None,
              git_remote: str = "origin", timeout_s: float = SWEEP_TIMEOUT_SECONDS) -> list[dict[str, Any]]:
    """Run one DVC experiment per override dict and publish their accuracy table.

    Without ``deployment``: in this checkout, ``max_parallel`` at a time. Experiments start from HEAD plus
    the workspace's changes to tracked files: commit dvc.lock after a pipeline run, or every experiment
    reproduces every stage that has no DVC run-cache entry.

    With ``deployment`` (of ``ptq_experiment``): each point that has no experiment on ``git_remote`` yet, with
    its outputs on the DVC remote, as a flow run on any worker of the deployment's pool, from HEAD as pushed to
    ``git_remote``; waits up to ``timeout_s`` for them, then fetches their experiments into this checkout.
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel: value {max_parallel} is out of range; allowed: >= 1")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: value {timeout_s} is out of range; allowed: > 0")
    root = Path(project).resolve()
    grid = DEFAULT_GRID if grid is None else grid
    # Every experiment finishes before any failure is raised, so the table shows all that succeeded.
    if deployment is None:
        names, failed = sweep_here(root, grid, max_parallel)
    else:
        names, failed = sweep_on_pool(root, grid, deployment, git_remote, timeout_s)

    param_keys = list(dict.fromkeys(key for overrides in grid for key in overrides))
    rows = experiments_table(dvc_tasks.read_experiments(str(root)), names, param_keys, metric_prefixes)
    create_table_artifact(table=rows, key=SWEEP_TABLE_KEY, description=f"Accuracy per experiment in {root} (%)")
    print(f"Experiments in {root}:\n{format_table(rows)}")
    if failed:
        raise CommandFailed(f"{len(failed)} of {len(grid)} experiments failed:\n" + "\n".join(failed))
    return rows
