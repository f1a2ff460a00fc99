"""Build plot_templates/offline.html (DVC's plots page with vega inlined) and make DVC use it.

`dvc plots show` and `dvc plots diff` write a page that loads vega, vega-lite and
vega-embed from a CDN, so without a network it renders blank. This script writes
a page template with the three libraries inlined (about 0.9 MB) and without
DVC's ``{scripts}`` placeholder, where the CDN tags would go, then points DVC's
``plots.html_template`` option at it, so the plain commands render offline:

    python plot_templates/build_offline_template.py   # `make install` runs it
    dvc plots show

The JavaScript comes from the vl-convert-python package (a project dependency):
``vl_convert.javascript_bundle`` returns one self-contained script with vega,
vega-lite and vega-embed; with the snippet below it defines ``window.vega``,
``window.vegaLite`` and ``window.vegaEmbed``, the global DVC's plot scripts
call (``vegaEmbed('#id', spec)``, inline, while the page loads, so the bundle is
a classic script in <head>, not a deferred module). No npm, no network.
The template is git-ignored: it is build output, 0.9 MB of third-party code.

The option goes into .dvc/config.local (``dvc config --local``), which DVC
git-ignores, not into the committed .dvc/config: DVC reads a configured
template that does not exist as the template's text itself and then fails
(``HTML template has to contain '{plot_divs}'``), so a committed entry would
break `dvc plots show` in every checkout that has not run the set-up yet.
DVC resolves a relative ``plots.html_template`` against the .dvc/ folder,
hence ``../plot_templates/offline.html``; relative, it survives moving the checkout.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.io import atomic_path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_NAME = Path("plot_templates") / "offline.html"
TEMPLATE = ROOT / TEMPLATE_NAME
CONFIG_KEY = "plots.html_template"
# DVC joins a relative plots.html_template onto the repo's .dvc/ folder, not onto the repo root.
CONFIG_VALUE = (Path("..") / TEMPLATE_NAME).as_posix()

# DVC fills these by plain text replacement; inlined code must not contain them.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
# The specs DVC's templates (and .dvc/plots/*.json) write declare vega-lite v5: bundle the newest v5
# that vl-convert ships, so vega-embed compiles them with the vega-lite major they were written for.
VEGA_LITE_MAJOR = "5"
# Bundled with the libraries (in their module scope). DVC's plot scripts call the global
# `vegaEmbed('#id', spec)`; vega-embed 7 (in the bundle) draws SVG by default, vega-embed 6 (DVC's CDN
# page) a canvas: default to canvas as DVC's page does, lighter for the histograms' thousands of marks.
SNIPPET = """\
window.vega = vega;
window.vegaLite = vegaLite;
window.vegaEmbed = (el, spec, opts = {}) => vegaEmbed(el, spec, {renderer: "canvas", ...opts});
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {versions}: inlined by plot_templates/build_offline_template.py from vl-convert-python {vl_convert}, no network needed -->
    <script>
{script}
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def _vl_convert():
    try:
        import vl_convert
    except ImportError:
        sys.exit("vl-convert-python is not installed in this Python: run `make install`, "
                 "or run this script with .venv/bin/python")
    return vl_convert


def vega_lite_version(available: list[str]) -> str:
    """The newest vega-lite ``VEGA_LITE_MAJOR``.x among vl-convert's versions (like "5.21")."""
    candidates = [v for v in available if v.split(".")[0] == VEGA_LITE_MAJOR]
    if not candidates:
        sys.exit(f"this vl-convert-python ships no vega-lite {VEGA_LITE_MAJOR}.x (only {', '.join(available)})")
    return max(candidates, key=lambda v: tuple(int(part) for part in v.split(".")))


def bundle() -> tuple[str, dict[str, str]]:
    """vl-convert's vega + vega-lite + vega-embed script, checked for inlining, and the versions in it."""
    vlc = _vl_convert()
    vl_version = vega_lite_version(vlc.get_vegalite_versions())
    code = vlc.javascript_bundle(SNIPPET, vl_version=vl_version)
    where = f"vl_convert.javascript_bundle(SNIPPET, vl_version={vl_version!r})"
    # Inside <script>, "</script" ends the element early and "<!--" can start HTML's escaped-script states.
    for marker in ("</script", "<!--"):
        if marker in code.lower():
            sys.exit(f"{where} contains {marker!r}, which would break the inline <script>")
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in code:
            sys.exit(f"{where} contains {placeholder!r}, which DVC would replace")
    if "window.vegaEmbed" not in code:
        sys.exit(f"{where} does not define window.vegaEmbed, which DVC's plot scripts call")
    # The exact vega-lite release compiled in (its `version` constant); vega and vega-embed as vl-convert reports.
    exact = re.search(r'"(%s\.\d+)"' % re.escape(vl_version), code)
    versions = {"vega": vlc.get_vega_version(), "vega-lite": exact.group(1) if exact else vl_version,
                "vega-embed": vlc.get_vega_embed_version()}
    return code, versions


def render() -> str:
    """The template's text."""
    import importlib.metadata

    code, versions = bundle()
    # A function scope: the bundle's hundreds of top-level minified names (n, t, e, ...) stay out of the
    # page's globals, where they could clash with DVC's `var spec` scripts; strict, like the ES module it was.
    script = f'(function () {{\n"use strict";\n{code}\n}})();'
    page = PAGE.format(versions=", ".join(f"{name} {version}" for name, version in versions.items()),
                       vl_convert=importlib.metadata.version("vl-convert-python"), script=script)
    for placeholder, count in (("{plot_divs}", 1), ("{refresh_tag}", 1), ("{scripts}", 0)):
        if page.count(placeholder) != count:
            sys.exit(f"the template has {page.count(placeholder)} {placeholder!r}, not {count}")
    return page


def write_template(path: Path = TEMPLATE) -> int:
    """Write the template to ``path`` atomically (a reader never sees half a file); its size in bytes."""
    data = render().encode("utf-8")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """This Python's DVC (the venv's, whatever is on PATH), offline settings on."""
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=check,
                          capture_output=True, text=True)


def configure(repo: Path = ROOT) -> str:
    """Point ``repo``'s DVC at its plot_templates/offline.html through .dvc/config.local; what it did.

    A different template the user set in config.local is left alone.
    """
    current = _dvc(repo, "config", "--local", CONFIG_KEY, check=False)
    value = current.stdout.strip() if current.returncode == 0 else None
    if value == CONFIG_VALUE:
        return f"{CONFIG_KEY} = {CONFIG_VALUE} (already in .dvc/config.local)"
    if value:
        return f"kept {CONFIG_KEY} = {value} in .dvc/config.local (not {CONFIG_VALUE}); `dvc config --local --unset {CONFIG_KEY}` and rerun to use it"
    try:
        _dvc(repo, "config", "--local", CONFIG_KEY, CONFIG_VALUE)
    except subprocess.CalledProcessError as error:
        sys.exit(f"dvc config --local {CONFIG_KEY} {CONFIG_VALUE} failed in {repo}:\n{error.stderr}")
    return f"set {CONFIG_KEY} = {CONFIG_VALUE} in .dvc/config.local"


def build(repo: Path = ROOT) -> str:
    """The whole set-up step for ``repo``: write its template, then configure its DVC to use it."""
    template = repo / TEMPLATE_NAME
    size = write_template(template)
    try:
        configured = configure(repo)
    except BaseException:
        template.unlink(missing_ok=True)  # so that make, seeing no template, runs the whole step again
        raise
    return f"wrote {TEMPLATE_NAME.as_posix()} ({size:,} bytes); {configured}"


def main() -> None:
    print(build(ROOT))


if __name__ == "__main__":
    main()
