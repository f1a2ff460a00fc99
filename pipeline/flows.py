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
Prefect's own task caching is off everywhere: a second caching system beside
DVC's would disagree with it.

With no Prefect server configured, ``python -m pipeline.flows`` runs in
Prefect's ephemeral mode, offline.
"""
from __future__ import annotations

import os

# Set before prefect is imported: it reads these settings on import. The ephemeral server's start-up
# wait: Prefect's 20 s default ran out in CI on a loaded 2-core machine ("Timed out while attempting to
# connect to ephemeral Prefect API server"), where importing the server and migrating its database took longer.
OFFLINE_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Iterable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402
from prefect import Task, flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.objects import FlowRun, StateType  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.events.actions import ChangeFlowRunState  # noqa: E402
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture  # noqa: E402
from prefect.runtime import task_run  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline.data import DownloadError  # noqa: E402

DVC = "dvc"  # resolved on the PATH of stage_env(), so the venv's dvc wins
# Only these stages touch the network; a retry cannot fix any other stage.
NETWORK_STAGES = frozenset({"download"})
NETWORK_RETRY_DELAYS = [10, 60]  # seconds before the 1st and 2nd retry
# The download stage's exit status when the network failed: the one failure a retry can fix.
# A bad checksum, a missing file or a bad params.yaml fails at once.
TRANSIENT_EXIT_STATUS = DownloadError.exit_status
STDERR_TAIL_LINES = 30  # enough for a Python traceback plus DVC's own error line
OUTPUT_POLL_SECONDS = 0.1  # how often a running command's spooled output is read into the log
# Metric keys shown in the tables: all of them, since the one metrics file (data/accuracy.json) is the table.
TABLE_PREFIXES = ("",)
PIPELINE_TABLE_KEY = "ptq-accuracy"
PIPELINE_DIFF_KEY = "ptq-metrics-diff"
SWEEP_TABLE_KEY = "ptq-sweep"
EXPERIMENT_OUTPUTS_KEY = "ptq-experiment-outputs"
# The deployment of ptq_experiment in prefect.yaml, which a sweep on a pool submits its points to.
EXPERIMENT_DEPLOYMENT = "ptq-experiment/experiment"
# How a sweep tells each experiment run what to clone: prefect.yaml's git_clone step reads these
# from the flow run's environment (its job variables), since a pull step cannot see flow parameters.
GIT_URL_ENV = "PTQ_GIT_URL"
GIT_COMMIT_ENV = "PTQ_GIT_COMMIT"
SWEEP_TIMEOUT_SECONDS = 6 * 3600  # how long a sweep on a pool waits for all its runs, default
# A machine that dies takes its worker along, and nothing is left to report the run's end: the server
# marks such a run Crashed when its heartbeats stop (an automation the sweep installs). Prefect's
# shortest heartbeat period, and the silence that means a dead machine: three missed heartbeats.
HEARTBEAT_SECONDS = 30
SILENCE_SECONDS = 3 * HEARTBEAT_SECONDS
SILENT_RUNS_AUTOMATION = "ptq-experiment: crash runs whose heartbeats stopped"
RUN_POLL_SECONDS = 5  # how often a sweep on a pool reads its runs' states
# What an experiment run reports the SHA-256 of: the integer model and the C sources made from it.
EXPERIMENT_OUTPUTS = ("data/integer_model.npz", "data/export/model.c", "data/export/model.h",
                      "data/export/model_data.h")

# What the sweep varies by default: weight bits x calibrator x granularity, 12 experiments.
DEFAULT_CHOICES: dict[str, list[Any]] = {
    "quantize_weights.bits": [8, 6, 4],
    "quantize_weights.calibrator": ["sigma", "mse"],
    "quantize_weights.granularity": ["per_tensor", "per_channel"],
}


class CommandFailed(RuntimeError):
    """A DVC command exited non-zero; the message ends with its stderr tail."""


@dataclass(frozen=True)
class Finished:
    """A streamed command's exit status, its stdout lines and the last lines of its stderr."""

    returncode: int
    stdout: list[str]
    stderr_tail: list[str]


def product_grid(choices: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the choices, one override dict per experiment, in the choices' order."""
    keys = list(choices)
    return [dict(zip(keys, values)) for values in itertools.product(*(choices[key] for key in keys))]


DEFAULT_GRID = product_grid(DEFAULT_CHOICES)


def stage_names(project: Path) -> list[str]:
    """The stages of ``dvc.yaml`` in file order, which is their dependency order."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text()).get("stages") or {}
    return list(stages)


def stage_env() -> dict[str, str]:
    """Environment for DVC subprocesses: this venv first on PATH, offline settings, unbuffered Python."""
    env = dict(os.environ)
    # Stage commands run whatever `python` is first on PATH: it must be this venv's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name, value in OFFLINE_ENV.items():
        env.setdefault(name, value)
    # A piped Python stage block-buffers its stdout; unbuffered, its lines reach the log as they happen.
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Spool:
    """A temporary file a child process writes and this one reads, line by line, as it grows.

    A file, not a pipe: a pipe dies with its reader, and a DVC writing to a dead pipe dies too
    (SIGPIPE, or a BrokenPipeError at its next line of output), mid-stage, perhaps mid-way through
    dvc.lock. A file outlives this process; its name is removed at once, so nothing is left behind.
    """

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="dvc-output-", suffix=".log")
        self.writer = os.fdopen(fd, "wb")
        self._reader = open(name, "rb")  # its own file offset, independent of the writer's
        os.unlink(name)
        self._partial = b""

    def new_lines(self, final: bool = False) -> list[str]:
        """The complete lines written since the last call; with ``final``, an unterminated last line too."""
        data = self._partial + self._reader.read()
        *lines, self._partial = data.split(b"\n")
        if final and self._partial:
            lines, self._partial = [*lines, self._partial], b""
        return [line.decode(errors="replace").rstrip() for line in lines]

    def close(self) -> None:
        self.writer.close()
        self._reader.close()


def run_detached(args: list[str], cwd: Path, on_stdout: Callable[[str], None],
                 on_stderr: Callable[[str], None]) -> int:
    """Run a command in a session of its own with its output spooled to files; hand each line to a callback.

    The command survives this process: a cancelled, killed or crashed flow run never takes DVC down
    mid-write (no signal to its process group reaches it, and it never writes to a dead pipe).
    No timeout, for the same reason: a stage finishes or fails on its own.
    """
    out, err = _Spool(), _Spool()
    try:
        with subprocess.Popen(args, cwd=cwd, env=stage_env(), stdin=subprocess.DEVNULL, stdout=out.writer,
                              stderr=err.writer, start_new_session=True) as process:
            while True:
                done = process.poll() is not None
                for line in out.new_lines(final=done):
                    on_stdout(line)
                for line in err.new_lines(final=done):
                    on_stderr(line)
                if done:
                    return process.returncode
                time.sleep(OUTPUT_POLL_SECONDS)
    finally:
        out.close()
        err.close()


def stream(args: list[str], cwd: Path) -> Finished:
    """Run a command detached (see ``run_detached``), logging stdout and stderr line by line as they arrive."""
    logger = get_run_logger()
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    stdout: list[str] = []
    logger.info("$ %s", " ".join(args))

    def log_stdout(line: str) -> None:
        stdout.append(line)
        if line.strip():
            logger.info(line)

    def log_stderr(line: str) -> None:
        if line.strip():
            stderr_tail.append(line)
            logger.info(line)

    returncode = run_detached(args, cwd, log_stdout, log_stderr)
    return Finished(returncode, stdout, list(stderr_tail))


def capture(args: list[str], cwd: Path) -> str:
    """Run a short DVC query (detached too: even a read-only query takes DVC's rwlock) and return its stdout;
    a failure raises with its stderr."""
    stdout: list[str] = []
    stderr: list[str] = []
    returncode = run_detached(args, cwd, stdout.append, stderr.append)
    if returncode != 0:
        raise CommandFailed(f"{' '.join(args)} failed (exit {returncode}):\n" + "\n".join(stderr).strip())
    return "".join(f"{line}\n" for line in stdout)


def failure(args: list[str], finished: Finished) -> CommandFailed:
    """The error for a failed streamed command, carrying its stderr tail."""
    tail = "\n".join(finished.stderr_tail) or "(no stderr)"
    return CommandFailed(f"{' '.join(args)} failed (exit {finished.returncode}); last stderr lines:\n{tail}")


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


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}, in insertion order."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def selected(flat: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    """The entries of a flattened metrics dict whose key starts with one of the prefixes."""
    prefixes = tuple(prefixes)
    return {key: value for key, value in flat.items() if key.startswith(prefixes)}


def workspace_metrics(shown: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{metrics file: its data}`` of the workspace, from ``dvc metrics show --json``; unreadable files left out."""
    files = shown.get("", {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if "data" in entry}


def metrics_table(metrics: Mapping[str, Mapping[str, Any]], prefixes: Iterable[str]) -> list[dict[str, Any]]:
    """One row per selected metric: its file, its dotted key, its value."""
    prefixes = tuple(prefixes)
    return [
        {"file": path, "metric": key, "value": value}
        for path, data in metrics.items()
        for key, value in selected(flatten(data), prefixes).items()
    ]


def experiments_table(shown: list[dict[str, Any]], names: Iterable[str], param_keys: Iterable[str],
                      prefixes: Iterable[str]) -> list[dict[str, Any]]:
    """One row per named experiment from ``dvc exp show --json``: its name, the swept params, the selected metrics."""
    wanted = list(names)
    param_keys, prefixes = list(param_keys), tuple(prefixes)
    found: dict[str, dict[str, Any]] = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name") in wanted and rev.get("data"):
                    data = rev["data"]
                    params = run_params(rev)
                    row: dict[str, Any] = {"experiment": rev["name"], "rev": data["rev"][:7]}
                    row.update({key: params.get(key) for key in param_keys})
                    for entry in data["metrics"].values():
                        row.update(selected(flatten(entry.get("data", {})), prefixes))
                    found[rev["name"]] = row
    return [found[name] for name in wanted if name in found]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned plain-text table, columns in first-seen order."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    lines = [columns, ["-" * width for width in widths], *cells]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``-S key=value`` arguments; JSON values parse back as the same YAML type (a string stays a string)."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


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


def git(args: list[str], project: Path) -> str:
    """A git query's stdout, stripped; a failure raises with its stderr."""
    return capture(["git", *args], project).strip()


def params_with(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened params with the overrides applied, as ``dvc exp run -S`` applies them: an override replaces
    the key and everything under it."""
    kept = {key: value for key, value in base.items()
            if not any(key == name or key.startswith(f"{name}.") for name in overrides)}
    return {**kept, **flatten(overrides)}


def run_params(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened params.yaml of a commit or experiment in ``dvc exp show --json``."""
    return flatten(entry["data"]["params"].get("params.yaml", {}).get("data", {}))


def matching_experiments(shown: list[dict[str, Any]], commit: str,
                         grid: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """For each grid point, ``{name: commit}`` of every experiment of ``commit`` (from ``dvc exp show --json``) whose
    params are the commit's with the point's overrides, in ``dvc exp show`` order."""
    baselines = [baseline for baseline in shown if baseline.get("data") and commit.startswith(baseline.get("rev") or "-")]
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


def experiments_done(root: Path, commit: str, grid: Sequence[Mapping[str, Any]], git_remote: str) -> list[str | None]:
    """For each grid point, an experiment of ``commit`` with its params whose outputs are all on the DVC remote, or
    None. Its ref on the git remote is not enough: a push cut short after the ref leaves outputs no one can pull."""
    done: list[str | None] = []
    for point, matches in zip(grid, matching_experiments(read_experiments(str(root)), commit, grid)):
        found = None
        for name, rev in matches.items():
            missing = outputs_missing_from_remote(str(root), rev)
            if not missing:
                found = name
                break
            print(f"{point_label(point)}: experiment {name} is on git remote {git_remote}, but its outputs "
                  f"{' '.join(missing)} are not on the DVC remote: not counted as done "
                  f"(`dvc exp remove --git-remote {git_remote} {name}` removes it)")
        done.append(found)
    return done


def point_label(overrides: Mapping[str, Any]) -> str:
    """A grid point as ``key=value`` pairs, as ``dvc exp run -S`` takes them."""
    return " ".join(f"{key}={value}" for key, value in overrides.items()) or "(no overrides)"


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@flow(name="ptq-experiment", log_prints=True)
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
    name = run_experiment(str(root), overrides, in_workspace=True)
    push_experiment(str(root), git_remote, name)
    outputs = {path: sha256_of(root / path) for path in EXPERIMENT_OUTPUTS}
    create_table_artifact(table=[{"file": path, "sha256": digest} for path, digest in outputs.items()],
                          key=EXPERIMENT_OUTPUTS_KEY, description=f"Outputs of experiment {name} at {head[:7]}")
    print(f"Experiment {name} ({point_label(overrides)}) pushed to {git_remote}")
    return {"experiment": name, "commit": head, "outputs": outputs}


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
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": ptq_experiment.name},
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

    pull_experiments(str(root), git_remote)
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

    pull_experiments(str(root), git_remote)
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


def sweep_here(root: Path, grid: list[dict[str, Any]], max_parallel: int) -> tuple[list[str], list[str]]:
    """Each point as ``dvc exp run --temp`` in this checkout, ``max_parallel`` at a time; the experiment names of
    those that succeeded, and a line per point that failed."""
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        futures = [runner.submit(run_experiment, {"project": str(root), "overrides": overrides}) for overrides in grid]
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
    ran = [stage for stage in stages if stage_task(stage)(str(root), stage)]
    logger.info("stages run: %s; up to date: %s", ", ".join(ran) or "none",
                ", ".join(stage for stage in stages if stage not in ran) or "none")

    metrics = read_metrics(str(root))
    rows = metrics_table(metrics, metric_prefixes)
    create_table_artifact(table=rows, key=PIPELINE_TABLE_KEY, description=f"Accuracy of the pipeline in {root} (%)")
    create_markdown_artifact(markdown=f"## Metrics against HEAD\n\n{metrics_diff(str(root))}\n",
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
    rows = experiments_table(read_experiments(str(root)), names, param_keys, metric_prefixes)
    create_table_artifact(table=rows, key=SWEEP_TABLE_KEY, description=f"Accuracy per experiment in {root} (%)")
    print(f"Experiments in {root}:\n{format_table(rows)}")
    if failed:
        raise CommandFailed(f"{len(failed)} of {len(grid)} experiments failed:\n" + "\n".join(failed))
    return rows


def parse_choices(settings: list[str]) -> dict[str, list[Any]]:
    """``["key=v1,v2", ...]`` as {key: [v1, v2]}, each value parsed as YAML (8 is an int, sigma a string)."""
    choices: dict[str, list[Any]] = {}
    for setting in settings:
        key, sep, values = setting.partition("=")
        if not sep or not key or not values:
            raise argparse.ArgumentTypeError(f"-S {setting!r}: expected KEY=VALUE[,VALUE...]")
        choices[key] = [yaml.safe_load(value) for value in values.split(",")]
    return choices


def main(argv: list[str] | None = None) -> int:
    """Command line: run the pipeline (default) or a sweep with no Prefect server (ephemeral mode)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n")[0])
    parser.add_argument("--project", default=".", help="the project checkout (default: the current directory)")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("pipeline", help="reproduce every DVC stage in order (the default)")
    sweep = commands.add_parser("sweep", help="run a grid of parameter overrides as DVC experiments")
    sweep.add_argument("-S", "--set", dest="settings", action="append", default=[], metavar="KEY=V1,V2",
                       help="a params.yaml key and its values; the grid is every combination "
                            f"(default: {' x '.join(DEFAULT_CHOICES)})")
    sweep.add_argument("--max-parallel", type=int, default=2,
                       help="experiments run at once in this checkout (default: 2); not used with --deployment")
    sweep.add_argument("--deployment", metavar="FLOW/DEPLOYMENT",
                       help="run each point as a flow run of this deployment of ptq_experiment on its work pool "
                            f"(e.g. {EXPERIMENT_DEPLOYMENT}); needs a Prefect server (PREFECT_API_URL)")
    sweep.add_argument("--git-remote", default="origin",
                       help="with --deployment: the git remote the workers clone and push to (default: origin)")
    sweep.add_argument("--timeout", type=float, default=SWEEP_TIMEOUT_SECONDS, metavar="SECONDS",
                       help=f"with --deployment: how long to wait for all runs (default: {SWEEP_TIMEOUT_SECONDS})")
    args = parser.parse_args(argv)

    if args.command == "sweep":
        try:
            grid = product_grid(parse_choices(args.settings)) if args.settings else DEFAULT_GRID
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
        state = ptq_sweep(project=args.project, grid=grid, max_parallel=args.max_parallel,
                          deployment=args.deployment, git_remote=args.git_remote, timeout_s=args.timeout,
                          return_state=True)
    else:
        state = ptq_pipeline(project=args.project, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
