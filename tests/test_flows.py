"""Prefect flows over DVC: tasks through ``.fn()`` with a fake ``dvc``, then the pipeline flow for real.

The real runs share one session-scoped ``prefect_test_harness`` (its server takes 10-15 s to start)
and a temporary git copy of the project on a tiny image folder. The sweep flow runs for real in the
slow deployment test (tests/test_prefect_deploy.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import yaml
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.logging import disable_run_logger
from prefect.logging.handlers import APILogWorker
from prefect.states import Completed, Crashed, Failed, Running, Scheduled
from prefect.testing.utilities import prefect_test_harness

from orchestration import cli, commands, dvc_tasks, flows, tables, work_pool
from orchestration.grid import DEFAULT_GRID
from tests.project_copy import PROJECT_ROOT, run, tiny_project_copy, tool_env

VENV_BIN = str(Path(sys.executable).parent)

FAKE_DVC = """\
import json, os, sys
from pathlib import Path

here = Path(__file__).parent
recorded = ("PATH", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "PYTHONUNBUFFERED")
with open(here / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                            "env": {name: os.environ.get(name) for name in recorded}}) + "\\n")
reply = json.loads((here / "reply.json").read_text())
sys.stdout.write(reply["stdout"])
sys.stderr.write(reply["stderr"])
sys.exit(reply["returncode"])
"""


class FakeDvc:
    """A ``dvc`` executable that records each call and answers with a canned reply."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.script = folder / "dvc"
        self.script.write_text(f"#!{sys.executable}\n{FAKE_DVC}")
        self.script.chmod(0o755)
        self.reply()

    def reply(self, stdout: str = "", stderr: str = "", returncode: int = 0) -> None:
        (self.folder / "reply.json").write_text(json.dumps(
            {"stdout": stdout, "stderr": stderr, "returncode": returncode}))

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.folder / "calls.jsonl").read_text().splitlines()]


@pytest.fixture
def fake_dvc(tmp_path, monkeypatch) -> Iterator[FakeDvc]:
    folder = tmp_path / "fake-dvc"
    folder.mkdir()
    fake = FakeDvc(folder)
    monkeypatch.setattr(dvc_tasks, "DVC", str(fake.script))
    with disable_run_logger():
        yield fake


# A trimmed `dvc metrics show --json` of a real run, plus a file DVC could not read.
METRICS_SHOW = {"": {"data": {
    "data/train_metrics.json": {"data": {"train": {"loss": 2.2992, "accuracy": 20.0, "device": "cpu"}}},
    "data/metrics.json": {"data": {"accuracy": {"fp32": 20.0, "int8": 18.5},
                                   "per_class_accuracy": {"fp32": {"class0": 0.0}}, "test_images": 30}},
    "data/broken.json": {"error": {"type": "JSONDecodeError", "msg": "Expecting value"}},
}}}


def exp_rev(name: str, rev: str, epochs: int, fp32: float) -> dict[str, Any]:
    """One experiment as ``dvc exp show --json`` lists it."""
    data = {"rev": rev, "timestamp": "2026-11-28T02:29:06",
            "params": {"params.yaml": {"data": {"train": {"epochs": epochs, "batch_size": 16}}}},
            "metrics": {"data/metrics.json": {"data": {"accuracy": {"fp32": fp32}, "test_images": 30}},
                        "data/train_metrics.json": {"data": {"train": {"accuracy": 11.25}}}},
            "deps": {}, "outs": {}, "meta": {}}
    return {"executor": None, "name": name,
            "revs": [{"rev": rev, "name": name, "data": data, "error": None, "experiments": None}]}


# A trimmed `dvc exp show --json`: the workspace, then the baseline commit and its experiments.
EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": {"rev": "workspace", "params": {}, "metrics": {}},
     "error": None, "experiments": None},
    {"rev": "c74ba3c6fe95", "name": "main", "data": {"rev": "c74ba3c6fe95", "params": {}, "metrics": {}},
     "error": None, "experiments": [exp_rev("vivid-jake", "32fe3d4d1d27e6cb", 2, 20.0),
                                    exp_rev("surfy-huts", "253c78e15b50d182", 1, 10.0),
                                    exp_rev("older-one", "9999999999999999", 5, 50.0)]},
]


def shown_with(commit: str, *experiments: dict[str, Any]) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the workspace and one baseline commit (1 epoch, batch size 16) with these
    experiments."""
    data = {"rev": commit, "params": {"params.yaml": {"data": {"train": {"epochs": 1, "batch_size": 16}}}},
            "metrics": {}}
    return [EXP_SHOW[0], {**EXP_SHOW[1], "rev": commit, "data": data, "experiments": list(experiments)}]


def test_stage_names_follow_dvc_yaml_file_order(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  zeta:\n    cmd: a\n  alpha:\n    cmd: b\n  mid-stage:\n    cmd: c\n")
    assert flows.stage_names(tmp_path) == ["zeta", "alpha", "mid-stage"]


def test_this_projects_dvc_yaml_lists_every_stage_after_the_stages_it_depends_on():
    """The flow runs stages in file order, so a stage must never read an output of a later stage."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    produced_by: dict[str, str] = {}
    for name, stage in stages.items():
        for section in ("outs", "metrics", "plots"):
            for out in stage.get(section) or []:
                produced_by[next(iter(out)) if isinstance(out, dict) else out] = name
    order = list(stages)
    for name, stage in stages.items():
        for dep in stage.get("deps") or []:
            if dep in produced_by:
                assert order.index(produced_by[dep]) < order.index(name), f"{name} reads {dep} of a later stage"


def test_repro_stage_runs_only_its_stage_in_the_project_with_the_venv_first_and_offline(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="Running stage 'train':\n> python -m stages.train\n[train] done\n")
    assert dvc_tasks.repro_stage.fn(str(tmp_path), "train") is True
    [call] = fake_dvc.calls()
    assert call["argv"] == ["repro", "--single-item", "train"]
    assert call["cwd"] == str(tmp_path)
    assert call["env"]["PATH"].split(os.pathsep)[0] == VENV_BIN
    assert call["env"]["DO_NOT_TRACK"] == "1"
    assert call["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert call["env"]["PYTHONUNBUFFERED"] == "1"


def test_repro_stage_reports_an_up_to_date_stage_as_not_run(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="Stage 'train' didn't change, skipping\nData and pipelines are up to date.\n")
    assert dvc_tasks.repro_stage.fn(str(tmp_path), "train") is False


def test_a_failing_stage_raises_with_the_tail_of_its_stderr(fake_dvc, tmp_path):
    noise = "".join(f"progress line {index}\n" for index in range(100))
    fake_dvc.reply(stdout="Running stage 'train':\n", returncode=255, stderr=noise + (
        "[train] invalid params.yaml: train.epochs: value 0 is out of range; allowed: >= 1\n"
        "ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with 1\n"))
    with pytest.raises(commands.CommandFailed, match=r"exit 255") as raised:
        dvc_tasks.repro_stage.fn(str(tmp_path), "train")
    message = str(raised.value)
    assert "train.epochs: value 0 is out of range" in message
    assert "ERROR: failed to reproduce 'train'" in message
    assert "progress line 0\n" not in message  # only the tail travels
    assert len(message.splitlines()) <= commands.STDERR_TAIL_LINES + 1


def test_only_network_stages_retry_and_prefect_never_caches_a_stage():
    assert dvc_tasks.stage_task("download").retries == len(dvc_tasks.NETWORK_RETRY_DELAYS) > 0
    assert dvc_tasks.stage_task("download").retry_condition_fn is dvc_tasks.failed_on_the_network
    assert dvc_tasks.stage_task("train").retries == 0
    assert dvc_tasks.stage_task("download").cache_policy is NO_CACHE
    assert dvc_tasks.stage_task("train").cache_policy is NO_CACHE


YAML_ERROR_TAIL = ("[download] invalid params.yaml: params.yaml: not valid YAML: while parsing a flow sequence\n"
                   "ERROR: failed to reproduce 'download': failed to run: python -m stages.download, exited with 1")
NETWORK_ERROR_TAIL = ("[download] Download of https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz failed "
                      "(<urlopen error [Errno -3] Temporary failure in name resolution>).\n"
                      "ERROR: failed to reproduce 'download': failed to run: python -m stages.download, exited with "
                      f"{dvc_tasks.TRANSIENT_EXIT_STATUS}")


@pytest.mark.parametrize(("tail", "retry"), [(YAML_ERROR_TAIL, False), (NETWORK_ERROR_TAIL, True)])
def test_only_a_network_failure_is_retried(tail, retry):
    failed = Failed(data=commands.CommandFailed(
        f"dvc repro --single-item download failed (exit 255); last stderr lines:\n{tail}"))
    assert dvc_tasks.failed_on_the_network(dvc_tasks.stage_task("download"), None, failed) is retry
    other_error = Failed(data=ValueError("x"))
    assert dvc_tasks.failed_on_the_network(dvc_tasks.stage_task("download"), None, other_error) is False


def test_the_retried_exit_status_is_the_one_the_download_stage_exits_with_on_a_network_failure():
    from pipeline.data import DownloadError

    assert dvc_tasks.TRANSIENT_EXIT_STATUS == DownloadError.exit_status


def test_the_flows_import_neither_the_library_nor_its_image_decoder():
    """A flow run starts DVC's stages; it needs none of their code (pipeline.data would bring numpy and PIL)."""
    imported = run([sys.executable, "-c", "import sys, orchestration.flows, orchestration.cli; "
                    "print(sorted(name for name in sys.modules if name.split('.')[0] in ('pipeline', 'PIL', 'torch')))"],
                   PROJECT_ROOT).stdout
    assert imported.strip() == "[]"


def test_the_library_parses_no_command_line():
    """pipeline/ is what the stages run; the command lines live in orchestration/."""
    parsers = [path.relative_to(PROJECT_ROOT).as_posix() for path in sorted((PROJECT_ROOT / "pipeline").rglob("*.py"))
               if re.search(r"\bargparse\b|\bsys\.argv\b|__name__ == .__main__.", path.read_text())]
    assert parsers == []


def test_metrics_table_lists_the_accuracy_metrics_of_readable_files():
    metrics = tables.workspace_metrics(METRICS_SHOW)
    assert list(metrics) == ["data/train_metrics.json", "data/metrics.json"]
    assert tables.metrics_table(metrics, ["accuracy"]) == [
        {"file": "data/metrics.json", "metric": "accuracy.fp32", "value": 20.0},
        {"file": "data/metrics.json", "metric": "accuracy.int8", "value": 18.5},
    ]
    assert {"file": "data/metrics.json", "metric": "test_images", "value": 30} in tables.metrics_table(metrics, [""])


def test_read_metrics_asks_dvc_for_json_and_skips_unreadable_files(fake_dvc, tmp_path):
    fake_dvc.reply(stdout=json.dumps(METRICS_SHOW))
    metrics = dvc_tasks.read_metrics.fn(str(tmp_path))
    assert fake_dvc.calls()[0]["argv"] == ["metrics", "show", "--json"]
    assert metrics["data/metrics.json"]["accuracy"] == {"fp32": 20.0, "int8": 18.5}
    assert "data/broken.json" not in metrics


def test_metrics_diff_is_markdown_against_head_and_a_failure_does_not_raise(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="| Path | Metric | HEAD | workspace | Change |\n")
    assert dvc_tasks.metrics_diff.fn(str(tmp_path)).startswith("| Path")
    assert fake_dvc.calls()[0]["argv"] == ["metrics", "diff", "HEAD", "--md"]
    fake_dvc.reply(stderr="ERROR: unexpected error - no commits\n", returncode=255)
    assert "no commits" in dvc_tasks.metrics_diff.fn(str(tmp_path))


def test_run_experiment_passes_typed_overrides_and_returns_the_experiment_name(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="Reproducing experiment 'ionic-rort'\nRunning stage 'train':\nRan experiment(s): ionic-rort\n")
    overrides = {"quantize_weights.bits": 4, "quantize_weights.calibrator": "mse", "profile.seed": None}
    assert dvc_tasks.run_experiment.fn(str(tmp_path), overrides) == "ionic-rort"
    assert fake_dvc.calls()[0]["argv"] == [
        "exp", "run", "--temp", "-S", "quantize_weights.bits=4",
        "-S", 'quantize_weights.calibrator="mse"', "-S", "profile.seed=null"]


def test_an_experiment_in_a_checkout_of_its_own_runs_in_the_workspace_and_pulls_what_others_made(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="Reproducing experiment 'ionic-rort'\nRan experiment(s): ionic-rort\n")
    assert dvc_tasks.run_experiment.fn(str(tmp_path), {"quantize_weights.bits": 4}, in_workspace=True) == "ionic-rort"
    assert fake_dvc.calls()[0]["argv"] == ["exp", "run", "--pull", "-S", "quantize_weights.bits=4"]


def test_push_experiment_sends_its_outputs_and_run_cache_entries_first_and_its_git_ref_last(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="remote.shared.url=/mnt/team/dvc\ncore.remote=shared\n")
    dvc_tasks.push_experiment.fn(str(tmp_path), "origin", "ionic-rort")
    assert [call["argv"] for call in fake_dvc.calls()] == [
        ["config", "--list"], ["push", "--run-cache", "--remote", "shared"],
        ["exp", "push", "--no-cache", "origin", "ionic-rort"]]


def test_push_experiment_without_a_default_dvc_remote_pushes_nothing_and_says_how_to_set_one(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="remote.shared.url=/mnt/team/dvc\n")
    with pytest.raises(commands.CommandFailed) as raised:
        dvc_tasks.push_experiment.fn(str(tmp_path), "origin", "ionic-rort")
    assert str(raised.value) == (
        f"experiment ionic-rort: no default DVC remote in {tmp_path} (core.remote in .dvc/config), so neither its "
        "outputs nor its git ref were pushed: set one with `dvc remote add --default NAME URL` and commit .dvc/config")
    assert [call["argv"] for call in fake_dvc.calls()] == [["config", "--list"]]


def test_the_default_dvc_remote_is_read_from_dvc_config_list():
    listing = "remote.a.url=s3://bucket/dvc\nremote.shared.url=/mnt/team/dvc store\ncore.remote=shared\n"
    assert dvc_tasks.default_dvc_remote(listing) == ("shared", "/mnt/team/dvc store")
    assert dvc_tasks.default_dvc_remote("core.remote=gone\n") == ("gone", "(no url set)")
    assert dvc_tasks.default_dvc_remote("remote.a.url=s3://bucket/dvc\n") is None


def test_pull_experiments_fetches_the_refs_of_heads_experiments_without_their_data(fake_dvc, tmp_path):
    dvc_tasks.pull_experiments.fn(str(tmp_path), "team")
    assert fake_dvc.calls()[0]["argv"] == ["exp", "pull", "--no-cache", "team"]


def test_a_failing_experiment_raises_with_its_stderr(fake_dvc, tmp_path):
    fake_dvc.reply(stderr="ERROR: Invalid `--set-param` value: Could not override 'train.nokey'.\n", returncode=255)
    with pytest.raises(commands.CommandFailed, match="Could not override 'train.nokey'"):
        dvc_tasks.run_experiment.fn(str(tmp_path), {"train.nokey": 3})


def test_experiments_table_has_one_row_per_swept_experiment_in_grid_order():
    rows = tables.experiments_table(EXP_SHOW, ["surfy-huts", "vivid-jake", "failed-one"], ["train.epochs"],
                                    ["accuracy"])
    assert rows == [
        {"experiment": "surfy-huts", "rev": "253c78e", "train.epochs": 1, "accuracy.fp32": 10.0},
        {"experiment": "vivid-jake", "rev": "32fe3d4", "train.epochs": 2, "accuracy.fp32": 20.0},
    ]


def test_points_find_the_experiment_of_their_commit_with_the_commits_params_and_theirs():
    commit = "c74ba3c6fe95" + "0" * 28  # exp show lists the baseline by a prefix of its commit
    shown = shown_with(commit, exp_rev("vivid-jake", "3" * 16, 2, 20.0), exp_rev("surfy-huts", "2" * 16, 1, 10.0))
    shown[1]["experiments"][1]["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["batch_size"] = 32
    grid = [{"train.epochs": 2}, {"train.epochs": 1}, {"train.epochs": 1, "train.batch_size": 32}, {"train.epochs": 3}]
    # epochs=1 alone is the baseline's batch size (16): surfy-huts, at 32, is another point.
    assert work_pool.matching_experiments(shown, commit, grid) == [
        {"vivid-jake": "3" * 16}, {}, {"surfy-huts": "2" * 16}, {}]
    assert work_pool.matching_experiments(shown, "f" * 40, grid) == [{}] * 4  # another baseline's experiments
    # A point run twice (the first run's outputs never reached the DVC remote): both, in `dvc exp show` order.
    again = shown_with(commit, exp_rev("vivid-jake", "3" * 16, 2, 20.0), exp_rev("older-run", "4" * 16, 2, 20.0))
    assert work_pool.matching_experiments(again, commit, grid[:1]) == [{"vivid-jake": "3" * 16, "older-run": "4" * 16}]


def test_an_override_replaces_the_key_and_everything_under_it():
    base = {"quantize_weights.bits": 8, "train.epochs": 1}
    assert work_pool.params_with(base, {"quantize_weights.bits": {"conv1": 4, "fc1": 8}}) == {
        "train.epochs": 1, "quantize_weights.bits.conv1": 4, "quantize_weights.bits.fc1": 8}
    assert work_pool.params_with({"quantize_weights.bits.conv1": 4}, {"quantize_weights.bits": 6}) == {
        "quantize_weights.bits": 6}


def test_default_grid_is_every_bits_calibrator_granularity_combination():
    assert len(DEFAULT_GRID) == 3 * 2 * 2
    assert len({tuple(overrides.items()) for overrides in DEFAULT_GRID}) == 12
    assert DEFAULT_GRID[0] == {"quantize_weights.bits": 8, "quantize_weights.calibrator": "sigma",
                                     "quantize_weights.granularity": "per_tensor"}


def test_command_line_choices_parse_as_yaml_values():
    assert cli.parse_choices(["train.epochs=1,2", "quantize_weights.calibrator=sigma"]) == {
        "train.epochs": [1, 2], "quantize_weights.calibrator": ["sigma"]}
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        cli.parse_choices(["train.epochs"])


def test_command_line_runs_the_pipeline_by_default_and_a_sweep_over_every_combination(monkeypatch):
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cli, "ptq_pipeline", lambda **kwargs: calls.append(("pipeline", kwargs)) or Completed())
    monkeypatch.setattr(cli, "ptq_sweep", lambda **kwargs: calls.append(("sweep", kwargs)) or Failed())
    assert cli.main(["--project", "/checkout"]) == 0
    assert cli.main(["sweep", "-S", "train.epochs=1,2", "-S", "evaluate.batch_size=100", "--max-parallel", "3"]) == 1
    assert cli.main(["sweep", "-S", "train.epochs=1", "--deployment", "ptq-experiment/experiment",
                       "--git-remote", "team", "--timeout", "60"]) == 1
    local = {"deployment": None, "git_remote": "origin", "timeout_s": flows.SWEEP_TIMEOUT_SECONDS}
    assert calls == [
        ("pipeline", {"project": "/checkout", "return_state": True}),
        ("sweep", {"project": ".", "grid": [{"train.epochs": 1, "evaluate.batch_size": 100},
                                            {"train.epochs": 2, "evaluate.batch_size": 100}],
                   "max_parallel": 3, **local, "return_state": True}),
        ("sweep", {"project": ".", "grid": [{"train.epochs": 1}], "max_parallel": 2,
                   "deployment": "ptq-experiment/experiment", "git_remote": "team", "timeout_s": 60.0,
                   "return_state": True}),
    ]
    with pytest.raises(SystemExit):
        cli.main(["sweep", "-S", "train.epochs"])


def test_format_table_aligns_columns():
    assert tables.format_table([{"metric": "accuracy.fp32", "value": 20.0}, {"metric": "x", "value": 5}]) == (
        "metric         value\n-------------  -----\naccuracy.fp32  20.0\nx              5")


# --- real runs: Prefect's test server, DVC on a tiny dataset in a temporary git repo ---


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    return tiny_project_copy(tmp_path_factory.mktemp("flows"))


def run_logs(flow_run_id: UUID) -> list[str]:
    """Every log message of a flow run and its tasks, from the API."""
    APILogWorker.drain_all(timeout=30)
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return messages


def ran_stages(messages: list[str]) -> set[str]:
    return {match for message in messages for match in re.findall(r"Running stage '([\w@-]+)'", message)}


@pytest.fixture(scope="module")
def pipeline_runs(prefect_server, tiny_project) -> dict[str, Any]:
    """The pipeline flow run twice on the tiny project: what each run logged and returned."""
    first = flows.ptq_pipeline(project=str(tiny_project), return_state=True)
    lock_after_first = (tiny_project / "dvc.lock").read_text()
    second = flows.ptq_pipeline(project=str(tiny_project), return_state=True)
    return {"first": first, "second": second, "lock_after_first": lock_after_first}


@pytest.mark.slow
@pytest.mark.parametrize(("tail", "attempts"), [(YAML_ERROR_TAIL, 1), (NETWORK_ERROR_TAIL, 3)])
def test_the_flow_retries_download_only_when_the_network_failed(prefect_server, tmp_path, monkeypatch, tail, attempts):
    folder = tmp_path / "fake-dvc"
    folder.mkdir()
    fake = FakeDvc(folder)
    fake.reply(stdout="Running stage 'download':\n", stderr=tail + "\n", returncode=255)
    monkeypatch.setattr(dvc_tasks, "DVC", str(fake.script))
    monkeypatch.setattr(dvc_tasks, "NETWORK_RETRY_DELAYS", [0, 0])  # the count matters here, not the wait
    (tmp_path / "dvc.yaml").write_text("stages:\n  download:\n    cmd: python -m stages.download\n")
    state = flows.ptq_pipeline(project=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert len(fake.calls()) == attempts


# A real run of every stage, twice, through an ephemeral Prefect server: about 2 minutes, so CI runs it with `slow`.
@pytest.mark.slow
def test_pipeline_flow_runs_every_stage_publishes_the_table_then_does_no_stage_work(pipeline_runs, tiny_project):
    first, second = pipeline_runs["first"], pipeline_runs["second"]
    assert first.is_completed(), first.message
    assert ran_stages(run_logs(first.state_details.flow_run_id)) == set(flows.stage_names(tiny_project))
    metrics = first.result()
    assert list(metrics) == ["data/accuracy.json"]  # the one metrics file: the accuracy table
    assert 0.0 <= metrics["data/accuracy.json"]["fp32"] <= 100.0

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert by_key[flows.PIPELINE_TABLE_KEY].type == "table"
    first_row = json.loads(by_key[flows.PIPELINE_TABLE_KEY].data)[0]
    assert {"file": "data/accuracy.json", "metric": "fp32"}.items() <= first_row.items()
    assert by_key[flows.PIPELINE_DIFF_KEY].type == "markdown"

    assert second.is_completed(), second.message
    second_logs = run_logs(second.state_details.flow_run_id)
    assert ran_stages(second_logs) == set()
    assert sum("didn't change, skipping" in message for message in second_logs) == len(flows.stage_names(tiny_project))
    assert (tiny_project / "dvc.lock").read_text() == pipeline_runs["lock_after_first"]
    assert second.result() == metrics


@pytest.mark.slow
def test_killing_the_flow_mid_stage_leaves_dvc_to_finish_and_its_lock_files_whole(tmp_path):
    """SIGKILL of the flow's whole process group: DVC runs in a session of its own, so it finishes the
    stage and writes dvc.lock and .dvc/tmp/rwlock completely (a killed `dvc repro` can leave either cut short)."""
    import signal
    import subprocess
    import threading
    import time

    from tests.project_copy import set_params, tool_env

    project = tiny_project_copy(tmp_path)
    set_params(project, {"train": {"epochs": 60}})  # a few seconds of training: time to kill it mid-stage
    run(["git", "commit", "--quiet", "-am", "longer training"], project)
    flow = subprocess.Popen([sys.executable, "-m", "orchestration", "--project", str(project)], cwd=PROJECT_ROOT,
                            env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen_train = threading.Event()
    lines: list[str] = []

    def watch() -> None:
        for line in flow.stdout:
            lines.append(line)
            if "Running stage 'train'" in line:
                seen_train.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert seen_train.wait(timeout=240), "".join(lines[-40:])
    finally:
        os.killpg(flow.pid, signal.SIGKILL)  # the flow, its ephemeral server, everything in its group
        flow.wait(timeout=60)

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        lock = project / "dvc.lock"
        if lock.exists() and "train" in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}):
            break
        time.sleep(1)
    rwlock = json.loads((project / ".dvc/tmp/rwlock").read_text())
    assert "train" in yaml.safe_load((project / "dvc.lock").read_text())["stages"], "DVC died with the flow"
    while (rwlock.get("write") or rwlock.get("read")) and time.monotonic() < deadline:  # released as DVC exits
        time.sleep(1)
        rwlock = json.loads((project / ".dvc/tmp/rwlock").read_text())
    assert not rwlock.get("write") and not rwlock.get("read"), rwlock
    assert (project / "data/model.pt").exists()
    # The next run picks up where the killed one stopped.
    assert "Running stage 'train'" not in run(["dvc", "repro"], project).stdout


# --- a sweep on a pool, through .fn(): Prefect's API faked, git real (a bare remote in tmp_path) ---


@pytest.fixture
def pushed_checkout(tmp_path) -> tuple[Path, Path, str]:
    """A checkout with one commit pushed to a bare git remote: (checkout, remote, commit)."""
    remote, checkout = tmp_path / "remote.git", tmp_path / "checkout"
    run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(remote)], tmp_path)
    run(["git", "init", "--quiet", "--initial-branch=main", str(checkout)], tmp_path)
    (checkout / "params.yaml").write_text("train:\n  epochs: 1\n")
    run(["git", "add", "params.yaml"], checkout)
    run(["git", "commit", "--quiet", "-m", "baseline"], checkout)
    run(["git", "remote", "add", "origin", str(remote)], checkout)
    run(["git", "push", "--quiet", "origin", "main"], checkout)
    return checkout, remote, run(["git", "rev-parse", "HEAD"], checkout).stdout.strip()




class FakePool:
    """Stands in for run_deployment and the wait: each submitted run ends in the state given for its point."""

    def __init__(self, endings: dict[str, tuple[Any, str]]) -> None:
        self.endings = endings  # point label: (final state, worker name)
        self.submitted: list[dict[str, Any]] = []
        self.created: list[FlowRun] = []

    def run_deployment(self, **kwargs: Any) -> FlowRun:
        self.submitted.append(kwargs)
        self.created.append(FlowRun(flow_id=uuid4(), name=kwargs["flow_run_name"], state=Scheduled()))
        return self.created[-1]

    def wait_for_runs(self, ids: list[UUID], timeout_s: float) -> list[FlowRun]:
        assert ids == [run.id for run in self.created]
        return [run.model_copy(update={"state": self.endings[run.name][0],
                                       "labels": {"prefect.worker.name": self.endings[run.name][1]}})
                for run in self.created]


def test_a_sweep_on_a_pool_submits_only_the_missing_points_and_names_the_one_that_failed(pushed_checkout, monkeypatch):
    checkout, remote, commit = pushed_checkout
    old, new = exp_rev("old-one", "1" * 16, 1, 10.0), exp_rev("new-one", "2" * 16, 2, 20.0)
    shows = iter([shown_with(commit, old), shown_with(commit, old, new), shown_with(commit, old, new)])
    monkeypatch.setattr(dvc_tasks, "read_experiments", lambda project: next(shows))
    pulls: list[str] = []
    monkeypatch.setattr(dvc_tasks, "pull_experiments", lambda project, git_remote: pulls.append(git_remote))
    checked: list[str] = []
    monkeypatch.setattr(dvc_tasks, "outputs_missing_from_remote", lambda project, rev: checked.append(rev) or [])
    pool = FakePool({"train.epochs=2": (Completed(), "worker-a"), "train.epochs=3": (Crashed(), "worker-b")})
    monkeypatch.setattr(work_pool, "run_deployment", pool.run_deployment)
    monkeypatch.setattr(work_pool, "wait_for_runs", pool.wait_for_runs)
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(flows, "create_table_artifact", lambda **kwargs: published.append(kwargs))
    installed: list[bool] = []
    monkeypatch.setattr(work_pool, "ensure_silent_runs_crash", lambda: installed.append(True))

    grid = [{"train.epochs": 1}, {"train.epochs": 2}, {"train.epochs": 3}]
    with disable_run_logger(), pytest.raises(commands.CommandFailed) as raised:
        flows.ptq_sweep.fn(project=str(checkout), grid=grid, deployment=work_pool.EXPERIMENT_DEPLOYMENT,
                           timeout_s=60)
    assert str(raised.value) == "1 of 3 experiments failed:\ntrain.epochs=3: flow run train.epochs=3 Crashed on worker-b"
    # Only the points without an experiment on the remote ran, each told what to clone.
    assert [call["parameters"] for call in pool.submitted] == [
        {"overrides": {"train.epochs": 2}, "commit": commit}, {"overrides": {"train.epochs": 3}, "commit": commit}]
    for call in pool.submitted:
        assert call["name"] == work_pool.EXPERIMENT_DEPLOYMENT
        assert call["job_variables"] == {"env": {work_pool.GIT_URL_ENV: str(remote), work_pool.GIT_COMMIT_ENV: commit,
                                                 "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}
        assert call["timeout"] == 0  # submitted, not awaited one by one
    assert installed == [True]  # a run whose machine dies ends Crashed, not Running for ever
    assert pulls == ["origin", "origin"]  # before, to skip what is done; after, to gather
    assert checked == ["1" * 16, "2" * 16]  # each experiment's outputs on the DVC remote, once
    [table] = published
    assert [row["experiment"] for row in table["table"]] == ["old-one", "new-one"]


def test_a_sweep_on_a_pool_refuses_a_commit_the_workers_cannot_clone(pushed_checkout):
    checkout, _, _ = pushed_checkout
    (checkout / "params.yaml").write_text("train:\n  epochs: 2\n")
    run(["git", "commit", "--quiet", "-am", "not pushed"], checkout)
    with disable_run_logger(), pytest.raises(commands.CommandFailed, match=r"is not on git remote origin .*git push"):
        flows.ptq_sweep.fn(project=str(checkout), grid=[{"train.epochs": 1}],
                           deployment=work_pool.EXPERIMENT_DEPLOYMENT)


def test_only_experiment_runs_whose_heartbeats_stop_are_crashed():
    automation = work_pool.silent_runs_automation()
    trigger = automation.trigger
    assert trigger.match_related.model_dump() == {"prefect.resource.role": "flow",
                                                  "prefect.resource.name": "ptq-experiment"}
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.posture == "Proactive"
    assert trigger.within.total_seconds() == work_pool.SILENCE_SECONDS > 2 * work_pool.HEARTBEAT_SECONDS
    [action] = automation.actions
    assert action.state == "CRASHED"


def test_waiting_for_runs_gives_up_at_the_timeout_and_says_which_are_unfinished(monkeypatch):
    running = FlowRun(flow_id=uuid4(), name="train.epochs=2", state=Running(), labels={"prefect.worker.name": "w1"})

    class FakeClient:
        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, *exc_info: object) -> None:
            pass

        def read_flow_run(self, run_id: UUID) -> FlowRun:
            return running

    monkeypatch.setattr(work_pool, "get_client", lambda sync_client: FakeClient())
    monkeypatch.setattr(work_pool, "RUN_POLL_SECONDS", 0.01)
    [run_now] = work_pool.wait_for_runs([running.id], timeout_s=0.05)
    assert work_pool.run_outcome(run_now, 0.05) == "flow run train.epochs=2 still Running on w1 after 0 s"


def test_an_experiment_run_refuses_a_checkout_at_another_commit(pushed_checkout, monkeypatch):
    checkout, _, commit = pushed_checkout
    monkeypatch.setattr(dvc_tasks, "run_experiment", lambda *args, **kwargs: pytest.fail("ran in the wrong checkout"))
    with disable_run_logger(), pytest.raises(commands.CommandFailed, match=f"not the sweep's commit {'0' * 40}"):
        flows.ptq_experiment.fn({"train.epochs": 2}, commit="0" * 40, project=str(checkout))


def test_an_experiment_run_pushes_its_experiment_and_reports_the_hashes_of_what_it_made(pushed_checkout, monkeypatch):
    checkout, _, commit = pushed_checkout
    for index, path in enumerate(flows.EXPERIMENT_OUTPUTS):
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_bytes(bytes([index]) * 100)
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(dvc_tasks, "run_experiment",
                        lambda project, overrides, in_workspace: calls.append(("run", overrides, in_workspace))
                        or "ionic-rort")
    monkeypatch.setattr(dvc_tasks, "push_experiment", lambda *args: calls.append(("push", *args)))
    monkeypatch.setattr(flows, "create_table_artifact", lambda **kwargs: calls.append(("artifact", kwargs["key"])))
    with disable_run_logger():
        result = flows.ptq_experiment.fn({"train.epochs": 2}, commit=commit, project=str(checkout))
    assert calls == [("run", {"train.epochs": 2}, True), ("push", str(checkout), "origin", "ionic-rort"),
                     ("artifact", flows.EXPERIMENT_OUTPUTS_KEY)]
    assert result["experiment"] == "ionic-rort" and result["commit"] == commit
    assert result["outputs"]["data/export/model.c"] == hashlib.sha256(bytes([1]) * 100).hexdigest()


# --- pushing an experiment, and counting a point done: real git and DVC on a one-stage pipeline in tmp_path ---

TINY_PIPELINE = """\
stages:
  train:
    cmd: cp params.yaml model.txt
    params: [train.epochs]
    outs: [model.txt]
"""


@dataclass(frozen=True)
class SharedRemotes:
    """A user's checkout whose baseline commit is on a bare git remote, with a local DVC remote as its default."""

    checkout: Path
    git_remote: Path
    dvc_storage: Path  # the DVC remote's directory


@pytest.fixture
def shared_remotes(tmp_path, monkeypatch) -> SharedRemotes:
    for name, value in tool_env().items():
        if name.startswith("GIT_"):  # the identity of DVC's experiment commits in flows' own subprocesses
            monkeypatch.setenv(name, value)
    git_remote, checkout, dvc_storage = tmp_path / "remote.git", tmp_path / "checkout", tmp_path / "mount" / "dvc"
    run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(git_remote)], tmp_path)
    run(["git", "init", "--quiet", "--initial-branch=main", str(checkout)], tmp_path)
    run(["dvc", "init", "--quiet"], checkout)
    (checkout / "params.yaml").write_text("train:\n  epochs: 1\n")
    (checkout / "dvc.yaml").write_text(TINY_PIPELINE)
    dvc_storage.mkdir(parents=True)
    run(["dvc", "remote", "add", "--default", "shared", str(dvc_storage)], checkout)
    run(["git", "add", "--all"], checkout)
    run(["git", "commit", "--quiet", "-m", "baseline"], checkout)
    run(["git", "remote", "add", "origin", str(git_remote)], checkout)
    run(["git", "push", "--quiet", "origin", "main"], checkout)
    return SharedRemotes(checkout, git_remote, dvc_storage)


@contextmanager
def refusing_writes(storage: Path) -> Iterator[None]:
    """A DVC remote directory that refuses every write (and read) while inside, as a share gone from its mount point:
    a file stands where its parent directory was. Tests run as root, whom a chmod'ed directory does not stop."""
    mount = storage.parent
    unmounted = mount.with_name(f"{mount.name}-unmounted")
    mount.rename(unmounted)
    mount.write_text("not a directory\n")
    try:
        yield
    finally:
        mount.unlink()
        unmounted.rename(mount)


def worker_clone(remotes: SharedRemotes, name: str) -> Path:
    """A fresh clone of the git remote, as a pool worker's run starts from."""
    clone = remotes.checkout.parent / name
    run(["git", "clone", "--quiet", str(remotes.git_remote), str(clone)], remotes.checkout.parent)
    return clone


def experiment_refs(git_remote: Path) -> list[str]:
    """The names of the experiments on a git remote."""
    listing = run(["git", "ls-remote", str(git_remote), "refs/exps/*"], git_remote).stdout
    return [line.rsplit("/", 1)[1] for line in listing.splitlines()]


def test_an_experiment_whose_outputs_the_dvc_remote_refuses_never_reaches_the_git_remote(shared_remotes):
    remotes = shared_remotes
    worker = worker_clone(remotes, "worker")
    with disable_run_logger():
        name = dvc_tasks.run_experiment.fn(str(worker), {"train.epochs": 2}, in_workspace=True)
        with refusing_writes(remotes.dvc_storage), pytest.raises(commands.CommandFailed) as raised:
            dvc_tasks.push_experiment.fn(str(worker), "origin", name)
        message = str(raised.value)
        assert message.startswith(
            f"experiment {name}: DVC remote shared ({remotes.dvc_storage}) refused its outputs, so its git ref was not "
            f"pushed to origin and a rerun of the sweep runs the point again; "
            f"dvc push --run-cache --remote shared failed (exit 255); last stderr lines:\n"), message
        assert f"[Errno 20] Not a directory: '{remotes.dvc_storage}" in message
        assert experiment_refs(remotes.git_remote) == []

        dvc_tasks.push_experiment.fn(str(worker), "origin", name)  # the remote writable again
    assert experiment_refs(remotes.git_remote) == [name]


class CloningPool:
    """Stands in for run_deployment and the wait: each submitted point runs at once as ptq_experiment runs it, in a
    fresh clone of the git remote, and its flow run ends Completed."""

    def __init__(self, remotes: SharedRemotes) -> None:
        self.remotes = remotes
        self.ran: list[tuple[dict[str, Any], str]] = []  # (overrides, experiment name)
        self.created: list[FlowRun] = []

    def run_deployment(self, **kwargs: Any) -> FlowRun:
        clone = worker_clone(self.remotes, f"run-{len(self.created)}")
        overrides = kwargs["parameters"]["overrides"]
        name = dvc_tasks.run_experiment.fn(str(clone), overrides, in_workspace=True)
        dvc_tasks.push_experiment.fn(str(clone), "origin", name)
        self.ran.append((overrides, name))
        self.created.append(FlowRun(flow_id=uuid4(), name=kwargs["flow_run_name"], state=Completed(),
                                    labels={"prefect.worker.name": "worker-a"}))
        return self.created[-1]

    def wait_for_runs(self, ids: list[UUID], timeout_s: float) -> list[FlowRun]:
        assert ids == [run.id for run in self.created]
        return self.created


def test_a_sweep_runs_again_a_point_whose_experiment_reached_the_git_remote_without_its_outputs(
        shared_remotes, monkeypatch, capsys):
    remotes = shared_remotes
    worker = worker_clone(remotes, "worker")
    half_pushed = run(["dvc", "exp", "run", "-S", "train.epochs=2"], worker).stdout.split("'")[1]
    # What `dvc exp push --run-cache` does when the DVC remote refuses writes: the git ref first, then a failure.
    with refusing_writes(remotes.dvc_storage):
        pushed = run(["dvc", "exp", "push", "--run-cache", "origin", half_pushed], worker, check=False)
    assert pushed.returncode != 0 and "failed to push cache" in pushed.stderr
    assert experiment_refs(remotes.git_remote) == [half_pushed]

    pool = CloningPool(remotes)
    monkeypatch.setattr(work_pool, "run_deployment", pool.run_deployment)
    monkeypatch.setattr(work_pool, "wait_for_runs", pool.wait_for_runs)
    monkeypatch.setattr(work_pool, "ensure_silent_runs_crash", lambda: None)
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(flows, "create_table_artifact", lambda **kwargs: published.append(kwargs))
    for name in ("read_experiments", "pull_experiments", "outputs_missing_from_remote"):  # run here, not via the API
        monkeypatch.setattr(dvc_tasks, name, getattr(dvc_tasks, name).fn)
    with disable_run_logger():
        flows.ptq_sweep.fn(project=str(remotes.checkout), grid=[{"train.epochs": 2}],
                           deployment=work_pool.EXPERIMENT_DEPLOYMENT, timeout_s=60)
    [(overrides, rerun)] = pool.ran
    assert overrides == {"train.epochs": 2}
    assert (f"train.epochs=2: experiment {half_pushed} is on git remote origin, but its outputs model.txt are not on "
            f"the DVC remote: not counted as done (`dvc exp remove --git-remote origin {half_pushed}` removes it)"
            ) in capsys.readouterr().out
    [table] = published
    assert [row["experiment"] for row in table["table"]] == [rerun]
    # The rerun's experiment is restorable anywhere: a fresh clone pulls it with its outputs and applies it.
    fresh = worker_clone(remotes, "fresh")
    run(["dvc", "exp", "pull", "origin", rerun], fresh)
    run(["dvc", "exp", "apply", rerun], fresh)
    assert yaml.safe_load((fresh / "model.txt").read_text()) == {"train": {"epochs": 2}}
