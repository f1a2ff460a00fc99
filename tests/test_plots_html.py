"""`dvc plots diff` with the offline HTML template draws every plot of dvc.yaml in a headless browser, no network.

Needs Chromium (Debian: ``apt-get install chromium``) and the built template
(``python plot_templates/build_offline_template.py``); skipped without either.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.plots import write_plots
from tests.project_copy import PROJECT_ROOT, run
from tests.test_plots import CSVS, synthetic_artifacts

pytestmark = pytest.mark.slow

TEMPLATE = PROJECT_ROOT / "plot_templates" / "offline.html"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
# No network (every request goes to a closed local port), no first-run or sync machinery; virtual time
# lets vega's asynchronous rendering finish.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--proxy-server=127.0.0.1:9",
                  "--virtual-time-budget=5000"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")


def plot_files(definition: str | dict) -> list[str]:
    """The data files a dvc.yaml plot definition reads: its id, or the files named under its y."""
    plot_id, props = (definition, {}) if isinstance(definition, str) else next(iter(definition.items()))
    y = (props or {}).get("y")
    return list(y) if isinstance(y, dict) else [plot_id]


def write_revision(repo: Path, images: torch.Tensor, granularity: str) -> None:
    artifacts = synthetic_artifacts(repo / "data", images, "net", granularity)
    meta = {"bits": 8, "calibrator": "sigma", "options": {"k": 3.0}, "granularity": granularity}
    write_plots(artifacts["model"], artifacts["quantized"], meta, artifacts["profile"], artifacts["metrics"],
                pd.read_csv(repo / "data" / "train_curves.csv"), repo / "data" / "plots")


def chromium(page: Path, *args: str) -> str:
    profile = page.parent / "chromium-profile"
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    if not TEMPLATE.exists():
        pytest.skip(f"{TEMPLATE} is not built: python plot_templates/build_offline_template.py")
    repo = tmp_path_factory.mktemp("plots") / "repo"
    repo.mkdir()
    run(["git", "init", "--quiet", "--initial-branch=main"], repo)
    run(["dvc", "init", "--quiet"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the custom vega-lite templates
    plots = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["plots"]
    # Only the plots section: the page is drawn from plot data, no stage needs to run.
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_revision(repo, images, "per_tensor")
    run(["git", "add", "--all"], repo)
    run(["git", "commit", "--quiet", "-m", "per-tensor weights"], repo)
    write_revision(repo, images, "per_channel")
    run(["dvc", "plots", "diff", "HEAD", "--html-template", str(TEMPLATE), "-o", "page"], repo)
    page = repo / "page" / "index.html"
    return {"repo": repo, "plots": plots, "page": page, "html": page.read_text(), "dom": chromium(page, "--dump-dom")}


def test_dvc_yaml_plots_the_plot_stage_data(rendered):
    plotted = {name for definition in rendered["plots"] for name in plot_files(definition)}
    assert {f"data/plots/{name}" for name in CSVS} <= plotted


def test_page_loads_nothing_from_the_network(rendered):
    assert not re.search(r"<script[^>]+src=", rendered["html"]), "the page still loads scripts from elsewhere"
    assert "vegaEmbed" in rendered["html"]


def test_every_vega_plot_renders_a_canvas_for_both_revisions(rendered):
    vega_plots = [d for d in rendered["plots"] if not plot_files(d)[0].lower().endswith(IMAGE_SUFFIXES)]
    embedded = re.findall(r'class="vega-embed[^"]*"', rendered["dom"])
    canvases = re.findall(r'<canvas[^>]*class="marks"', rendered["dom"])
    assert len(embedded) == len(canvases) == len(vega_plots) >= 9
    assert rendered["html"].count('"rev": "HEAD"') and rendered["html"].count('"rev": "workspace"')


def test_screenshot_is_not_blank(rendered):
    shot = rendered["page"].parent / "shot.png"
    # The first row of plots: unrendered, DVC's plot divs are empty and the page is white.
    chromium(rendered["page"], "--hide-scrollbars", "--window-size=1200,700", f"--screenshot={shot}")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 250).mean() > 0.02  # axes, grid, lines and labels


def test_dvc_default_page_renders_nothing_offline(rendered):
    """The control: the same plots without the template load vega from a CDN, so offline no plot renders."""
    run(["dvc", "plots", "show", "-o", "default-page"], rendered["repo"])
    dom = chromium(rendered["repo"] / "default-page" / "index.html", "--dump-dom")
    assert "cdn.jsdelivr.net" in dom and not re.findall(r"<canvas", dom)
