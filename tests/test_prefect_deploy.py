"""prefect.yaml: its shape (fast), and a real deployment round trip through .ci/prefect-deploy.sh (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from orchestration import flows, tables
from orchestration.grid import DEFAULT_GRID
from tests.project_copy import (
    PROJECT_ROOT,
    run,
    set_params,
    tiny_project_copy,
    tool_env,
)

ROUND_TRIP_LIMIT = 900  # seconds: server start, deploy, one pipeline run, one two-experiment sweep


def deployments() -> dict[str, dict]:
    return {deployment["name"]: deployment for deployment in yaml.safe_load(
        (PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]}


def test_nightly_runs_the_pipeline_on_a_schedule_one_run_at_a_time_on_the_gpu_pool():
    nightly = deployments()["nightly"]
    assert nightly["entrypoint"] == "orchestration/flows.py:ptq_pipeline"
    assert nightly["schedules"][0]["cron"]
    assert nightly["concurrency_limit"] == 1
    assert nightly["work_pool"]["name"] == "gpu-pool"
    env = nightly["work_pool"]["job_variables"]["env"]
    assert {"CUDA_VISIBLE_DEVICES", "PATH"} <= set(env)
    assert {env["DO_NOT_TRACK"], env["PREFECT_SERVER_ANALYTICS_ENABLED"]} == {"1", "false"}


def test_sweep_deployment_is_on_demand_with_the_default_grid():
    sweep = deployments()["sweep"]
    assert sweep["entrypoint"] == "orchestration/flows.py:ptq_sweep"
    assert not sweep.get("schedules")
    assert sweep["parameters"]["grid"] == DEFAULT_GRID


@pytest.mark.slow
def test_deploy_round_trip_on_a_local_server(tmp_path):
    """A committed baseline, a params change in the workspace, then both deployments through a real worker."""
    project = tiny_project_copy(tmp_path)
    run(["dvc", "repro"], project)
    run(["git", "add", "--all"], project)
    run(["git", "commit", "--quiet", "-m", "baseline"], project)
    # The nightly run reproduces what this change touches; the experiments start from it.
    set_params(project, {"train": {"epochs": 2}})
    grid = [{"evaluate.batch_size": 7}, {"evaluate.batch_size": 11}]

    began = time.monotonic()
    # Its own session, so a timeout stops the script and its trap still stops the server and worker.
    script = subprocess.Popen(["bash", str(PROJECT_ROOT / ".ci/prefect-deploy.sh"), str(project),
                               json.dumps({"grid": grid})],
                              env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        output, _ = script.communicate(timeout=ROUND_TRIP_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGTERM)
        output, _ = script.communicate(timeout=120)
    print(output)
    print(f"deploy round trip: {time.monotonic() - began:.0f} s")
    assert script.returncode == 0, output[-4000:]
    for key in (flows.PIPELINE_TABLE_KEY, flows.PIPELINE_DIFF_KEY, flows.SWEEP_TABLE_KEY):
        assert f"artifact {key}:" in output

    # The nightly run reproduced the params change in the checkout itself (the pull step's directory).
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    swept = tables.experiments_table(shown, [experiment["name"] for baseline in shown
                                            for experiment in baseline.get("experiments") or []],
                                    ["evaluate.batch_size", "train.epochs"], tables.TABLE_PREFIXES)
    assert sorted(row["evaluate.batch_size"] for row in swept) == [7, 11]
    assert all(row["train.epochs"] == 2 for row in swept)
    assert all(0.0 <= row["fp32"] <= 100.0 and row["c_mismatches"] == 0 for row in swept)
