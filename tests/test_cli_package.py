"""What pyproject.toml promises: the Registry icon exists, and the `dit-distillery` command runs from anywhere."""

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _value(key: str) -> str:
    """A `key = "value"` line of pyproject.toml (tomllib is 3.11+; we support 3.10)."""
    match = re.search(rf'^{re.escape(key)}\s*=\s*"([^"]+)"', PYPROJECT, re.MULTILINE)
    assert match, key
    return match.group(1)


def test_the_registry_icon_is_a_square_png_in_the_repo():
    url = _value("Icon")
    repo = _value("Repository").removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert url.startswith(prefix), url  # served from this repository's main branch
    path = ROOT / url.removeprefix(prefix)
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run python scripts/make_workflow_thumbnails.py --icon"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == image.height >= 128
        assert len(set(image.convert("L").resize((32, 32)).getdata())) > 8  # a drawing, not a blank
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_workflow_thumbnails
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert make_workflow_thumbnails.ICON == path  # the script redraws the file the URL names


def test_the_console_script_names_the_cli_entry_point():
    target = _value("dit-distillery")
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is importlib.import_module("dit_distillery.cli").main


def test_the_command_runs_outside_the_clone(tmp_path):
    """From another folder: `python -m dit_distillery` with the package importable, and the installed command
    (setup.sh installs the package editable) where it is installed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dit_distillery", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "build-aaadit" in proc.stdout
    try:
        installed = importlib.metadata.distribution("dit-distillery")
    except importlib.metadata.PackageNotFoundError:
        return  # a plain clone: nothing installed to check
    scripts = {e.name: e.value for e in installed.entry_points if e.group == "console_scripts"}
    assert scripts.get("dit-distillery") == _value("dit-distillery")
    command = shutil.which("dit-distillery", path=str(Path(sys.executable).parent))
    assert command, "the package is installed but its dit-distillery script is not beside this Python"
    proc = subprocess.run([command, "build-aaadit", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dit-distillery build-aaadit")
