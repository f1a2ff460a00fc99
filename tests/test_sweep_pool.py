"""A sweep across a pool of workers that share nothing but a git remote and a DVC remote (slow).

One machine stands in for several: a bare git repository is the git remote, a local directory the DVC
remote, a Prefect server runs on 127.0.0.1, and two process workers each run in an empty directory of
their own (their flow runs clone the git remote under it). The user's checkout is a tiny project copy.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowFilter,
    FlowFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from orchestration import cli, flows, tables, work_pool
from orchestration.grid import point_label, product_grid
from tests.local_pool import LocalPool, kill_machine, stop_session
from tests.project_copy import PROJECT_ROOT, run, set_params, tiny_project_copy

POOL = "gpu-pool"  # the work pool prefect.yaml names
SWEEP_LIMIT = 480  # seconds one sweep command may take, start to gathered table
CRASH_LIMIT = 2 * work_pool.SILENCE_SECONDS  # seconds for a killed run to be marked Crashed (no heartbeat for 90 s)
# Four points on the baseline's checkpoint: download, train and profile come from the DVC remote, as the
# user's `dvc push` left them.
SETTINGS = ["quantize_weights.bits=8,4", "quantize_weights.calibrator=sigma,mse"]
GRID = product_grid(cli.parse_choices(SETTINGS))
CHECKPOINT_STAGES = {"download", "train", "profile"}
# A fifth point on a checkpoint of its own (its worker is killed after training), then a sixth on the same
# checkpoint, run after it: train, sensitivity and profile come from the run-cache the fifth pushed (every
# output of theirs is cached: DVC keeps no run-cache entry for a stage with a `cache: false` output).
FIFTH_SETTINGS = ["train.epochs=2", "quantize_weights.bits=6"]
SIXTH_SETTINGS = ["train.epochs=2", "quantize_weights.bits=4"]
FIFTH, SIXTH = (product_grid(cli.parse_choices(settings))[0] for settings in (FIFTH_SETTINGS, SIXTH_SETTINGS))


def start_sweep(pool: LocalPool, project: Path, settings: list[str]) -> subprocess.Popen:
    """``python -m orchestration sweep --deployment ...`` from the user's checkout, in a session of its own."""
    args = [sys.executable, "-m", "orchestration", "--project", str(project), "sweep", "--deployment",
            work_pool.EXPERIMENT_DEPLOYMENT, "--timeout", str(SWEEP_LIMIT - 60)]
    for setting in settings:
        args += ["-S", setting]
    return subprocess.Popen(args, cwd=project, env=pool.env(pool.root / "user-home"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def sweep(pool: LocalPool, project: Path, settings: list[str]) -> tuple[int, str, float]:
    """A sweep from the user's checkout to its end: exit status, output, seconds."""
    began = time.monotonic()
    process = start_sweep(pool, project, settings)
    try:
        output, _ = process.communicate(timeout=SWEEP_LIMIT)
    except subprocess.TimeoutExpired:
        stop_session(process)
        output = process.stdout.read() if process.stdout else ""
        raise AssertionError(f"sweep {settings} ran past {SWEEP_LIMIT} s:\n{output[-6000:]}") from None
    return process.returncode, output, time.monotonic() - began


def experiment_runs(api_url: str) -> list[FlowRun]:
    """Every flow run of the experiment flow, oldest first."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ptq-experiment"])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def run_logs(api_url: str, run_id: Any) -> str:
    """A flow run's log messages so far, one per line."""
    messages: list[str] = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                                       offset=len(messages)):
            messages += [log.message for log in page]
    return "\n".join(messages)


def ran_stages(logs: str) -> set[str]:
    """The stages DVC ran (rather than skipped, pulled or restored), from a run's log."""
    return set(re.findall(r"Running stage '([\w@-]+)'", logs))


def outputs_reported(api_url: str, experiment: str) -> dict[str, str]:
    """``{file: sha256}`` as the experiment's own run published it, read from its artifact."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[flows.EXPERIMENT_OUTPUTS_KEY])))
    [artifact] = [artifact for artifact in artifacts if f"experiment {experiment} " in (artifact.description or "")]
    return {row["file"]: row["sha256"] for row in json.loads(artifact.data)}


def partial_objects(remote: Path) -> list[str]:
    """Files of a DVC remote's object store whose bytes do not hash to their name: cut-short uploads."""
    objects = [path for path in sorted((remote / "files" / "md5").rglob("*")) if path.is_file()]
    return [str(path.relative_to(remote)) for path in objects
            if hashlib.md5(path.read_bytes()).hexdigest() != path.parent.name + path.name.removesuffix(".dir")]


def wait_until(condition: Any, limit: float, what: str) -> Any:
    """Poll ``condition()`` each second until it returns something truthy; fail naming ``what`` after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit:.0f} s")
        time.sleep(1)
    return value


def user_checkout(root: Path) -> tuple[Path, Path, Path]:
    """The user's committed, pushed checkout with its baseline on the DVC remote; with the two remotes."""
    project = tiny_project_copy(root)
    if "sensitivity" in yaml.safe_load((project / "params.yaml").read_text()):
        set_params(project, {"sensitivity": {"num_samples": 40}})  # the tiny set has 80 training images
    git_remote, dvc_remote = root / "remote.git", root / "dvc-remote"
    run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(git_remote)], root)
    run(["git", "remote", "add", "origin", str(git_remote)], project)
    run(["dvc", "remote", "add", "--default", "shared", str(dvc_remote)], project)
    run(["dvc", "repro"], project)
    run(["git", "add", "--all"], project)
    run(["git", "commit", "--quiet", "-m", "baseline on a shared DVC remote"], project)
    run(["dvc", "push"], project)
    run(["git", "push", "--quiet", "origin", "main"], project)
    return project, git_remote, dvc_remote


def test_the_experiment_deployment_clones_what_the_sweep_names_and_uses_the_workers_own_venv():
    [experiment] = [deployment for deployment in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())[
        "deployments"] if deployment["name"] == work_pool.EXPERIMENT_DEPLOYMENT.split("/")[1]]
    assert experiment["entrypoint"] == "orchestration/flows.py:ptq_experiment"
    assert flows.ptq_experiment.name == work_pool.EXPERIMENT_DEPLOYMENT.split("/")[0]
    [step] = experiment["pull"]
    assert step["prefect.deployments.steps.git_clone"] == {
        "repository": f"{{{{ ${work_pool.GIT_URL_ENV} }}}}", "commit_sha": f"{{{{ ${work_pool.GIT_COMMIT_ENV} }}}}"}
    assert experiment["work_pool"]["name"] == POOL
    env = experiment["work_pool"]["job_variables"]["env"]
    assert "PATH" not in env  # a path of the deploying machine means nothing on a worker's
    assert {env["DO_NOT_TRACK"], env["PREFECT_SERVER_ANALYTICS_ENABLED"]} == {"1", "false"}
    assert not experiment.get("concurrency_limit")  # runs in clones of their own never share a lock


@pytest.mark.slow
def test_a_sweep_runs_on_two_workers_that_share_only_the_remotes_and_survives_a_killed_worker(tmp_path):
    timings: dict[str, float] = {}
    began = time.monotonic()
    project, git_remote, dvc_remote = user_checkout(tmp_path)
    timings["baseline (dvc repro, push)"] = time.monotonic() - began

    with LocalPool(tmp_path, POOL) as pool:
        timings["server up"] = time.monotonic() - began - sum(timings.values())
        pool.prefect(["--no-prompt", "deploy", "--name", "experiment"], project)
        [pull_step] = json.loads(pool.prefect(["deployment", "inspect", work_pool.EXPERIMENT_DEPLOYMENT, "--output",
                                               "json"], project))["pull_steps"]
        # Resolved per run from the run's environment, not at deploy time.
        assert pull_step["prefect.deployments.steps.git_clone"] == {
            "repository": "{{ $PTQ_GIT_URL }}", "commit_sha": "{{ $PTQ_GIT_COMMIT }}"}
        for name in ("worker-a", "worker-b"):
            pool.add_worker(name)

        # 1. Four points, one flow run each, spread over both workers.
        status, output, timings["sweep of 4"] = sweep(pool, project, SETTINGS)
        print(output)
        assert status == 0, f"{output[-6000:]}\n{pool.log('worker-a')}\n{pool.log('worker-b')}"
        first = experiment_runs(pool.api_url)
        assert len(first) == len(GRID) and all(run.state.is_completed() for run in first)
        assignment = {run.name: run.labels.get("prefect.worker.name") for run in first}
        print("worker assignment:", json.dumps(assignment, indent=1))
        assert set(assignment.values()) == {"worker-a", "worker-b"}, assignment
        commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
        for flow_run in first:
            assert flow_run.parameters["commit"] == commit
            # What the user's baseline already pushed is pulled, never recomputed.
            stages = ran_stages(run_logs(pool.api_url, flow_run.id))
            assert not stages & CHECKPOINT_STAGES, (flow_run.name, stages)

        # 2. The user's checkout has every experiment of the sweep, with metrics.
        shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
        names = [next(iter(found), None) for found in work_pool.matching_experiments(shown, commit, GRID)]
        assert None not in names, names
        rows = tables.experiments_table(shown, names, ["quantize_weights.bits"], tables.TABLE_PREFIXES)
        assert [row["experiment"] for row in rows] == names
        assert all(0.0 <= row["fp32"] <= 100.0 for row in rows), rows
        reported = outputs_reported(pool.api_url, names[0])  # what its worker made, by the worker's own hashes

        # 3. A fifth point; its worker is killed after training, mid-experiment, as a machine shutting down.
        sweep_began = time.monotonic()
        second_sweep = start_sweep(pool, project, FIFTH_SETTINGS)
        try:
            def fifth_mid_stage() -> FlowRun | None:
                running = [flow_run for flow_run in experiment_runs(pool.api_url)[len(first):]
                           if flow_run.state.is_running() and "prefect.worker.name" in flow_run.labels]
                return next((flow_run for flow_run in running
                             if "Running stage 'quantize-weights'" in run_logs(pool.api_url, flow_run.id)), None)

            victim = wait_until(fifth_mid_stage, SWEEP_LIMIT / 2, "fifth point running quantize-weights")
            killed_worker = victim.labels["prefect.worker.name"]
            kill_machine(pool.workers[killed_worker])
            timings["fifth point until killed"] = time.monotonic() - sweep_began
            output, _ = second_sweep.communicate(timeout=SWEEP_LIMIT)
        finally:
            if second_sweep.poll() is None:
                stop_session(second_sweep)
        print(output)
        timings["sweep with the killed worker"] = time.monotonic() - sweep_began
        with temporary_settings({PREFECT_API_URL: pool.api_url}), get_client(sync_client=True) as client:
            crashed = wait_until(lambda: (latest := client.read_flow_run(victim.id)).state.is_final() and latest,
                                 CRASH_LIMIT, "final state of the killed run")
        assert crashed.state.is_crashed(), crashed.state
        assert second_sweep.returncode == 1
        assert (f"1 of 1 experiments failed:\n{point_label(FIFTH)}: flow run {victim.name} Crashed "
                f"on {killed_worker}") in output
        # DVC writes objects under a temporary name and renames them: none is cut short.
        assert partial_objects(dvc_remote) == []

        # 4. The rerun runs only the missing point, on the worker that is left.
        status, output, timings["rerun of the fifth"] = sweep(pool, project, FIFTH_SETTINGS)
        print(output)
        assert status == 0, f"{output[-6000:]}\n{pool.log('worker-a')}\n{pool.log('worker-b')}"
        [rerun] = experiment_runs(pool.api_url)[len(first) + 1:]
        assert rerun.name == point_label(FIFTH) and rerun.state.is_completed()
        assert rerun.labels["prefect.worker.name"] != killed_worker
        assert {"train", "profile"} <= ran_stages(run_logs(pool.api_url, rerun.id))  # its own checkpoint
        assert partial_objects(dvc_remote) == []

        # 5. The same checkpoint after it: what DVC's run-cache can hold comes from the fifth point's push.
        status, output, timings["sixth, same checkpoint"] = sweep(pool, project, SIXTH_SETTINGS)
        print(output)
        assert status == 0, f"{output[-6000:]}\n{pool.log('worker-a')}\n{pool.log('worker-b')}"
        [sixth] = experiment_runs(pool.api_url)[len(first) + 2:]
        sixth_logs = run_logs(pool.api_url, sixth.id)
        for stage in ("train", "sensitivity", "profile"):
            assert f"Stage '{stage}' is cached - skipping run" in sixth_logs, ran_stages(sixth_logs)
        assert not ran_stages(sixth_logs) & {"download", "train", "sensitivity", "profile"}
        assert "quantize-weights" in ran_stages(sixth_logs)
        print("every experiment run:", json.dumps(
            [f"{run.name}: {run.state.name} on {run.labels.get('prefect.worker.name')}"
             for run in experiment_runs(pool.api_url)], indent=1))

    # 6. A machine that ran nothing: a fresh clone lists every experiment and restores one's artifacts.
    began_restore = time.monotonic()
    fresh = tmp_path / "fresh"
    run(["git", "clone", "--quiet", str(git_remote), str(fresh)], tmp_path)
    run(["dvc", "exp", "pull", "origin"], fresh)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], fresh).stdout)
    every_point = [*GRID, FIFTH, SIXTH]
    fresh_names = [next(iter(found), None) for found in work_pool.matching_experiments(shown, commit, every_point)]
    assert fresh_names[:len(GRID)] == names and None not in fresh_names, fresh_names
    rows = tables.experiments_table(shown, fresh_names, ["quantize_weights.bits"], tables.TABLE_PREFIXES)
    assert len(rows) == len(every_point) and all("fp32" in row for row in rows), rows
    run(["dvc", "exp", "apply", names[0]], fresh)
    run(["dvc", "pull"], fresh)
    assert {path: flows.sha256_of(fresh / path) for path in flows.EXPERIMENT_OUTPUTS} == reported
    timings["fresh clone, exp pull, apply, pull"] = time.monotonic() - began_restore
    timings["total"] = time.monotonic() - began
    print("timings (s):", json.dumps({key: round(value) for key, value in timings.items()}, indent=1))
