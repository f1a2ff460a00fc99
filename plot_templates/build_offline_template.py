"""Build plot_templates/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` writes a page that loads these three libraries from a CDN, so
without a network it renders blank. This template has them inlined (about
0.8 MB) and leaves out DVC's ``{scripts}`` placeholder, where the CDN tags
would go, so the page renders from the file alone:

    python plot_templates/build_offline_template.py
    dvc plots show --html-template plot_templates/offline.html

The libraries come from the npm registry through ``npm pack`` (Node.js'
client), pinned by version and by the tarball's sha512 integrity, and are
kept in .cache/vega/; once the tarballs are there no network is needed. The
generated template is git-ignored: it is build output, 0.8 MB of third-party code.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "vega"
TEMPLATE = ROOT / "plot_templates" / "offline.html"

# In load order: vega-lite needs vega, vega-embed needs both. Versions within the majors dvc-render's
# specs target (vega 5, vega-lite 5, vega-embed 6); integrity as the npm registry publishes it.
PACKAGES = (
    ("vega", "5.33.1",
     "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    ("vega-lite", "5.23.0",
     "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    ("vega-embed", "6.29.0",
     "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
)
# DVC fills these by plain text replacement; inlined code must not contain them.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {versions}: inlined by plot_templates/build_offline_template.py, no network needed -->
{scripts}
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def integrity(path: Path) -> str:
    """npm's integrity string of a file: sha512, base64."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch(name: str, version: str, expected: str) -> Path:
    """The verified tarball of ``name@version`` in the cache, packed by npm if it is not there yet."""
    tarball = CACHE / f"{name}-{version}.tgz"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", "--prefer-offline", "--pack-destination", str(CACHE), f"{name}@{version}"],
                           check=True, capture_output=True, text=True)
        except FileNotFoundError:
            sys.exit("npm (Node.js) is needed once to fetch vega, vega-lite and vega-embed; install it, or put "
                     f"{tarball.name} from the npm registry into {CACHE}")
        except subprocess.CalledProcessError as error:
            sys.exit(f"npm pack {name}@{version} failed:\n{error.stderr}")
    actual = integrity(tarball)
    if actual != expected:
        tarball.unlink()  # a corrupt or substituted download must not be reused
        sys.exit(f"{tarball}: integrity {actual} does not match the pinned {expected}; deleted it, run again")
    return tarball


def browser_script(tarball: Path, name: str) -> str:
    """The minified browser build inside the npm tarball (read in memory: nothing is extracted)."""
    member = f"package/build/{name}.min.js"
    with tarfile.open(tarball, "r:gz") as archive:
        code = archive.extractfile(member).read().decode("utf-8")
    if "</script" in code.lower():
        sys.exit(f"{tarball.name}:{member} contains '</script', which would end the inline script early")
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in code:
            sys.exit(f"{tarball.name}:{member} contains {placeholder!r}, which DVC would replace")
    return code


def render() -> str:
    scripts = "\n".join(
        f"    <script>/* {name} {version} */\n{browser_script(fetch(name, version, expected), name)}\n    </script>"
        for name, version, expected in PACKAGES
    )
    versions = ", ".join(f"{name} {version}" for name, version, _ in PACKAGES)
    return PAGE.format(versions=versions, scripts=scripts)


def main() -> None:
    page = render()
    fd, tmp = tempfile.mkstemp(dir=TEMPLATE.parent, prefix=".offline.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(page)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; it is a page for any local browser
    os.replace(tmp, TEMPLATE)
    print(f"wrote {TEMPLATE.relative_to(ROOT)} ({len(page.encode()) / 1e6:.2f} MB): "
          + json.dumps({name: version for name, version, _ in PACKAGES}))


if __name__ == "__main__":
    main()
