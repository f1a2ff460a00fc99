"""Orchestration of the DVC pipeline: Prefect flows, the dvc and git commands they run, and the command lines.

Kept out of ``pipeline/``, the library the stages run, which parses no command line: a change
here re-runs no stage. DVC alone decides what is cached; Prefect's own task caching is off.

    python -m orchestration [--project DIR] [pipeline | sweep -S KEY=V1,V2 ...]
    python -m orchestration.report data/metrics.json [more files, revisions or experiments ...]

- ``commands``: dvc and git in subprocesses of their own session, their output spooled to files and
  logged line by line; ``CommandFailed`` with the stderr tail;
- ``dvc_tasks``: one Prefect task per DVC command (repro a stage, read metrics, run, push and pull
  experiments, check a remote), and the retry that only a network failure gets;
- ``grid``: a sweep's points (every combination of the choices) and how ``dvc exp run -S`` takes them;
- ``tables``: rows from DVC's JSON (``metrics show``, ``exp show``) for Prefect's table artifacts, and
  a plain-text table for the log;
- ``work_pool``: a sweep on a Prefect work pool: which points are done on the remotes, a flow run for each
  of the rest, the automation that crashes the runs of a dead machine;
- ``flows``: the flows ``ptq_pipeline``, ``ptq_sweep`` and ``ptq_experiment``, the entrypoints of ``prefect.yaml``;
- ``cli``: the flows' command line (``python -m orchestration``, ``__main__``);
- ``report``: the results table's command line (``pipeline.report`` renders the table).

With no Prefect server configured, the flows run in Prefect's ephemeral mode, offline.
"""
import os

# Set when the package is imported, before any of its modules imports prefect: prefect reads these settings on
# import. The ephemeral server's start-up wait: Prefect's 20 s default ran out in CI on a loaded 2-core machine
# ("Timed out while attempting to connect to ephemeral Prefect API server"), where importing the server and
# migrating its database took longer.
OFFLINE_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)
