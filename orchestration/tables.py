"""Table rows from DVC's JSON (``dvc metrics show``, ``dvc exp show``) for Prefect's table artifacts, and the
plain-text table the flows print.

Not ``pipeline.report``'s table: that one reads one file of a fixed shape (``data/metrics.json``) into labelled
columns; these rows hold whatever DVC lists (any metrics file, the swept params), key by key.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Metric keys shown in the tables: all of them, since the one metrics file (data/accuracy.json) is the table.
TABLE_PREFIXES = ("",)


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


def run_params(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened params.yaml of a commit or experiment in ``dvc exp show --json``."""
    return flatten(entry["data"]["params"].get("params.yaml", {}).get("data", {}))


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
