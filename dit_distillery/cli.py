"""The headless command line: `python -m dit_distillery <command> [--json] ...`.

Command modules import only the standard library and light core modules at their top (torch, diffusers,
transformers, peft and accelerate only inside `run`), so `--help` and argument errors answer at once and a
command's heavy dependencies load only when it runs (tests/test_cli_fast.py checks it). Every command prints a
human-readable summary, or exactly one JSON object with `--json`. Bad input (`DistilleryError`) exits with
status 2 and a message naming the field, the value and the fix.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .errors import DistilleryError, StopRequested

# command name -> module in dit_distillery.commands
COMMANDS = {
    "build-aaadit": "build_aaadit",
    "shrink": "shrink",
    "report": "report",
    "gen-dataset": "gen_dataset",
    "train": "train",
    "sample": "sample",
    "load-student": "load_student",
    "evaluate": "evaluate",
    "demo": "demo",
    "recipe": "recipe",
}


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" once: not where the help text already states its default, nor for None/False/""."""

    def _get_help_string(self, action):
        text = action.help or ""
        stated = "(default" in text or "default:" in text
        if stated or not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _load(command: str):
    return importlib.import_module(f"dit_distillery.commands.{COMMANDS[command]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    installed = Path(sys.argv[0]).stem == "dit-distillery"  # the console script pyproject declares
    parser = argparse.ArgumentParser(
        prog="dit-distillery" if installed else "python -m dit_distillery",
        description="DiT Distillery: shrink, build, distill and train diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        if command is not None and name != command:
            sub.add_parser(name, add_help=False)  # listed, not loaded
            continue
        module = _load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=HelpFormatter)
        p.add_argument("--json", action="store_true", help="print one JSON report instead of text")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _print_report(report: dict) -> None:
    for key, value in report.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        report = args._module.run(args)
    except DistilleryError as exc:
        if args.json:
            print(json.dumps({"error": exc.to_dict()}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StopRequested, KeyboardInterrupt):
        print("stopped: progress so far was saved; run the same command again to resume.", file=sys.stderr)
        return 130
    if report is None:  # e.g. a non-main process of a multi-process run
        return 0
    if args.json:
        print(json.dumps(report, default=str))
    else:
        _print_report(report)
    return 0
