"""UI-format workflows -> API-format prompts, and a validator for prompts; both offline, from `/object_info`.

Why by hand: ComfyUI converts in its browser frontend (`graphToPrompt`, TypeScript) and validates on the server
(`execution.validate_inputs`, needs a running ComfyUI with every node importable). Our bundled workflows must be
checked in every test run, without a browser or a server. The conversion follows frontend 1.27's rules
(`comfyui-facts.md` A6, read against the frontend's `executionUtil.ts` / `ExecutableNodeDTO.ts`); the validator
checks what `validate_inputs` checks, a little more strictly (stale workflows should fail our tests, not just
misbehave in a user's ComfyUI).

Not handled (raise `WorkflowError`): subgraphs (`definitions.subgraphs`) and dict-style `widgets_values`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_distillery.errors import DistilleryError

VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})  # frontend-only nodes
MODE_MUTED = 2
MODE_BYPASS = 4
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow or prompt. `kind` is stable, for tests; `message` is for people."""

    node: str
    # unknown_node, widget_count, bad_link, unknown_input, missing_input, bad_value, type_mismatch, no_output,
    # unsupported
    kind: str
    input: str | None
    message: str

    def __str__(self) -> str:
        where = f"node {self.node}" + (f" input {self.input!r}" if self.input else "")
        return f"{where}: {self.message} [{self.kind}]"


class WorkflowError(DistilleryError):
    """A workflow that cannot be converted or does not validate; `problems` lists every reason."""

    def __init__(self, name: str, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("workflow", name, "; ".join(str(p) for p in self.problems),
                         "open the workflow in ComfyUI, fix the named nodes and save it again.")


# ----------------------------------------------------------------------------------------------------------
# Input specs

def _spec(info: dict, name: str) -> tuple[object, dict, str] | None:
    """(type, options, "required"|"optional") of a node input, or None if the node has no such input."""
    for section in ("required", "optional"):
        spec = info.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], options, section
    return None


def _is_combo(input_type) -> bool:
    return isinstance(input_type, list) or input_type == "COMBO"


def combo_options(input_type, options: dict) -> list:
    return list(input_type) if isinstance(input_type, list) else list(options.get("options", []))


def _widget_type(input_type, options: dict, section: str) -> str | None:
    """The widget an input gets in the frontend, or None for a socket-only input."""
    if options.get("forceInput") or (section == "optional" and options.get("defaultInput")):
        return None  # frontend 1.27 migrates optional defaultInput to forceInput
    kind = options.get("widgetType") or ("COMBO" if _is_combo(input_type) else input_type)
    return kind if kind in WIDGET_TYPES else None


@dataclass(frozen=True)
class Widget:
    name: str
    width: int  # values it occupies in `widgets_values`
    control: bool  # the value after it is a control_after_generate word


def widget_layout(info: dict) -> list[Widget]:
    """A node's widgets in the frontend's order (input_order required, then optional).

    Extra values that never reach the prompt: a control_after_generate word after seeds (INT) and combos that
    ask for one (combos also get a filter string), and the "upload" button value after upload combos.
    """
    layout = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            input_type, options, _ = _spec(info, name)
            kind = _widget_type(input_type, options, section)
            if kind is None:
                continue
            width = 1
            wanted = options.get("control_after_generate")
            control = bool(wanted) or (kind == "INT" and wanted is None and name in ("seed", "noise_seed"))
            control = control and kind in ("INT", "COMBO")
            if control:
                width += 1 if kind == "INT" else 2
            if kind == "COMBO" and any(options.get(k) for k in UPLOAD_OPTIONS):
                width += 1
            layout.append(Widget(name, width, control))
    return layout


# ----------------------------------------------------------------------------------------------------------
# UI -> API

def _is_valid_connection(a, b) -> bool:
    """LiteGraph.isValidConnection: equal, wildcard, or overlapping comma-separated type lists."""
    a = 0 if a in ("", "*", None) else a
    b = 0 if b in ("", "*", None) else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    return bool(set(a.split(",")) & set(b.split(",")))


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
        self.links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # workflow schema 1
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = (str(link[1]), int(link[2]), link[5])

    def source(self, link_id, target_type, problems, node_id, name, seen=()):
        """Resolve a link to ('link', [id, slot]) / ('value', v) / None, through Reroute, bypass and primitives."""
        if link_id is None:
            return None
        if link_id not in self.links:
            problems.append(Problem(node_id, "bad_link", name, f"link {link_id} is not in the workflow's links."))
            return None
        origin, slot, _ = self.links[link_id]
        if (origin, slot) in seen:
            problems.append(Problem(node_id, "bad_link", name, "links form a cycle through Reroute/bypassed nodes."))
            return None
        seen = seen + ((origin, slot),)
        node = self.nodes.get(origin)
        if node is None:
            problems.append(Problem(node_id, "bad_link", name, f"link {link_id} comes from missing node {origin}."))
            return None
        inputs = node.get("inputs") or []
        if node.get("mode") == MODE_BYPASS:
            index = self._bypass_slot(node, slot, target_type)
            if index < 0:
                return None
            return self.source(inputs[index].get("link"), target_type, problems, node_id, name, seen)
        if node["type"] == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node["type"] in VIRTUAL_TYPES:  # Reroute: follow its input
            if slot < len(inputs):
                return self.source(inputs[slot].get("link"), target_type, problems, node_id, name, seen)
            return None
        return ("link", [origin, slot])

    @staticmethod
    def _bypass_slot(node: dict, slot: int, target_type) -> int:
        """ExecutableNodeDTO#getBypassSlotIndex: which input a bypassed node passes to output `slot`."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        if target_type in ("*", "", None):
            return slot if len(inputs) > slot else 0
        output_type = outputs[slot].get("type") if slot < len(outputs) else None
        if slot < len(inputs) and _is_valid_connection(inputs[slot].get("type"), output_type) \
                and _is_valid_connection(inputs[slot].get("type"), target_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == target_type:
                return i
        for i, inp in enumerate(inputs):
            if _is_valid_connection(inp.get("type"), output_type) and _is_valid_connection(inp.get("type"), target_type):
                return i
        return -1


def _wrap(value):
    # The frontend wraps list values so the server does not read them as links; the server unwraps them.
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(workflow: dict, object_info: dict, name: str = "workflow") -> dict:
    """The prompt ComfyUI's frontend would queue for a UI-format workflow (`{"<id>": {class_type, inputs, _meta}}`).

    Raises `WorkflowError` when it cannot convert: unknown node types, a `widgets_values` list whose length does
    not match the node's widgets, links to missing nodes, subgraphs.
    """
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError(name, [Problem("-", "unsupported", None, "subgraphs are not supported offline.")])
    graph = _Graph(workflow)
    problems: list[Problem] = []
    prompt = {}
    for node_id, node in graph.nodes.items():
        node_type = node.get("type")
        if node_type in VIRTUAL_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(node_type)
        if info is None:
            problems.append(Problem(node_id, "unknown_node", None, f"node type {node_type!r} does not exist."))
            continue
        inputs = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            problems.append(Problem(node_id, "unsupported", None, "dict-style widgets_values are not supported."))
            continue
        layout = widget_layout(info)
        needed = sum(w.width for w in layout)
        if len(values) != needed:
            problems.append(Problem(node_id, "widget_count", None,
                                    f"{node_type} has {len(values)} widget values; its widgets "
                                    f"{[w.name for w in layout]} need {needed}."))
            continue
        position = 0
        for widget in layout:
            inputs[widget.name] = _wrap(values[position])
            if widget.control and values[position + 1] not in CONTROL_VALUES:
                problems.append(Problem(node_id, "widget_count", widget.name,
                                        f"expected a control_after_generate word after {widget.name!r}, found "
                                        f"{values[position + 1]!r}: widgets_values is misaligned."))
            position += widget.width
        for slot in node.get("inputs") or []:
            resolved = graph.source(slot.get("link"), slot.get("type"), problems, node_id, slot["name"])
            if resolved is not None:
                kind, value = resolved
                inputs[slot["name"]] = value if kind == "link" else _wrap(value)
        title = node.get("title") or info.get("display_name") or node_type
        prompt[node_id] = {"inputs": inputs, "class_type": node_type, "_meta": {"title": title}}
    if problems:
        raise WorkflowError(name, problems)
    for entry in prompt.values():  # links to muted nodes disappear, as in graphToPrompt
        for key, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][key]
    return prompt


# ----------------------------------------------------------------------------------------------------------
# Validation of an API prompt

def _types_match(received, expected) -> bool:
    """comfy_execution.validation.validate_node_input (non-strict), with "*" as the wildcard."""
    if received == expected or "*" in (received, expected):
        return True
    if _is_combo(expected):
        return received == "COMBO"
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _value_problem(input_type, options: dict, value, check_files: bool) -> str | None:
    """Why a constant does not fit an input spec, or None."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if _is_combo(input_type):
        allowed = combo_options(input_type, options)
        if not allowed and not check_files:
            return None  # a file list of a ComfyUI with no such files (offline fixtures): unknowable here
        chosen = value if (options.get("multiselect") and isinstance(value, list)) else [value]
        wrong = [v for v in chosen if v not in allowed]
        shown = allowed if len(allowed) <= 20 else f"{len(allowed)} options"
        return f"{wrong[0]!r} is not one of {shown}." if wrong else None
    if input_type == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            return f"{value!r} is not an integer."
    elif input_type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number."
    elif input_type == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a string."
    elif input_type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a boolean."
    else:
        return f"a constant was given to a {input_type} input, which needs a link."
    if "min" in options and value < options["min"]:
        return f"{value!r} is below the minimum {options['min']}."
    if "max" in options and value > options["max"]:
        return f"{value!r} is above the maximum {options['max']}."
    return None


def validate_prompt(prompt: dict, object_info: dict, check_files: bool = False) -> list[Problem]:
    """Every problem `POST /prompt` would reject (and a few it would let through): [] means valid.

    Combos with an empty option list are file pickers of a ComfyUI that has no such files (as in our offline
    fixtures); their values are only checked with `check_files=True`.
    """
    problems = []
    has_output = False
    for node_id, entry in prompt.items():
        node_type = entry.get("class_type")
        info = object_info.get(node_type)
        if info is None:
            problems.append(Problem(node_id, "unknown_node", None, f"node type {node_type!r} does not exist."))
            continue
        has_output |= bool(info.get("output_node"))
        inputs = entry.get("inputs", {})
        for name, value in inputs.items():
            spec = _spec(info, name)
            if spec is None:
                if name not in info.get("input", {}).get("hidden", {}):
                    problems.append(Problem(node_id, "unknown_input", name, f"{node_type} has no input {name!r}."))
                continue
            input_type, options, _ = spec
            if isinstance(value, list):
                problems.extend(_link_problems(prompt, object_info, node_id, name, value, input_type))
                continue
            why = _value_problem(input_type, options, value, check_files)
            if why:
                problems.append(Problem(node_id, "bad_value", name, why))
        for name in info.get("input", {}).get("required", {}):
            if name not in inputs:
                problems.append(Problem(node_id, "missing_input", name,
                                        f"required input {name!r} of {node_type} is neither linked nor set."))
    if prompt and not has_output:
        problems.append(Problem("-", "no_output", None, "the prompt has no output node, so nothing would run."))
    return problems


def _link_problems(prompt, object_info, node_id, name, value, input_type) -> list[Problem]:
    if len(value) != 2 or not isinstance(value[1], int):
        return [Problem(node_id, "bad_link", name, f"{value!r} is not a [node id, output slot] link.")]
    source_id, slot = str(value[0]), value[1]
    source = prompt.get(source_id)
    if source is None:
        return [Problem(node_id, "bad_link", name, f"links to node {source_id}, which is not in the prompt.")]
    source_info = object_info.get(source.get("class_type"))
    if source_info is None:
        return []  # reported on the source node itself
    outputs = source_info.get("output", [])
    if not 0 <= slot < len(outputs):
        return [Problem(node_id, "bad_link", name,
                        f"links to output {slot} of {source['class_type']}, which has {len(outputs)} outputs.")]
    if not _types_match(outputs[slot], input_type):
        expected = "COMBO" if _is_combo(input_type) else input_type
        return [Problem(node_id, "type_mismatch", name,
                        f"gets {outputs[slot]} from {source['class_type']} (node {source_id}) but needs {expected}.")]
    return []


def check_workflow(workflow: dict, object_info: dict, name: str = "workflow", check_files: bool = False) -> dict:
    """Convert and validate; returns the prompt or raises `WorkflowError` with every problem found."""
    prompt = ui_to_api(workflow, object_info, name)
    problems = validate_prompt(prompt, object_info, check_files)
    if problems:
        raise WorkflowError(name, problems)
    return prompt
