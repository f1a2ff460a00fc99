"""Run the DVC pipeline or a sweep through Prefect flows; with no Prefect server configured, offline (ephemeral mode).

    python -m orchestration [--project DIR]                       # every stage, then the accuracy table
    python -m orchestration sweep -S KEY=V1,V2 [-S ...] [--deployment FLOW/DEPLOYMENT]
"""
from __future__ import annotations

import argparse
from typing import Any

import yaml

from orchestration.flows import SWEEP_TIMEOUT_SECONDS, ptq_pipeline, ptq_sweep
from orchestration.grid import DEFAULT_CHOICES, DEFAULT_GRID, product_grid
from orchestration.work_pool import EXPERIMENT_DEPLOYMENT


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
    parser = argparse.ArgumentParser(prog="python -m orchestration", description=__doc__.split("\n")[0])
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
