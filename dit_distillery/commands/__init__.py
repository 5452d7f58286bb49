"""CLI commands: one module per command, each a thin adapter over the core (like `nodes/` for ComfyUI).

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> dict`; the dict is the
command's report, printed as JSON with `--json` or as readable lines otherwise.
"""
