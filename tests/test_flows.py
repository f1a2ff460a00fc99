"""Prefect flows over DVC: tasks through ``.fn()`` with a fake ``dvc``, then the pipeline flow for real.

The real runs share one session-scoped ``prefect_test_harness`` (its server takes 10-15 s to start)
and a temporary git copy of the project on a tiny image folder. The sweep flow runs for real in the
slow deployment test (tests/test_prefect_deploy.py).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.logging import disable_run_logger
from prefect.logging.handlers import APILogWorker
from prefect.states import Completed, Failed
from prefect.testing.utilities import prefect_test_harness

from pipeline import flows
from tests.project_copy import PROJECT_ROOT, tiny_project_copy

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
    monkeypatch.setattr(flows, "DVC", str(fake.script))
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
    assert flows.repro_stage.fn(str(tmp_path), "train") is True
    [call] = fake_dvc.calls()
    assert call["argv"] == ["repro", "--single-item", "train"]
    assert call["cwd"] == str(tmp_path)
    assert call["env"]["PATH"].split(os.pathsep)[0] == VENV_BIN
    assert call["env"]["DO_NOT_TRACK"] == "1"
    assert call["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert call["env"]["PYTHONUNBUFFERED"] == "1"


def test_repro_stage_reports_an_up_to_date_stage_as_not_run(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="Stage 'train' didn't change, skipping\nData and pipelines are up to date.\n")
    assert flows.repro_stage.fn(str(tmp_path), "train") is False


def test_a_failing_stage_raises_with_the_tail_of_its_stderr(fake_dvc, tmp_path):
    noise = "".join(f"progress line {index}\n" for index in range(100))
    fake_dvc.reply(stdout="Running stage 'train':\n", returncode=255, stderr=noise + (
        "[train] invalid params.yaml: train.epochs: value 0 is out of range; allowed: >= 1\n"
        "ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with 1\n"))
    with pytest.raises(flows.CommandFailed, match=r"exit 255") as raised:
        flows.repro_stage.fn(str(tmp_path), "train")
    message = str(raised.value)
    assert "train.epochs: value 0 is out of range" in message
    assert "ERROR: failed to reproduce 'train'" in message
    assert "progress line 0\n" not in message  # only the tail travels
    assert len(message.splitlines()) <= flows.STDERR_TAIL_LINES + 1


def test_only_network_stages_retry_and_prefect_never_caches_a_stage():
    assert flows.stage_task("download").retries == len(flows.NETWORK_RETRY_DELAYS) > 0
    assert flows.stage_task("download").retry_condition_fn is flows.failed_on_the_network
    assert flows.stage_task("train").retries == 0
    assert flows.stage_task("download").cache_policy is NO_CACHE
    assert flows.stage_task("train").cache_policy is NO_CACHE


YAML_ERROR_TAIL = ("[download] invalid params.yaml: params.yaml: not valid YAML: while parsing a flow sequence\n"
                   "ERROR: failed to reproduce 'download': failed to run: python -m stages.download, exited with 1")
NETWORK_ERROR_TAIL = ("[download] Download of https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz failed "
                      "(<urlopen error [Errno -3] Temporary failure in name resolution>).\n"
                      "ERROR: failed to reproduce 'download': failed to run: python -m stages.download, exited with "
                      f"{flows.TRANSIENT_EXIT_STATUS}")


@pytest.mark.parametrize(("tail", "retry"), [(YAML_ERROR_TAIL, False), (NETWORK_ERROR_TAIL, True)])
def test_only_a_network_failure_is_retried(tail, retry):
    failed = Failed(data=flows.CommandFailed(f"dvc repro --single-item download failed (exit 255); last stderr lines:\n{tail}"))
    assert flows.failed_on_the_network(flows.stage_task("download"), None, failed) is retry
    assert flows.failed_on_the_network(flows.stage_task("download"), None, Failed(data=ValueError("x"))) is False


def test_metrics_table_lists_the_accuracy_metrics_of_readable_files():
    metrics = flows.workspace_metrics(METRICS_SHOW)
    assert list(metrics) == ["data/train_metrics.json", "data/metrics.json"]
    assert flows.metrics_table(metrics, ["accuracy"]) == [
        {"file": "data/metrics.json", "metric": "accuracy.fp32", "value": 20.0},
        {"file": "data/metrics.json", "metric": "accuracy.int8", "value": 18.5},
    ]
    assert {"file": "data/metrics.json", "metric": "test_images", "value": 30} in flows.metrics_table(metrics, [""])


def test_read_metrics_asks_dvc_for_json_and_skips_unreadable_files(fake_dvc, tmp_path):
    fake_dvc.reply(stdout=json.dumps(METRICS_SHOW))
    metrics = flows.read_metrics.fn(str(tmp_path))
    assert fake_dvc.calls()[0]["argv"] == ["metrics", "show", "--json"]
    assert metrics["data/metrics.json"]["accuracy"] == {"fp32": 20.0, "int8": 18.5}
    assert "data/broken.json" not in metrics


def test_metrics_diff_is_markdown_against_head_and_a_failure_does_not_raise(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="| Path | Metric | HEAD | workspace | Change |\n")
    assert flows.metrics_diff.fn(str(tmp_path)).startswith("| Path")
    assert fake_dvc.calls()[0]["argv"] == ["metrics", "diff", "HEAD", "--md"]
    fake_dvc.reply(stderr="ERROR: unexpected error - no commits\n", returncode=255)
    assert "no commits" in flows.metrics_diff.fn(str(tmp_path))


def test_run_experiment_passes_typed_overrides_and_returns_the_experiment_name(fake_dvc, tmp_path):
    fake_dvc.reply(stdout="Reproducing experiment 'ionic-rort'\nRunning stage 'train':\nRan experiment(s): ionic-rort\n")
    overrides = {"quantize_weights.bits": 4, "quantize_weights.calibrator": "mse", "profile.seed": None}
    assert flows.run_experiment.fn(str(tmp_path), overrides) == "ionic-rort"
    assert fake_dvc.calls()[0]["argv"] == [
        "exp", "run", "--temp", "-S", "quantize_weights.bits=4",
        "-S", 'quantize_weights.calibrator="mse"', "-S", "profile.seed=null"]


def test_a_failing_experiment_raises_with_its_stderr(fake_dvc, tmp_path):
    fake_dvc.reply(stderr="ERROR: Invalid `--set-param` value: Could not override 'train.nokey'.\n", returncode=255)
    with pytest.raises(flows.CommandFailed, match="Could not override 'train.nokey'"):
        flows.run_experiment.fn(str(tmp_path), {"train.nokey": 3})


def test_experiments_table_has_one_row_per_swept_experiment_in_grid_order():
    rows = flows.experiments_table(EXP_SHOW, ["surfy-huts", "vivid-jake", "failed-one"], ["train.epochs"], ["accuracy"])
    assert rows == [
        {"experiment": "surfy-huts", "rev": "253c78e", "train.epochs": 1, "accuracy.fp32": 10.0},
        {"experiment": "vivid-jake", "rev": "32fe3d4", "train.epochs": 2, "accuracy.fp32": 20.0},
    ]


def test_default_grid_is_every_bits_calibrator_granularity_combination():
    assert len(flows.DEFAULT_GRID) == 3 * 2 * 2
    assert len({tuple(overrides.items()) for overrides in flows.DEFAULT_GRID}) == 12
    assert flows.DEFAULT_GRID[0] == {"quantize_weights.bits": 8, "quantize_weights.calibrator": "sigma",
                                     "quantize_weights.granularity": "per_tensor"}


def test_command_line_choices_parse_as_yaml_values():
    assert flows.parse_choices(["train.epochs=1,2", "quantize_weights.calibrator=sigma"]) == {
        "train.epochs": [1, 2], "quantize_weights.calibrator": ["sigma"]}
    with pytest.raises(flows.argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        flows.parse_choices(["train.epochs"])


def test_command_line_runs_the_pipeline_by_default_and_a_sweep_over_every_combination(monkeypatch):
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(flows, "ptq_pipeline", lambda **kwargs: calls.append(("pipeline", kwargs)) or Completed())
    monkeypatch.setattr(flows, "ptq_sweep", lambda **kwargs: calls.append(("sweep", kwargs)) or Failed())
    assert flows.main(["--project", "/checkout"]) == 0
    assert flows.main(["sweep", "-S", "train.epochs=1,2", "-S", "evaluate.batch_size=100", "--max-parallel", "3"]) == 1
    assert calls == [
        ("pipeline", {"project": "/checkout", "return_state": True}),
        ("sweep", {"project": ".", "grid": [{"train.epochs": 1, "evaluate.batch_size": 100},
                                            {"train.epochs": 2, "evaluate.batch_size": 100}],
                   "max_parallel": 3, "return_state": True}),
    ]
    with pytest.raises(SystemExit):
        flows.main(["sweep", "-S", "train.epochs"])


def test_format_table_aligns_columns():
    assert flows.format_table([{"metric": "accuracy.fp32", "value": 20.0}, {"metric": "x", "value": 5}]) == (
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
    monkeypatch.setattr(flows, "DVC", str(fake.script))
    monkeypatch.setattr(flows, "NETWORK_RETRY_DELAYS", [0, 0])  # the count matters here, not the wait
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

    from tests.project_copy import run, set_params, tool_env

    project = tiny_project_copy(tmp_path)
    set_params(project, {"train": {"epochs": 60}})  # a few seconds of training: time to kill it mid-stage
    run(["git", "commit", "--quiet", "-am", "longer training"], project)
    flow = subprocess.Popen([sys.executable, "-m", "pipeline.flows", "--project", str(project)], cwd=PROJECT_ROOT,
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
