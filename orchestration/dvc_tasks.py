"""Prefect tasks, one DVC command each: reproduce a stage, read metrics and experiments, run, push and pull
experiments, and ask which outputs a DVC remote lacks.

Prefect's task caching is off on every task: a second caching system beside DVC's would disagree with it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from orchestration.commands import CommandFailed, capture, failure, git, stream
from orchestration.grid import override_args, point_label
from orchestration.tables import workspace_metrics

DVC = "dvc"  # resolved on the PATH of stage_env(), so the venv's dvc wins
# Only these stages touch the network; a retry cannot fix any other stage.
NETWORK_STAGES = frozenset({"download"})
NETWORK_RETRY_DELAYS = [10, 60]  # seconds before the 1st and 2nd retry
# The download stage's exit status when the network failed (pipeline.data.DownloadError.exit_status, EX_TEMPFAIL
# of sysexits.h; a test holds the two equal): the one failure a retry can fix. A bad checksum, a missing file or a
# bad params.yaml fails at once. Not imported from pipeline.data: numpy and PIL in every flow run for one number.
TRANSIENT_EXIT_STATUS = os.EX_TEMPFAIL


@task(cache_policy=NO_CACHE, task_run_name="dvc repro {stage}")
def repro_stage(project: str, stage: str) -> bool:
    """Reproduce one DVC stage; True when DVC ran its command, False when it was up to date."""
    # --single-item: this task does its own stage only; the flow already ran the upstream ones.
    args = [DVC, "repro", "--single-item", stage]
    finished = stream(args, Path(project))
    if finished.returncode != 0:
        raise failure(args, finished)
    return any(line.startswith("Running stage ") for line in finished.stdout)


def failed_on_the_network(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: the stage command exited with TRANSIENT_EXIT_STATUS (DVC reports it in its error)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, CommandFailed) and f"exited with {TRANSIENT_EXIT_STATUS}" in str(error)


def stage_task(stage: str) -> Task[[str, str], bool]:
    """The repro task for a stage: with retries only when the stage reads from the network, and only
    when the network is what failed."""
    if stage in NETWORK_STAGES:
        return repro_stage.with_options(retries=len(NETWORK_RETRY_DELAYS), retry_delay_seconds=NETWORK_RETRY_DELAYS,
                                        retry_condition_fn=failed_on_the_network)
    return repro_stage


@task(cache_policy=NO_CACHE)
def read_metrics(project: str) -> dict[str, dict[str, Any]]:
    """The workspace's metrics, per metrics file, from ``dvc metrics show --json``."""
    shown = json.loads(capture([DVC, "metrics", "show", "--json"], Path(project)))
    metrics = workspace_metrics(shown)
    for path, entry in shown.get("", {}).get("data", {}).items():
        if path not in metrics:
            get_run_logger().warning("DVC could not read metrics file %s: %s", path, entry.get("error"))
    return metrics


@task(cache_policy=NO_CACHE)
def metrics_diff(project: str) -> str:
    """``dvc metrics diff HEAD --md``: what the workspace changed against the last commit, as Markdown."""
    args = [DVC, "metrics", "diff", "HEAD", "--md"]
    try:
        diff = capture(args, Path(project)).strip()
    except CommandFailed as error:
        # The run itself succeeded; a missing baseline (no commit yet) should not fail it.
        get_run_logger().warning("%s", error)
        return f"`{' '.join(args)}` failed:\n\n```\n{error}\n```"
    return diff or "No metric changed against HEAD."


def experiment_run_name() -> str:
    """Task run name of an experiment: its overrides, as `dvc exp run -S` takes them."""
    return f"dvc exp run {point_label(task_run.parameters['overrides'])}"


@task(cache_policy=NO_CACHE, task_run_name=experiment_run_name)
def run_experiment(project: str, overrides: dict[str, Any], in_workspace: bool = False) -> str:
    """Run one experiment in its own temporary copy of the workspace, or ``in_workspace``; returns its DVC name."""
    # --temp: experiments run side by side, outside the workspace and its lock. A pool run has a clone
    # of its own, so the workspace is free; --pull fetches from the DVC remote what other runs made:
    # the outputs of unchanged stages and the run-cache entries (with their outputs) of changed ones
    # (DVC keeps none for a stage with an uncached output that is not a metric or plot: train, export).
    args = [DVC, "exp", "run", "--pull" if in_workspace else "--temp", *override_args(overrides)]
    finished = stream(args, Path(project))
    if finished.returncode != 0:
        raise failure(args, finished)
    for line in finished.stdout:
        if match := re.match(r"Reproducing experiment '([^']+)'", line):
            return match.group(1)
    raise CommandFailed(f"{' '.join(args)} succeeded but printed no experiment name")


@task(cache_policy=NO_CACHE)
def read_experiments(project: str) -> list[dict[str, Any]]:
    """``dvc exp show --json``: the baseline commit and its experiments."""
    return json.loads(capture([DVC, "exp", "show", "--json"], Path(project)))


def default_dvc_remote(config_listing: str) -> tuple[str, str] | None:
    """The default DVC remote's (name, url) from ``dvc config --list`` (``key=value`` lines); None when none is set."""
    settings = dict(line.split("=", 1) for line in config_listing.splitlines() if "=" in line)
    name = settings.get("core.remote")
    return None if name is None else (name, settings.get(f"remote.{name}.url", "(no url set)"))


@task(cache_policy=NO_CACHE, task_run_name="dvc exp push {git_remote} {name}")
def push_experiment(project: str, git_remote: str, name: str) -> None:
    """Push the experiment just run in this workspace: its outputs and run-cache entries to the default DVC remote,
    then, only once they are all there, its git ref to ``git_remote``."""
    root = Path(project)
    remote = default_dvc_remote(capture([DVC, "config", "--list"], root))
    if remote is None:
        raise CommandFailed(f"experiment {name}: no default DVC remote in {root} (core.remote in .dvc/config), so "
                            "neither its outputs nor its git ref were pushed: set one with "
                            "`dvc remote add --default NAME URL` and commit .dvc/config")
    remote_name, remote_url = remote
    # Data first, git ref last: a ref on the git remote is what tells a sweep a point is done. `dvc exp push`
    # pushes the ref before the data, so a DVC remote that refused writes left a ref whose outputs no one
    # could pull. The workspace holds the experiment's results (`dvc exp run` without --temp), so `dvc push`
    # sends its outputs; --run-cache: a later run whose stage has the same deps and params restores it.
    data_args = [DVC, "push", "--run-cache", "--remote", remote_name]
    finished = stream(data_args, root)
    if finished.returncode != 0:
        raise CommandFailed(f"experiment {name}: DVC remote {remote_name} ({remote_url}) refused its outputs, so its "
                            f"git ref was not pushed to {git_remote} and a rerun of the sweep runs the point again; "
                            f"{failure(data_args, finished)}")
    ref_args = [DVC, "exp", "push", "--no-cache", git_remote, name]
    finished = stream(ref_args, root)
    if finished.returncode != 0:
        raise failure(ref_args, finished)


@task(cache_policy=NO_CACHE, task_run_name="dvc exp pull {git_remote}")
def pull_experiments(project: str, git_remote: str) -> None:
    """Fetch the experiments of HEAD from the git remote, refs only: ``dvc pull`` after ``dvc exp apply`` gets data."""
    capture([DVC, "exp", "pull", "--no-cache", git_remote], Path(project))


@task(cache_policy=NO_CACHE, task_run_name="dvc status --cloud {rev}")
def outputs_missing_from_remote(project: str, rev: str) -> list[str]:
    """The cached outputs of commit ``rev`` (an experiment's) that the default DVC remote lacks.

    ``dvc status --cloud`` in a throwaway clone checked out at ``rev``: it reads the remote without downloading
    anything and leaves the checkout's workspace alone.
    """
    root = Path(project)
    with tempfile.TemporaryDirectory(prefix="exp-status-") as folder:
        clone = Path(folder) / "clone"
        # --shared: the clone reads this checkout's git objects in place, experiment commits included.
        git(["clone", "--quiet", "--shared", "--no-checkout", str(root), str(clone)], root)
        git(["-c", "advice.detachedHead=false", "checkout", "--quiet", rev], clone)
        local_config = root / ".dvc" / "config.local"
        if local_config.exists():  # the remote or its credentials, when set with `dvc remote modify --local`
            shutil.copy2(local_config, clone / ".dvc" / "config.local")
        status = json.loads(capture([DVC, "status", "--cloud", "--json"], clone))
    # Per output: "deleted" when on the remote only (this clone's cache is empty), "new" when in the local cache
    # only (a cache.dir from config.local), "missing" when on neither; an output in both is left out.
    return sorted(path for path, state in status.items() if state in ("new", "missing"))
