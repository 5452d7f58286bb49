"""The command line answers `--help` and argument errors without importing the heavy libraries, and its help
texts state each default once (never "default: None")."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dit_distillery.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")

# argv -> expected exit status; every call must leave the heavy libraries unimported
CALLS = [
    (["--help"], 0),
    ([], 0),
    *[([name, "--help"], 0) for name in COMMANDS],
    (["no-such-command"], 2),
    (["build-aaadit", "--preset", "no-such-preset"], 2),
    (["build-aaadit", "--width", "wide"], 2),
    (["sample", "--out", "x.png"], 2),  # --prompt missing
    (["shrink", "src.safetensors", "--strategy", "no-such-strategy"], 2),
    (["report"], 2),
    (["train", "job.json", "--steps", "many"], 2),
    (["gen-dataset", "--out", "d"], 2),  # neither --prompts nor --synthetic-prompts
    (["load-student", "--strength", "strong"], 2),
    (["demo", "--preset", "no-such-preset"], 2),
    (["evaluate", "--out", "o", "--steps", "many"], 2),
    (["evaluate", "--out", "o"], 2),  # no held-out prompts: refused before torch is imported
    (["recipe", "no-such-recipe", "--base", "b", "--out", "o", "--prompts", "p"], 2),
    (["recipe", "keep-lora-few-step", "--base", "b", "--out", "o"], 2),  # no prompts
]

_PROBE = """
import contextlib, io, json, sys
from dit_distillery.cli import main
heavy = set(json.loads(sys.argv[1]))
results = []
for argv, _ in json.loads(sys.argv[2]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append([argv, code, sorted(m for m in sys.modules if m.split(".")[0] in heavy)])
print(json.dumps(results))
"""


def test_help_and_argument_errors_import_no_heavy_library():
    """Each call in a fresh interpreter: the libraries loaded after it (cumulative, so the first offender shows)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(CALLS)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    results = json.loads(out.strip().splitlines()[-1])
    for (argv, expected), (_, code, loaded) in zip(CALLS, results):
        assert code == expected, (argv, code)
        assert loaded == [], f"`python -m dit_distillery {' '.join(argv)}` imported {loaded[:5]}"


def test_module_entry_point_help_imports_no_heavy_library():
    """The real `python -m dit_distillery --help`, with Python's own import log."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dit_distillery", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "build-aaadit" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "dit_distillery.cli" in imported  # the log is real, so an empty heavy list means something
    assert not [m for m in imported if m.split(".")[0] in HEAVY]


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def _option_entries(help_text: str) -> list[str]:
    """One string per option/positional of a help text (its invocation line plus wrapped continuation lines)."""
    body = help_text.split("\n\n", 2)[-1]
    return [entry for entry in re.split(r"\n(?=  \S)", body) if entry.strip()]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_states_each_default_once(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    text = _subparsers()[command].format_help()
    entries = _option_entries(text)
    assert any("--json" in e for e in entries)
    for entry in entries:
        flat = " ".join(entry.split())
        assert flat.count("(default:") <= 1, flat
        for empty in ("default: None", "(default: False)", "(default: )"):
            assert empty not in flat, flat


def test_help_shows_real_defaults():
    text = " ".join(_subparsers()["gen-dataset"].format_help().split())
    assert "teacher denoising steps (default: 40)" in text
    assert "image height in pixels (default: the pipeline's)" in text  # stated by hand, not repeated


def test_help_name_lists_match_the_core_tables():
    """report and shrink list names whose tables live beside torch; these must not drift from them."""
    from dit_distillery import lora_presets, report, shrink
    from dit_distillery.commands import report as report_cmd
    from dit_distillery.commands import shrink as shrink_cmd

    assert report_cmd.MODEL_PRESETS == tuple(report.PRESETS)
    assert report_cmd.LORA_PRESET_NAMES == tuple(lora_presets.LORA_PRESETS)
    assert shrink_cmd.STRATEGIES == tuple(shrink.STRATEGIES)
    assert shrink_cmd.WIDTH_METHODS == tuple(shrink.WIDTH_METHODS)
