"""One error type for bad input, so every front end (CLI, ComfyUI, Python) shows the same clear message.

A `DistilleryError` names the field, the value that was given and the fix. The CLI prints it and exits with
status 2; the ComfyUI nodes let it propagate so ComfyUI shows it on the node and the server keeps running.
"""

from __future__ import annotations


class DistilleryError(ValueError):
    """Bad input: says which field, what value, what is wrong and how to fix it."""

    def __init__(self, field: str, value: object, problem: str, fix: str = ""):
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        message = f"{field}={shown}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)

    def to_dict(self) -> dict:
        return {"field": self.field, "value": str(self.value), "problem": self.problem, "fix": self.fix,
                "message": str(self)}


class StopRequested(Exception):
    """Raised inside long jobs when the caller's stop flag is set (ComfyUI Cancel, Ctrl-C in the CLI).

    Jobs catch it at a safe point, save what must not be lost (a resumable checkpoint, the rows already
    written), and re-raise so the front end can report the interruption.
    """
