"""The README and the docs pages (docs/*.md, the mkdocs site) say what the project does, as written.

Their Python example runs on a tiny dataset, their shell blocks work as pasted, their links resolve, the
metric keys they name are the ones the evaluate stage writes, and the site builds with `mkdocs build --strict`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.arrays import CifarArrays, save_arrays

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = (README, *sorted(DOCS.glob("*.md")))  # every markdown page a reader sees: the README and the site's


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def python_api_example() -> str:
    return fenced_blocks((DOCS / "python-api.md").read_text(), "python")[0]


def test_python_api_example_runs_on_tiny_data(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), np.arange(count, dtype=np.int64) % 10

    train_images, train_labels = split(64)
    test_images, test_labels = split(20)
    save_arrays(
        CifarArrays(train_images, train_labels, test_images, test_labels, tuple(f"c{i}" for i in range(10))),
        tmp_path / "data/dataset.npz",
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(python_api_example(), str(DOCS / "python-api.md"), "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"fp32 accuracy \d+\.\d\d%", printed)
    assert re.search(r"full int8 accuracy \d+\.\d\d%", printed)
    assert "conv1 int8 weights (6, 3, 5, 5)" in printed


def test_the_own_model_page_shows_the_model_file_it_runs():
    """docs/your-model.md runs `train.model=models/example.py:TinyResNet`: the code it shows is that file's."""
    shown = fenced_blocks((DOCS / "your-model.md").read_text(), "python")[0]
    source = (ROOT / "models/example.py").read_text()
    assert source.endswith(shown) and source[: -len(shown)].count("\n") == 1  # all but the docstring line


ACTIVATE = ". .venv/bin/activate"
NEEDS_THE_VENV = ("dvc", "python", "prefect", "pytest")  # commands whose stages or imports need the venv's packages


def shell_blocks(page: Path) -> list[str]:
    return fenced_blocks(page.read_text(), "bash")


def test_every_shell_block_activates_the_venv_before_a_command_that_needs_it():
    """`.venv/bin/dvc ...` from a fresh shell runs its stages with the system python (no torch): the README
    and the docs activate the venv in each block that needs it, so every block works as pasted."""
    offenders = []
    for page in PAGES:
        for block in shell_blocks(page):
            activated = False
            for line in block.splitlines():
                command = line.strip()
                activated |= command.startswith(ACTIVATE)
                if command.startswith(".venv/bin/") or (command.split(" ", 1)[0] in NEEDS_THE_VENV and not activated):
                    offenders.append(f"{page_name(page)}: {command}")
    assert shell_blocks(README) and offenders == []


def test_a_stage_run_by_a_python_without_the_project_packages_says_how_to_fix_it():
    # -S: no site-packages, as a system python without the project's packages.
    result = subprocess.run([sys.executable, "-S", "-m", "stages.check_params"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "lacks torch, numpy, ruamel.yaml: the project's venv is not first on PATH. Activate it first" in result.stderr


def offline_steps(page: Path) -> list[str]:
    return [line for block in shell_blocks(page) for line in block.splitlines()
            if line.startswith("sed -i") and "source:" in line]


def test_ci_uses_the_readmes_offline_step_word_for_word():
    offline_step = offline_steps(README)[0]
    for script in (".ci/run", ".ci/e2e-mirror.sh"):
        assert offline_step in (ROOT / script).read_text().splitlines(), script
    # A page that repeats the step repeats it word for word.
    assert {page_name(page): set(offline_steps(page)) - {offline_step} for page in PAGES} == {
        page_name(page): set() for page in PAGES}


def markdown_section(text: str, heading: str) -> str:
    """From `heading`'s line to the next heading of the same or a higher level (fenced code skipped)."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(f"\n{heading}\n") + 1
    heading_lines = [match.start() for match in re.finditer(rf"^#{{1,{level}}} ", strip_fenced_code(text), re.MULTILINE)]
    end = min([position for position in heading_lines if position > start], default=len(text))
    return text[start:end]


def test_the_readme_and_the_docs_home_give_the_same_set_up():
    """The set-up is on the README and on the site's home page: one text, its links relative to each page."""
    readme = markdown_section(README.read_text(), "## Set-up: two commands")
    home = markdown_section((DOCS / "index.md").read_text(), "## Set-up: two commands")
    assert readme.replace("](docs/", "](").strip() == home.strip()


def test_the_pages_speak_of_the_project_alone_with_the_metric_names_it_writes():
    texts = {page_name(page): page.read_text() for page in PAGES}
    # No design notes or issues outside the repository: a newcomer has neither.
    assert [name for name, text in texts.items() if "DESIGN.md" in text or "STYLE.md" in text] == []
    assert [name for name, text in texts.items() if re.search(r"\bthe issue\b", text, re.IGNORECASE)] == []
    # Every `section.key` of data/metrics.json a page names is a key the evaluate stage writes.
    metrics = json.loads((ROOT / "data/metrics.json").read_text())
    named = {(name, section, key) for name, text in texts.items()
             for section, key in re.findall(r"`(accuracy|mismatches|size_bytes|agreement)\.(\w+)`", text)}
    assert named, "no page names a metrics.json key"
    assert {(name, f"{section}.{key}") for name, section, key in named if key not in metrics[section]} == set()
    # The accuracy table as `dvc metrics show` prints it: data/accuracy.json's keys; the reference run's (the README's
    # Results, docs/results.md) with its committed values. Other tables are other runs, each with its own provenance.
    accuracy = json.loads((ROOT / "data/accuracy.json").read_text())
    reference_pages = {"README.md": markdown_section(texts["README.md"], "## Results"), "docs/results.md": texts["docs/results.md"]}
    tables = []
    for name, text in (*texts.items(), *((f"{name} (reference)", text) for name, text in reference_pages.items())):
        lines = text.splitlines()
        tables += [(name, *lines[index:index + 2]) for index, line in enumerate(lines)
                   if line.startswith("Path ") and "c_mismatches" in line]
    assert {"README.md (reference)", "docs/results.md (reference)"} <= {name for name, _, _ in tables}
    for name, header, row in tables:
        assert header.split()[1:] == sorted(accuracy), name
        assert row.split()[0] == "data/accuracy.json", name
        if name.endswith("(reference)"):
            assert [float(value) for value in row.split()[1:]] == [accuracy[key] for key in sorted(accuracy)], name


def strip_fenced_code(text: str) -> str:
    """The text with each fenced code block's lines blanked (line numbers and offsets kept)."""
    return re.sub(r"```.*?```", lambda block: re.sub(r"[^\n]", " ", block.group(0)), text, flags=re.DOTALL)


def heading_anchor(heading: str) -> str:
    """The id mkdocs (Python-Markdown's toc) gives a heading, which is GitHub's too for these headings."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(page: Path) -> set[str]:
    return {heading_anchor(heading) for heading in re.findall(r"^#{1,6} +(.+?) *$", strip_fenced_code(page.read_text()),
                                                              re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    """Link and image targets that are not web addresses, outside code."""
    text = re.sub(r"`[^`\n]*`", "", strip_fenced_code(page.read_text()))
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if not linked.exists():
                broken.append(f"{page_name(page)}: {target} (no such file)")
            elif page.parent == DOCS and not linked.is_relative_to(DOCS):
                broken.append(f"{page_name(page)}: {target} (outside docs/, which the site holds alone)")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{page_name(page)}: {target} (no heading #{anchor})")
    assert any(relative_links(page) for page in PAGES) and broken == []


def test_the_site_navigation_lists_every_docs_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = [page for entry in config["nav"] for page in entry.values()]
    assert sorted(listed) == sorted(page.name for page in DOCS.glob("*.md"))
    assert config["docs_dir"] == "docs" and config["theme"] == {"name": "material", "font": False}


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material are the docs extra: pip install -e '.[docs]'")
def test_the_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` fails on a broken link or anchor, a page missing from the nav, or any warning."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site/index.html").is_file() and (tmp_path / "site/python-api.html").is_file()
