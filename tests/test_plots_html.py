"""The plain `dvc plots diff` / `dvc plots show`, configured as set-up configures them, draw every plot offline.

Set-up (``make install``) runs plot_templates/build_offline_template.py: it writes
plot_templates/offline.html (vega, vega-lite and vega-embed inlined, from
vl-convert-python) and sets ``plots.html_template`` in .dvc/config.local. Here
the same script's ``build`` sets up a throwaway repo the same way, and the pages
DVC writes there, with no ``--html-template`` flag, are drawn in headless
Chromium with every request sent to a closed port. Needs Chromium (Debian:
``apt-get install chromium``); skipped without it.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.plots import read_training_curves, write_plots
from pipeline.quant.mixed_precision import (
    layer_sensitivity,
    noise_by_layer,
    size_accuracy_curve,
    weight_quantized_accuracy,
)
from pipeline.quant.settings import SigmaSettings, WeightCalibration
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize
from stages.sensitivity import write_plot_data
from tests.project_copy import PROJECT_ROOT, run
from tests.test_plots import CSVS, synthetic_artifacts

pytestmark = pytest.mark.slow

BUILDER_PATH = PROJECT_ROOT / "plot_templates" / "build_offline_template.py"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
# No network (every request goes to a closed local port), no first-run or sync machinery; virtual time
# lets vega's asynchronous rendering finish.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--proxy-server=127.0.0.1:9",
                  "--virtual-time-budget=5000"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")


def load_builder():
    """plot_templates/build_offline_template.py as a module (plot_templates/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_offline_template", BUILDER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = load_builder()


def plot_files(definition: str | dict) -> list[str]:
    """The data files a dvc.yaml plot definition reads: its id, or the files named under its y."""
    plot_id, props = (definition, {}) if isinstance(definition, str) else next(iter(definition.items()))
    y = (props or {}).get("y")
    return list(y) if isinstance(y, dict) else [plot_id]


def vega_plots(plots: list) -> list:
    return [d for d in plots if not plot_files(d)[0].lower().endswith(IMAGE_SUFFIXES)]


def write_revision(repo: Path, images: torch.Tensor, granularity: str) -> None:
    """The plot stage's and the sensitivity stage's plot data of one revision."""
    artifacts = synthetic_artifacts(repo / "data", images, "net", granularity)
    meta = {"bits": 8, "calibrator": "sigma", "options": {"k": 3.0}, "granularity": granularity}
    plots = repo / "data" / "plots"
    write_plots(artifacts["graph"], artifacts["quantized"], meta, artifacts["profile"], artifacts["metrics"],
                read_training_curves(repo / "data" / "training"), plots)
    graph, labels = artifacts["graph"], torch.arange(len(images)) % 10
    x = normalize(images, SEED_MEAN, SEED_STD)
    calibration = WeightCalibration("sigma", SigmaSettings(3.0), granularity)
    table = layer_sensitivity(graph, x, labels, [2, 4, 8], calibration, progress=False)
    curve = size_accuracy_curve(graph, x, labels, noise_by_layer(table), [8, 4], calibration)
    write_plot_data(table, curve, weight_quantized_accuracy(graph, x, labels, {}), plots)


def chromium(page: Path, *args: str) -> str:
    profile = page.parent / "chromium-profile"
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def local_template_setting(repo: Path) -> str | None:
    result = run(["dvc", "config", "--local", builder.CONFIG_KEY], repo, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    root = tmp_path_factory.mktemp("plots")
    repo = root / "repo"
    repo.mkdir()
    run(["git", "init", "--quiet", "--initial-branch=main"], repo)
    run(["dvc", "init", "--quiet"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the custom vega-lite templates
    plots = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["plots"]
    # Only the plots section: the page is drawn from plot data, no stage needs to run.
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    (repo / ".gitignore").write_text(f"/{builder.TEMPLATE_NAME.as_posix()}\n")  # build output, as in the project
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_revision(repo, images, "per_tensor")
    run(["git", "add", "--all"], repo)
    run(["git", "commit", "--quiet", "-m", "per-tensor weights"], repo)
    write_revision(repo, images, "per_channel")
    # A checkout without set-up, for the control: DVC's own default page.
    control = root / "control"
    shutil.copytree(repo, control)

    builder.build(repo)  # the set-up step: the template, and plots.html_template in .dvc/config.local
    # The plain commands, no --html-template: diff from the repo root, show from a subdirectory (DVC
    # resolves the relative setting against .dvc/, not the working directory).
    run(["dvc", "plots", "diff", "HEAD", "-o", "page"], repo)
    (repo / "data" / "plots" / "show").mkdir()
    run(["dvc", "plots", "show", "-o", str(repo / "show-page")], repo / "data" / "plots" / "show")
    pages = {name: repo / name / "index.html" for name in ("page", "show-page")}
    return {"repo": repo, "control": control, "plots": plots, "page": pages["page"],
            "html": {name: page.read_text() for name, page in pages.items()},
            "dom": {name: chromium(page, "--dump-dom") for name, page in pages.items()}}


def test_dvc_yaml_plots_the_plot_stage_data(rendered):
    plotted = {name for definition in rendered["plots"] for name in plot_files(definition)}
    assert {f"data/plots/{name}" for name in CSVS} <= plotted


def test_set_up_configures_dvc_locally(rendered):
    """The setting lives in the git-ignored .dvc/config.local, pointing at the template relative to .dvc/."""
    repo = rendered["repo"]
    assert local_template_setting(repo) == "../plot_templates/offline.html"
    assert (repo / ".dvc" / "../plot_templates/offline.html").resolve() == repo / "plot_templates" / "offline.html"
    assert "html_template" not in (repo / ".dvc" / "config").read_text()
    assert run(["git", "check-ignore", "--quiet", ".dvc/config.local"], repo, check=False).returncode == 0
    assert run(["git", "status", "--porcelain", "--", ".dvc", "plot_templates"], repo).stdout == ""
    # Running set-up again changes nothing.
    assert "already" in builder.configure(repo)


def test_pages_load_nothing_from_the_network(rendered):
    for name in ("page", "show-page"):
        for text in (rendered["html"][name], rendered["dom"][name]):
            assert not re.search(r"<script[^>]+src=", text), f"{name} still loads scripts from elsewhere"
        assert "cdn.jsdelivr.net" not in rendered["html"][name]
        assert "vegaEmbed('#" in rendered["html"][name]  # DVC's own plot scripts, filled into the template


def test_every_vega_plot_renders_a_canvas_for_both_revisions(rendered):
    embedded = re.findall(r'class="vega-embed[^"]*"', rendered["dom"]["page"])
    canvases = re.findall(r'<canvas[^>]*class="marks"', rendered["dom"]["page"])
    assert len(embedded) == len(canvases) == len(vega_plots(rendered["plots"])) >= 9
    assert rendered["html"]["page"].count('"rev": "HEAD"') and rendered["html"]["page"].count('"rev": "workspace"')


def test_plain_show_renders_every_vega_plot(rendered):
    canvases = re.findall(r'<canvas[^>]*class="marks"', rendered["dom"]["show-page"])
    assert len(canvases) == len(vega_plots(rendered["plots"]))


def test_screenshot_is_not_blank(rendered):
    shot = rendered["page"].parent / "shot.png"
    # The first row of plots: unrendered, DVC's plot divs are empty and the page is white.
    chromium(rendered["page"], "--hide-scrollbars", "--window-size=1200,700", f"--screenshot={shot}")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 250).mean() > 0.02  # axes, grid, lines and labels


def test_dvc_default_page_renders_nothing_offline(rendered):
    """The control: the same plots without set-up load vega from a CDN, so offline no plot renders."""
    control = rendered["control"]
    assert local_template_setting(control) is None
    run(["dvc", "plots", "show", "-o", "default-page"], control)
    dom = chromium(control / "default-page" / "index.html", "--dump-dom")
    assert "cdn.jsdelivr.net" in dom and not re.findall(r"<canvas", dom)


def test_a_configured_template_that_is_missing_breaks_plots_show(rendered, tmp_path):
    """Why the setting is local, not in the committed .dvc/config: before set-up builds the template,
    DVC takes the missing path for the template's text and `dvc plots show` fails."""
    checkout = shutil.copytree(rendered["control"], tmp_path / "checkout")
    run(["dvc", "config", "--local", builder.CONFIG_KEY, builder.CONFIG_VALUE], checkout)
    result = run(["dvc", "plots", "show", "-o", "page"], checkout, check=False)
    assert result.returncode != 0
    assert "HTML template has to contain '{plot_divs}'" in result.stderr


def test_set_up_keeps_a_template_the_user_configured(rendered, tmp_path):
    checkout = shutil.copytree(rendered["control"], tmp_path / "checkout")
    run(["dvc", "config", "--local", builder.CONFIG_KEY, "my.html"], checkout)
    assert "kept" in builder.configure(checkout)
    assert local_template_setting(checkout) == "my.html"
