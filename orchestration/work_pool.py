"""A sweep on a Prefect work pool: one flow run of the experiment deployment per point not done yet.

A point is done when an experiment of the sweep's commit with its params is on the git remote and its outputs
are on the DVC remote. A machine that dies takes its worker along, and nothing is left to report the run's end:
the server marks such a run Crashed when its heartbeats stop (an automation the sweep installs).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from orchestration import dvc_tasks
from orchestration.commands import CommandFailed, git
from orchestration.grid import point_label
from orchestration.tables import flatten, run_params

EXPERIMENT_FLOW = "ptq-experiment"  # the name of flows.ptq_experiment, the flow of one point
# The deployment of ptq_experiment in prefect.yaml, which a sweep on a pool submits its points to.
EXPERIMENT_DEPLOYMENT = f"{EXPERIMENT_FLOW}/experiment"
# How a sweep tells each experiment run what to clone: prefect.yaml's git_clone step reads these
# from the flow run's environment (its job variables), since a pull step cannot see flow parameters.
GIT_URL_ENV = "PTQ_GIT_URL"
GIT_COMMIT_ENV = "PTQ_GIT_COMMIT"
# Prefect's shortest heartbeat period, and the silence that means a dead machine: three missed heartbeats.
HEARTBEAT_SECONDS = 30
SILENCE_SECONDS = 3 * HEARTBEAT_SECONDS
SILENT_RUNS_AUTOMATION = "ptq-experiment: crash runs whose heartbeats stopped"
RUN_POLL_SECONDS = 5  # how often a sweep on a pool reads its runs' states


def params_with(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened params with the overrides applied, as ``dvc exp run -S`` applies them: an override replaces
    the key and everything under it."""
    kept = {key: value for key, value in base.items()
            if not any(key == name or key.startswith(f"{name}.") for name in overrides)}
    return {**kept, **flatten(overrides)}


def matching_experiments(shown: list[dict[str, Any]], commit: str,
                         grid: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """For each grid point, ``{name: commit}`` of every experiment of ``commit`` (from ``dvc exp show --json``) whose
    params are the commit's with the point's overrides, in ``dvc exp show`` order."""
    baselines = [baseline for baseline in shown
                 if baseline.get("data") and commit.startswith(baseline.get("rev") or "-")]
    found: list[dict[str, str]] = [{} for _ in grid]
    for baseline in baselines:
        base = run_params(baseline)
        experiments = [(rev["name"], rev["data"]["rev"], run_params(rev))
                       for experiment in baseline.get("experiments") or []
                       for rev in experiment.get("revs") or [] if rev.get("name") and rev.get("data")]
        for point, matches in zip(grid, found):
            wanted = params_with(base, point)
            matches.update((name, rev) for name, rev, params in experiments if params == wanted)
    return found


def experiments_done(root: Path, commit: str, grid: Sequence[Mapping[str, Any]], git_remote: str) -> list[str | None]:
    """For each grid point, an experiment of ``commit`` with its params whose outputs are all on the DVC remote, or
    None. Its ref on the git remote is not enough: a push cut short after the ref leaves outputs no one can pull."""
    done: list[str | None] = []
    for point, matches in zip(grid, matching_experiments(dvc_tasks.read_experiments(str(root)), commit, grid)):
        found = None
        for name, rev in matches.items():
            missing = dvc_tasks.outputs_missing_from_remote(str(root), rev)
            if not missing:
                found = name
                break
            print(f"{point_label(point)}: experiment {name} is on git remote {git_remote}, but its outputs "
                  f"{' '.join(missing)} are not on the DVC remote: not counted as done "
                  f"(`dvc exp remove --git-remote {git_remote} {name}` removes it)")
        done.append(found)
    return done


def silent_runs_automation() -> AutomationCore:
    """A server automation: a run of ptq_experiment that sent no heartbeat and no final state for SILENCE_SECONDS
    is marked Crashed."""
    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=SILENT_RUNS_AUTOMATION,
        description=f"A machine that runs ptq-experiment died: no heartbeat for {SILENCE_SECONDS} s",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            # Only this flow's runs send heartbeats this often; others keep Prefect's slower default.
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": EXPERIMENT_FLOW},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENCE_SECONDS),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {SILENCE_SECONDS} s: its machine or worker died")],
    )


def ensure_silent_runs_crash() -> None:
    """Install the automation that crashes silent experiment runs, once per Prefect server."""
    with get_client(sync_client=True) as client:
        if not client.read_automations_by_name(SILENT_RUNS_AUTOMATION):
            client.create_automation(silent_runs_automation())


def wait_for_runs(ids: Sequence[Any], timeout_s: float) -> list[FlowRun]:
    """The flow runs once all are final or ``timeout_s`` has passed, whichever comes first."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in ids]
            if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() >= deadline:
                return runs
            time.sleep(RUN_POLL_SECONDS)


def run_outcome(run: FlowRun, timeout_s: float) -> str:
    """Where and how a flow run of a point ended, for the sweep's summary."""
    worker = run.labels.get("prefect.worker.name", "no worker")
    state = run.state.name if run.state is not None else "no state"
    if run.state is None or not run.state.is_final():
        return f"flow run {run.name} still {state} on {worker} after {timeout_s:.0f} s"
    return f"flow run {run.name} {state} on {worker}"


def sweep_on_pool(root: Path, grid: list[dict[str, Any]], deployment: str, git_remote: str,
                  timeout_s: float) -> tuple[list[str], list[str]]:
    """Each point without an experiment on the git remote whose outputs are on the DVC remote, as a flow run of
    ``deployment``; the experiment names of the points that have one afterwards, and a line per point that failed."""
    logger = get_run_logger()
    commit = git(["rev-parse", "HEAD"], root)
    url = git(["remote", "get-url", git_remote], root)
    git(["fetch", "--quiet", git_remote], root)
    if not git(["branch", "--remotes", "--contains", commit], root):
        raise CommandFailed(f"commit {commit} is not on git remote {git_remote} ({url}), so no worker can clone it: "
                            f"push it first (git push {git_remote} HEAD)")
    if git(["status", "--porcelain", "--untracked-files=no"], root):
        logger.warning("uncommitted changes in %s: experiments on the pool start from commit %s without them",
                       root, commit[:7])

    dvc_tasks.pull_experiments(str(root), git_remote)
    done = experiments_done(root, commit, grid, git_remote)
    todo = [point for point, name in zip(grid, done) if name is None]
    for point, name in zip(grid, done):
        if name is not None:
            print(f"{point_label(point)}: experiment {name} is on the remotes already, not run again")
    # Each run clones the git remote at this commit: the pull step reads both from the run's environment.
    env = {GIT_URL_ENV: url, GIT_COMMIT_ENV: commit, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
    ensure_silent_runs_crash()
    submitted = [run_deployment(name=deployment, parameters={"overrides": point, "commit": commit},
                                job_variables={"env": env}, flow_run_name=point_label(point), timeout=0)
                 for point in todo]
    runs = wait_for_runs([run.id for run in submitted], timeout_s)
    for point, run in zip(todo, runs):
        print(f"{point_label(point)}: {run_outcome(run, timeout_s)}")

    dvc_tasks.pull_experiments(str(root), git_remote)
    # A point done before stays done: only the points just run are looked up again.
    ran = iter(experiments_done(root, commit, todo, git_remote))
    found = [name if name is not None else next(ran) for name in done]
    found_by_point = dict(zip(map(point_label, grid), found))
    failed: list[str] = []
    for point, run in zip(todo, runs):
        if run.state is None or not run.state.is_completed():
            failed.append(f"{point_label(point)}: {run_outcome(run, timeout_s)}")
        elif found_by_point[point_label(point)] is None:
            failed.append(f"{point_label(point)}: {run_outcome(run, timeout_s)}, but no experiment with its params "
                          f"reached {git_remote} with its outputs on the DVC remote")
    return [name for name in found if name is not None], failed
