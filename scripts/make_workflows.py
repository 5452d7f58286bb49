"""Write the bundled workflows (`workflows/*.json`, ComfyUI's UI format) from the node definitions.

Why a script: the UI format stores widget values by position, so a hand-edited file silently shifts when a
value is forgotten. Here every node is described by name (`widgets={"steps": 300}`); the rest take the node's
defaults, in the order the frontend uses (`tests/comfyui_support/workflow_api.widget_layout`, which also adds
the control word after seeds), and links are checked for matching types as they are made. The node specs are
our pack's `NODE_CLASS_MAPPINGS` plus the recorded core specs (`tests/comfyui_support/core_object_info.json`),
the same ones `tests/test_workflows.py` validates the files against.

    python scripts/make_workflows.py            # rewrite every workflow
    python scripts/make_workflows.py --check    # exit 1 if a file differs from what the script makes

Thumbnails are drawn from the written files by `scripts/make_workflow_thumbnails.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.comfyui_support import object_info as oi  # noqa: E402
from tests.comfyui_support.workflow_api import _spec, _widget_type, widget_layout  # noqa: E402

OUT = REPO / "workflows"
PACK_ID = "dit-distillery"  # registry id (pyproject name): the frontend offers to install missing nodes by it

# LiteGraph's layout constants (frontend 1.27), used to size nodes as the frontend would.
TITLE_H, SLOT_H, WIDGET_H, MULTILINE_H = 30, 20, 24, 84
MONITOR_H = 380  # js/dit_distillery.js: the training monitor under Train's widgets
NOTE_COLOR, NOTE_BG = "#432", "#653"

QWEN_MODELS = {
    "qwen_image_bf16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/"
                                    "resolve/main/split_files/diffusion_models/qwen_image_bf16.safetensors"),
    "qwen_2.5_vl_7b.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/"
                                   "resolve/main/split_files/text_encoders/qwen_2.5_vl_7b.safetensors"),
    "qwen_image_vae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/"
                                   "resolve/main/split_files/vae/qwen_image_vae.safetensors"),
}
QWEN_FOLDER = "Qwen-Image"  # models/diffusers/Qwen-Image: tokenizer + configs (or the whole download)
QWEN_PIPELINE = dict(source=QWEN_FOLDER, dit_name="qwen_image_bf16.safetensors",
                     text_encoder_name="qwen_2.5_vl_7b.safetensors", vae_name="qwen_image_vae.safetensors")
QWEN_SETUP = f"""### Models (Qwen-Image)
* `models/diffusion_models/qwen_image_bf16.safetensors`, `models/text_encoders/qwen_2.5_vl_7b.safetensors` (bf16:
  the fp8-scaled encoder cannot be read by transformers), `models/vae/qwen_image_vae.safetensors`: the files of
  ComfyUI's own Qwen-Image workflow (Comfy-Org/Qwen-Image_ComfyUI); ComfyUI offers to download them.
* `models/diffusers/{QWEN_FOLDER}/`: from the Qwen/Qwen-Image repository, `model_index.json`, `tokenizer/` and
  `text_encoder/config.json` (the three files above replace its weights). With the whole diffusers download
  there, set the three file widgets of **Load Pipeline** to `[none]`.
"""
# ComfyUI's own Qwen-Image template files, read by the stock loaders (Pipeline from ComfyUI Models makes them ours).
_QWEN_HF = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
QWEN_COMFY_MODELS = {
    "qwen_image_fp8_e4m3fn.safetensors": ("diffusion_models",
                                          _QWEN_HF + "diffusion_models/qwen_image_fp8_e4m3fn.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders",
                                              _QWEN_HF + "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": ("vae", _QWEN_HF + "vae/qwen_image_vae.safetensors"),
}
QWEN_COMFY_DIT, QWEN_COMFY_TE, QWEN_COMFY_VAE = QWEN_COMFY_MODELS
QWEN_COMFY_SETUP = """### Models (ComfyUI's Qwen-Image files)
**Load Diffusion Model**, **Load CLIP** (type `qwen_image`) and **Load VAE** read the files of ComfyUI's own
Qwen-Image template (Comfy-Org/Qwen-Image_ComfyUI; ComfyUI offers to download them):
* `qwen_image_fp8_e4m3fn.safetensors` (20 GB, models/diffusion_models; weight_dtype fp8_e4m3fn keeps it in fp8),
* `qwen_2.5_vl_7b_fp8_scaled.safetensors` (9.4 GB, models/text_encoders),
* `qwen_image_vae.safetensors` (0.25 GB, models/vae).

**Pipeline from ComfyUI Models** makes them the pipeline: prompts are encoded as CLIPTextEncode does, the teacher
is sampled by ComfyUI's own sampler, and training computes with the MODEL's fp8 weights without copying or
changing them. No diffusers folder is needed.
"""
QWEN_PLAN = "`python -m dit_distillery report qwen-image --plan`"  # the memory figures in the notes: its predictions


def _qwen_comfy_pipeline(w, box_width: int = 360) -> tuple[list[dict], dict]:
    """Stock UNETLoader / CLIPLoader / VAELoader with the template's files (and their download links), feeding
    Pipeline from ComfyUI Models; returns (the loaders, the pipeline node)."""
    unet = w.node("UNETLoader", box_width=box_width, models=[QWEN_COMFY_DIT], model_files=QWEN_COMFY_MODELS,
                  unet_name=QWEN_COMFY_DIT, weight_dtype="fp8_e4m3fn")
    clip = w.node("CLIPLoader", box_width=box_width, models=[QWEN_COMFY_TE], model_files=QWEN_COMFY_MODELS,
                  clip_name=QWEN_COMFY_TE, type="qwen_image")
    vae = w.node("VAELoader", box_width=box_width, models=[QWEN_COMFY_VAE], model_files=QWEN_COMFY_MODELS,
                 vae_name=QWEN_COMFY_VAE)
    pipeline = w.node("DD_PipelineFromComfyModels", title="Pipeline from ComfyUI Models (Qwen-Image)",
                      box_width=box_width)
    for loader, output, input_name in ((unet, "MODEL", "model"), (clip, "CLIP", "clip"), (vae, "VAE", "vae")):
        w.connect(loader, output, pipeline, input_name)
    return [unet, clip, vae], pipeline


class Workflow:
    """A UI-format graph under construction (see the module docstring)."""

    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    # -- nodes -----------------------------------------------------------------------------------------------
    def node(self, type: str, /, title: str | None = None, box_width: int = 320, node_mode: int = 0,
             models: list[str] = (), model_files: dict | None = None, **widgets) -> dict:
        """Add a node; `widgets` by name (the rest keep their defaults), `node_mode` 2 = muted; `models`: the
        files it needs, with their folder and download URL from `model_files` (default `QWEN_MODELS`). `type` is
        positional-only: CLIPLoader has a widget named `type`."""
        spec = self.info[type]
        values = []
        for widget in widget_layout(spec):
            input_type, options, _ = _spec(spec, widget.name)
            if widget.name in widgets:
                value = widgets.pop(widget.name)
            elif "default" in options:
                value = options["default"]
            elif isinstance(input_type, list) and input_type:
                value = input_type[0]
            else:
                raise ValueError(f"{type}.{widget.name} has no default: give a value")
            values.append(value)
            if widget.control:
                values += ["fixed"] if _widget_type(input_type, options, "required") == "INT" else ["fixed", ""]
        if widgets:
            raise ValueError(f"{type} has no widgets {sorted(widgets)}")
        sockets = []
        multiline = 0
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                input_type, options, _ = _spec(spec, name)
                if _widget_type(input_type, options, section) is None:
                    sockets.append({"name": name, "type": input_type, "link": None})
                elif options.get("multiline"):
                    multiline += 1
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                   for i, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))]
        rows = max(len(sockets), len(outputs))
        widget_rows = sum(w.width if w.control else 1 for w in widget_layout(spec)) - multiline
        height = rows * SLOT_H + widget_rows * WIDGET_H + multiline * MULTILINE_H + 12
        if type == "DD_TrainLoRAFull":
            height += MONITOR_H
        if type in ("PreviewImage", "SaveImage"):
            height = max(height, 280)
        ours = type.startswith("DD_")
        properties = {"Node name for S&R": type, "cnr_id": PACK_ID if ours else "comfy-core"}
        if models:
            table = QWEN_MODELS if model_files is None else model_files
            properties["models"] = [{"name": name, "url": table[name][1], "directory": table[name][0]}
                                    for name in models]
        entry = {"id": len(self.nodes) + 1, "type": type, "pos": [0, 0], "size": [box_width, height], "flags": {},
                 "order": 0, "mode": node_mode, "inputs": sockets, "outputs": outputs, "properties": properties,
                 "widgets_values": values}
        entry["title"] = title or spec.get("display_name") or type  # readable without the node specs too
        self.nodes.append(entry)
        return entry

    def note(self, text: str, size, title: str = "Read me") -> dict:
        entry = {"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": [0, 0], "size": list(size),
                 "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": title,
                 "properties": {}, "widgets_values": [text.strip()], "color": NOTE_COLOR, "bgcolor": NOTE_BG}
        self.nodes.append(entry)
        return entry

    def columns(self, columns: list[list[dict]], left: int = 0, top: int = 0, gap_x: int = 60,
                gap_y: int = 30) -> None:
        """Place nodes in columns, top to bottom, each below the previous one's body and the next one's title."""
        x = left
        for column in columns:
            y = top
            for node in column:
                node["pos"] = [x, y]
                y += node["size"][1] + TITLE_H + gap_y
            x += max(n["size"][0] for n in column) + gap_x

    def connect(self, source: dict, output: str, target: dict, input: str) -> None:
        slot = self.info[source["type"]]["output_name"].index(output)
        kind = source["outputs"][slot]["type"]
        index = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input)
        wanted = target["inputs"][index]["type"]
        if wanted not in ("*", kind):
            raise TypeError(f"{source['type']}.{output} ({kind}) cannot feed {target['type']}.{input} ({wanted})")
        if target["inputs"][index]["link"] is not None:
            raise ValueError(f"{target['type']}.{input} is already linked")
        link_id = len(self.links) + 1
        self.links.append([link_id, source["id"], slot, target["id"], index, kind])
        target["inputs"][index]["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)

    def group(self, title: str, members: list[dict], color: str, pad: int = 20) -> None:
        left = min(n["pos"][0] for n in members) - pad
        top = min(n["pos"][1] for n in members) - pad - TITLE_H - 34
        right = max(n["pos"][0] + n["size"][0] for n in members) + pad
        bottom = max(n["pos"][1] + n["size"][1] for n in members) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left,
                                                                                     bottom - top],
                            "color": color, "font_size": 24, "flags": {}})

    # -- output ----------------------------------------------------------------------------------------------
    def _orders(self) -> None:
        """The frontend's execution order: a topological order of the links (sources first)."""
        incoming = {n["id"]: {l[1] for l in self.links if l[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [n["id"] for n in self.nodes if n["id"] not in done and incoming[n["id"]] <= set(done)]
            done += ready
        for node in self.nodes:
            node["order"] = done.index(node["id"])

    def to_json(self) -> dict:
        self._orders()
        for node in self.nodes:
            for output in node["outputs"]:
                output["links"] = output["links"] or None
        left = min(n["pos"][0] for n in self.nodes + [{"pos": g["bounding"]} for g in self.groups])
        top = min(n["pos"][1] for n in self.nodes + [{"pos": g["bounding"][:2]} for g in self.groups])
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.55, "offset": [40 - left, 40 - top]}}, "version": 0.4}


# ----------------------------------------------------------------------------------------------------------
# The workflows

SHAPES_PROMPT = "a red circle on a blue background"


def quickstart(info) -> dict:
    """The embedded demo as a graph: CPU, no download, a few minutes."""
    w = Workflow(info)
    note = w.note("""
## DiT Distillery quickstart (CPU, no download, about 5 minutes)
The whole story on the embedded default model:
1. **Synthetic Shapes Dataset**: coloured shapes with captions.
2. **Build AAADiT** (`demo` preset) → **Load Pipeline** (`default`: a pixel codec and a tiny text encoder) →
   **Train** a teacher *from scratch* with flow-matching SFT (full weights).
3. **Generate Distill Dataset**: the teacher samples each prompt with **50 steps, CFG 4** and stores its final
   latents; the rows ask the student for **4 steps, CFG 1**.
4. **Direct Distill Loss** → **Train** a LoRA student through its own 4-step sampler (DiffSynth's Direct Distill).
5. **Load Student** → **Sample**: teacher 50 steps CFG 4 | teacher 4 steps CFG 1 | student 4 steps CFG 1, side
   by side (one row per seed) in `output/dit_distillery/quickstart_compare_*.png`.

The Train nodes show the loss curve, speed, ETA and validation images while they run. Cancel keeps a
checkpoint; queue again and training continues. The step counts are small so this ends in about 5 minutes on
two CPU cores: the teacher learns the colours and rough shapes, and the student gets closer to the teacher's
50-step images than the teacher itself at 4 steps. For a teacher that draws the prompt reliably, give it the
demo's settings: steps 1000, batch_size 32, learning_rate 0.002, warmup_steps 100 (about 4 minutes of training on
2 cores); `python -m dit_distillery demo` runs the whole story in about 10 minutes.
""", (420, 560))
    shapes = w.node("DD_SyntheticShapesDataset", count=256, size=32, seed=0, caption_dropout=0.1)
    preview_shapes = w.node("PreviewImage", title="Training images")
    build = w.node("DD_BuildAAADiT", title="Build AAADiT (teacher init)", preset="demo", seed=0,
                   name="quickstart_teacher_init.safetensors")
    pipeline = w.node("DD_LoadPipeline", source="default")
    fm_loss = w.node("DD_FlowMatchingLoss")
    teacher = w.node("DD_TrainLoRAFull", title="Train teacher (from scratch)", box_width=400,
                     mode="full", output_name="quickstart_teacher", steps=300, batch_size=16,
                     learning_rate=3e-3, lr_schedule="cosine", warmup_steps=30, weight_decay=0.0,
                     gradient_checkpointing=False, save_every=100, save_dtype="fp32",
                     validation_prompts=f"{SHAPES_PROMPT}\na green square on a yellow background",
                     validation_seeds="0, 1", validation_every=100, eval_samples=16, seed=0)
    distill_data = w.node("DD_GenerateDistillDataset", title="Generate Distill Dataset (teacher)", box_width=360,
                          synthetic_prompts=16, seeds_per_prompt=1, start_seed=0, teacher_steps=50,
                          teacher_cfg=4.0, width=32, height=32, student_steps=4, student_cfg=1.0, batch_size=16,
                          output_name="quickstart_distill")
    preview_teacher = w.node("PreviewImage", title="Teacher dataset (50 steps, CFG 4)", box_width=360)
    dd_loss = w.node("DD_DirectDistillLoss", box_width=360)
    student = w.node("DD_TrainLoRAFull", title="Train student LoRA (Direct Distill)", box_width=400,
                     mode="lora", output_name="quickstart_student_lora", steps=20, batch_size=4,
                     learning_rate=2e-3, weight_decay=0.0, lora_rank=16, save_every=0, save_dtype="fp32",
                     validation_prompts=SHAPES_PROMPT, validation_seeds="0, 1", seed=0)
    load_student = w.node("DD_LoadStudent")
    samples = [
        w.node("DD_Sample", title="Teacher: 50 steps, CFG 4", prompt=SHAPES_PROMPT, seed=0, steps=50, cfg=4.0,
               width=32, height=32, batch_size=4),
        w.node("DD_Sample", title="Teacher: 4 steps, CFG 1 (no distillation)", prompt=SHAPES_PROMPT, seed=0,
               steps=4, cfg=1.0, width=32, height=32, batch_size=4),
        w.node("DD_Sample", title="Student: 4 steps, CFG 1", prompt=SHAPES_PROMPT, seed=0, steps=4, cfg=1.0,
               width=32, height=32, batch_size=4),
    ]
    stitch_a = w.node("ImageStitch", spacing_width=2)
    stitch_b = w.node("ImageStitch", spacing_width=2)
    upscale = w.node("ImageScaleBy", upscale_method="nearest-exact", scale_by=4.0)
    save = w.node("SaveImage", title="Teacher 50 | teacher 4 | student 4", box_width=360,
                  filename_prefix="dit_distillery/quickstart_compare")
    w.columns([[note], [shapes, preview_shapes], [build, pipeline, fm_loss], [teacher],
               [distill_data, preview_teacher, dd_loss], [student], [load_student, *samples],
               [stitch_a, stitch_b, upscale, save]])

    w.connect(shapes, "dataset", teacher, "dataset")
    w.connect(shapes, "preview", preview_shapes, "images")
    w.connect(build, "dit", pipeline, "dit")
    w.connect(pipeline, "pipeline", teacher, "pipeline")
    w.connect(fm_loss, "loss", teacher, "loss")
    w.connect(teacher, "model", distill_data, "teacher")
    w.connect(distill_data, "preview", preview_teacher, "images")
    w.connect(teacher, "model", student, "pipeline")
    w.connect(distill_data, "dataset", student, "dataset")
    w.connect(dd_loss, "loss", student, "loss")
    w.connect(student, "model", load_student, "pipeline")
    w.connect(teacher, "model", samples[0], "pipeline")
    w.connect(teacher, "model", samples[1], "pipeline")
    w.connect(load_student, "pipeline", samples[2], "pipeline")
    w.connect(samples[0], "images", stitch_a, "image1")
    w.connect(samples[1], "images", stitch_a, "image2")
    w.connect(stitch_a, "IMAGE", stitch_b, "image1")
    w.connect(samples[2], "images", stitch_b, "image2")
    w.connect(stitch_b, "IMAGE", upscale, "image")
    w.connect(upscale, "IMAGE", save, "images")

    w.group("1 · data and teacher from scratch", [shapes, preview_shapes, build, pipeline, fm_loss, teacher],
            "#3f789e")
    w.group("2 · teacher dataset", [distill_data, preview_teacher, dd_loss], "#8A8")
    w.group("3 · Direct Distill student", [student], "#b58b2a")
    w.group("4 · teacher vs student", [load_student, *samples, stitch_a, stitch_b, upscale, save], "#a1309b")
    return w.to_json()


QWEN_PROMPTS = """精致肖像，水下少女，蓝裙飘逸，发丝轻扬，光影透澈，气泡环绕，面容恬静，细节精致，梦幻唯美。
A cozy cafe interior in the morning, sunlight through large windows, wooden tables, a latte with heart art.
A red fox sitting in a snowy forest at dusk, soft light, highly detailed fur.
A neon sign that reads "DiT Distillery" above a rainy street at night, reflections on the pavement.
An astronaut riding a horse on the moon, cinematic lighting, ultra detailed.
A bowl of ramen with a soft-boiled egg, steam rising, top-down food photography.
A watercolor painting of a lighthouse on a cliff, crashing waves, seagulls.
A minimalist poster with the text "4 steps" in bold sans-serif letters, pastel background."""
QWEN_VALIDATION = ("A red fox sitting in a snowy forest at dusk, soft light, highly detailed fur.\n"
                   "A neon sign that reads \"DiT Distillery\" above a rainy street at night.")
QWEN_SAMPLE = QWEN_VALIDATION.split("\n")[0]


def distill_qwen_image_lora(info) -> dict:
    """DiffSynth's Qwen-Image-Distill-LoRA recipe (seed 002, examples/qwen_image/.../Qwen-Image-Distill-LoRA.sh), on
    ComfyUI's own Qwen-Image files (stock loaders -> Pipeline from ComfyUI Models)."""
    w = Workflow(info)
    note = w.note(f"""
## Direct Distill a Qwen-Image LoRA to 4 steps, CFG 1
DiffSynth-Studio's recipe (Qwen-Image-Distill-LoRA): the teacher draws every prompt with **40 steps, CFG 4** at
**1328×1328**; the student (Qwen-Image + a **rank-32 LoRA** on DiffSynth's layers: attention q/k/v/out of both
streams, `img_mlp.net.2`, `txt_mlp.net.2`, `img_mod.1`, `txt_mod.1`) runs its own **4-step, CFG-1** sampler from
the same seeded noise, with gradients through all 4 steps, and its result is pulled onto the teacher's
(**lr 1e-4**). Teacher rows are stored with their exact final latents; queue again to add rows or to continue
training from the last checkpoint.

Put your own prompts in **Generate Distill Dataset** (one per line, or a .txt file in ComfyUI's input folder):
more prompts generalise better. The LoRA is saved to `models/loras/qwen_image_distill_lora.safetensors` and also
loads in stock **LoraLoaderModelOnly** (sample with 4 steps, CFG 1).

{QWEN_COMFY_SETUP}
### Memory (predicted, GPU peak of each DiT step)
Predictions of the memory plan ({QWEN_PLAN}; **Model Size Report** shows the training one):
* text encoder: its 8.3 GiB of fp8 weights are on the GPU only while prompts are encoded.
* teacher dataset, 40 steps CFG 4 at 1328² (`--mode sample --resolution 1328 --base-dtype fp8 --cfg 4`):
  **20.0 GiB** (19.1 of them the fp8 DiT).
* LoRA training, Direct Distill through 4 steps (`--mode lora --loss direct:4 --resolution 1328 --base-dtype
  fp8`): **35.2 GiB** (weights 20.4, activations of the 4 unrolled steps 11.0); for a 24 GB card
  (`--budget 24GB`) the plan swaps 41 of the 60 blocks (22.9 GiB).
* Sample, 4 steps CFG 1 (`--mode sample --resolution 1328 --base-dtype fp8 --cfg 1`): **19.6 GiB**.
ComfyUI keeps the models it is not running in CPU memory: about 30 GiB of RAM for the two fp8 files (measured
with a real-size text encoder file: 8.6 GiB resident once loaded, 16.5 GiB at the peak while it is read).
""", (480, 1020))
    loaders, pipeline = _qwen_comfy_pipeline(w)
    size = w.node("DD_ModelSizeReport", box_width=360, height=1328, width=1328, lora_rank=32, plan="lora",
                  plan_loss="direct:4", base_dtype="fp8")
    size_text = w.node("PreviewAny", title="Memory needed", box_width=360)
    distill_data = w.node("DD_GenerateDistillDataset", title="Generate Distill Dataset (40 steps, CFG 4)",
                          box_width=380, prompts=QWEN_PROMPTS, seeds_per_prompt=1, start_seed=0, teacher_steps=40,
                          teacher_cfg=4.0, width=1328, height=1328, student_steps=4, student_cfg=1.0,
                          rand_device="cpu", batch_size=1, output_name="qwen_image_distill_1328", repeat=50)
    preview = w.node("PreviewImage", title="Teacher images", box_width=380)
    loss = w.node("DD_DirectDistillLoss", box_width=380)
    train = w.node("DD_TrainLoRAFull", title="Train LoRA (Direct Distill)", box_width=420, mode="lora",
                   output_name="qwen_image_distill_lora", steps=2000, batch_size=1, learning_rate=1e-4,
                   lora_rank=32, lora_targets="preset", gradient_checkpointing=True, save_every=250,
                   validation_prompts=QWEN_VALIDATION, validation_seeds="0", validation_every=250, seed=0)
    chart = w.node("DD_LossChart")
    chart_view = w.node("PreviewImage", title="Loss")
    student = w.node("DD_LoadStudent")
    sample = w.node("DD_Sample", title="Student: 4 steps, CFG 1", prompt=QWEN_SAMPLE, seed=0, steps=4, cfg=1.0,
                    width=1328, height=1328)
    save = w.node("SaveImage", filename_prefix="dit_distillery/qwen_distill_lora_4step")
    w.columns([[note], [*loaders, pipeline], [size, size_text], [distill_data, preview, loss], [train],
               [chart, chart_view], [student, sample, save]])

    w.connect(pipeline, "pipeline", size, "pipeline")
    w.connect(size, "report", size_text, "source")
    w.connect(pipeline, "pipeline", distill_data, "teacher")
    w.connect(distill_data, "preview", preview, "images")
    w.connect(pipeline, "pipeline", train, "pipeline")
    w.connect(distill_data, "dataset", train, "dataset")
    w.connect(loss, "loss", train, "loss")
    w.connect(train, "loss_history", chart, "loss_history")
    w.connect(chart, "chart", chart_view, "images")
    w.connect(train, "model", student, "pipeline")
    w.connect(student, "pipeline", sample, "pipeline")
    w.connect(sample, "images", save, "images")
    w.group("Qwen-Image: ComfyUI's files", [*loaders, pipeline], "#3f789e")
    w.group("teacher dataset: 40 steps, CFG 4, 1328²", [distill_data, preview, loss], "#8A8")
    w.group("student: LoRA rank 32, 4 steps, CFG 1", [train, chart, chart_view, student, sample, save], "#b58b2a")
    return w.to_json()


def shrink_qwen_image(info) -> dict:
    """Shrink Qwen-Image 60 -> 20 blocks (importance on calibration prompts), then recover it by Direct Distill;
    the teacher is ComfyUI's own Qwen-Image files (stock loaders -> Pipeline from ComfyUI Models)."""
    w = Workflow(info)
    note = w.note(f"""
## Shrink Qwen-Image (60 → 20 blocks) and recover it by distillation
1. **Shrink DiT** keeps 20 of Qwen-Image's 60 blocks, chosen by **importance** (how much each block changes its
   input on the calibration prompts, encoded by the teacher's text encoder), and writes exact slices of the
   source file, streamed. Its `source` is a file (it never loads the whole model): the same
   `qwen_image_fp8_e4m3fn.safetensors` as Load Diffusion Model (plain fp8, sliced as stored); the bf16 file and
   ComfyUI's scaled-fp8 files (`*_fp8_scaled`, scales applied) work too. The student (about 7B parameters) is
   saved in bf16 to `models/diffusion_models/qwen_image_20blocks.safetensors` (the fp8 values exactly) and loads
   in stock UNETLoader.
2. **Generate Distill Dataset**: the full 60-block teacher, sampled by ComfyUI, draws the prompts (40 steps, CFG 4,
   1024²).
3. **Train** the student's full weights with **Direct Distill Loss**: it learns to reach the teacher's images in
   **4 steps, CFG 1** (fewer blocks *and* fewer steps). More prompts and steps give better quality.

{QWEN_COMFY_SETUP}
### Memory (predicted, GPU peak of each DiT step)
Predictions of the memory plan ({QWEN_PLAN}; **Model Size Report** shows the student's):
* Shrink DiT: one source tensor at a time, plus one block (1.4 GiB in fp32) and its activations while the
  calibration prompts are scored.
* teacher dataset, 60 blocks, 40 steps CFG 4 at 1024² (`--mode sample --resolution 1024 --base-dtype fp8 --cfg
  4`): **19.7 GiB**.
* full training of the 20-block student through 4 steps (`--mode full --layers 20 --loss direct:4
  --resolution 1024`): **118.3 GiB** with AdamW (fp32 masters 25.5, bf16 copies 12.7, gradients 25.5, AdamW
  50.9); Adafactor, set here, keeps factored statistics instead of AdamW's 50.9 GiB: about 67 GiB, an 80 GB
  GPU. A training job for a cluster needs the models as files: Load Pipeline + Export Training Job.
* Sample, 20 blocks in bf16, 4 steps CFG 1 (`--mode sample --layers 20 --resolution 1024 --cfg 1`): **13.0 GiB**.
""", (480, 1080))
    loaders, pipeline = _qwen_comfy_pipeline(w, box_width=380)
    shrink = w.node("DD_ShrinkDiT", box_width=380, models=[QWEN_COMFY_DIT], model_files=QWEN_COMFY_MODELS,
                    source=QWEN_COMFY_DIT, target_blocks=20, strategy="importance",
                    calibration_prompts=QWEN_PROMPTS, calibration_size=512, calibration_seed=0, dtype="bf16",
                    name="qwen_image_20blocks.safetensors")
    report = w.node("PreviewAny", title="What was kept", box_width=380)
    size = w.node("DD_ModelSizeReport", box_width=380, height=1024, width=1024, plan="full", plan_loss="direct:4")
    size_text = w.node("PreviewAny", title="Student size and training memory", box_width=380)
    student_in = w.node("DD_LoadStudent", title="Load Student (20-block student)", box_width=380)
    distill_data = w.node("DD_GenerateDistillDataset", title="Generate Distill Dataset (full teacher)",
                          box_width=380, prompts=QWEN_PROMPTS, seeds_per_prompt=2, start_seed=0, teacher_steps=40,
                          teacher_cfg=4.0, width=1024, height=1024, student_steps=4, student_cfg=1.0,
                          batch_size=1, output_name="qwen_image_distill_1024")
    loss = w.node("DD_DirectDistillLoss", box_width=380)
    train = w.node("DD_TrainLoRAFull", title="Train student (full, Direct Distill)", box_width=420, mode="full",
                   output_name="qwen_image_20blocks_recovered", steps=3000, batch_size=1, learning_rate=1e-5,
                   lr_schedule="cosine", warmup_steps=100, optimizer="adafactor", gradient_checkpointing=True,
                   save_every=250, save_dtype="bf16", validation_prompts=QWEN_VALIDATION, validation_every=250,
                   seed=0)
    sample = w.node("DD_Sample", title="Recovered student: 4 steps, CFG 1", prompt=QWEN_SAMPLE, seed=0, steps=4,
                    cfg=1.0, width=1024, height=1024)
    save = w.node("SaveImage", filename_prefix="dit_distillery/qwen_20blocks_4step")
    w.columns([[note], [*loaders, pipeline], [shrink, report], [size, size_text], [student_in, distill_data, loss],
               [train], [sample, save]])

    w.connect(pipeline, "pipeline", shrink, "pipeline")
    w.connect(shrink, "report", report, "source")
    w.connect(shrink, "dit", size, "dit")
    w.connect(size, "report", size_text, "source")
    w.connect(pipeline, "pipeline", student_in, "pipeline")
    w.connect(shrink, "dit", student_in, "dit")
    w.connect(pipeline, "pipeline", distill_data, "teacher")
    w.connect(student_in, "pipeline", train, "pipeline")
    w.connect(distill_data, "dataset", train, "dataset")
    w.connect(loss, "loss", train, "loss")
    w.connect(train, "model", sample, "pipeline")
    w.connect(sample, "images", save, "images")
    w.group("1 · shrink 60 → 20 blocks", [*loaders, pipeline, shrink, report, size, size_text], "#3f789e")
    w.group("2 · recover by Direct Distill from the full teacher", [student_in, distill_data, loss, train],
            "#b58b2a")
    return w.to_json()


AAADIT_PROMPTS = [
    "green, lizard, plant, Grass, Poison, seed on back, red eyes, smiling expression, short stout limbs, sharp claws",
    "orange, cream, lizard, Fire, flame on tail tip, large eyes, smiling expression, cream-colored belly patch, "
    "sharp claws",
    "蓝色，米色，棕色，乌龟，水系，龟壳，大眼睛，短四肢，卷曲尾巴",
]


def aaadit_from_scratch(info) -> dict:
    """DiffSynth's train-from-scratch tutorial (seed 004): the 0.1B AAADiT at 256x256, lr 2e-4."""
    w = Workflow(info)
    note = w.note("""
## Train AAADiT (0.1B) from scratch
DiffSynth-Studio's tutorial model: 1024 wide, 10 blocks, 32 heads, on FLUX.2-klein's VAE (128 channels, 1/16)
and Qwen3-0.6B's last hidden states (128 tokens), trained with flow-matching SFT at **256×256, lr 2e-4**,
batch 1. The tutorial's model converges after about 60k steps (10–20 GPU hours).

### Data
The tutorial's Pokémon set: `modelscope download --dataset DiffSynth-Studio/pokemon-gen1 --local_dir
ComfyUI/input/pokemon-gen1` (images in `images/`, captions in `metadata_merged.csv`). Any DiffSynth-format
folder (images + metadata.csv with image,prompt) or images with .txt captions works.

### Models: `models/diffusers/AAADiT/`
* `model_index.json`: `{"_class_name": "AAAImagePipeline"}`
* `text_encoder/` and `tokenizer/`: the files of Qwen/Qwen3-0.6B
* `vae/`: the `vae/` folder of black-forest-labs/FLUX.2-klein-4B

**Build AAADiT** writes the random initial weights (`models/diffusion_models/aaadit_0.1b.safetensors`);
**Train** (full) saves `models/diffusion_models/aaadit_pokemon.safetensors`, with checkpoints every 5000 steps.
Validation uses the tutorial's 30 steps, CFG 10.
""", (460, 700))
    build = w.node("DD_BuildAAADiT", title="Build AAADiT (tutorial, 0.1B)", preset="tutorial", seed=0,
                   dtype="fp32", name="aaadit_0.1b.safetensors")
    size = w.node("DD_ModelSizeReport", preset="aaadit", height=256, width=256, text_tokens=128)
    size_text = w.node("PreviewAny", title="Parameters and training memory")
    pipeline = w.node("DD_LoadPipeline", title="Load Pipeline (Qwen3-0.6B + FLUX.2 VAE)", source="AAADiT")
    data = w.node("DD_DatasetFolder", folder="pokemon-gen1/images", metadata="../metadata_merged.csv",
                  sizing="fixed", width=256, height=256, repeat=1, cache=True)
    loss = w.node("DD_FlowMatchingLoss")
    train = w.node("DD_TrainLoRAFull", title="Train AAADiT (full, flow matching)", box_width=420, mode="full",
                   output_name="aaadit_pokemon", steps=60000, batch_size=1, learning_rate=2e-4,
                   gradient_checkpointing=False, save_every=5000, save_dtype="bf16",
                   validation_prompts="\n".join(AAADIT_PROMPTS), validation_seeds="0", validation_every=2000,
                   validation_steps=30, validation_cfg=10.0, seed=0)
    chart = w.node("DD_LossChart", log_scale=True)
    chart_view = w.node("PreviewImage", title="Loss")
    sample = w.node("DD_Sample", prompt=AAADIT_PROMPTS[0], negative_prompt=" ", seed=0, steps=30, cfg=10.0,
                    width=256, height=256, batch_size=3)
    save = w.node("SaveImage", filename_prefix="dit_distillery/aaadit_pokemon")
    w.columns([[note], [build, size, size_text], [pipeline, data, loss], [train], [chart, chart_view],
               [sample, save]])

    w.connect(build, "dit", size, "dit")
    w.connect(size, "report", size_text, "source")
    w.connect(build, "dit", pipeline, "dit")
    w.connect(pipeline, "pipeline", train, "pipeline")
    w.connect(data, "dataset", train, "dataset")
    w.connect(loss, "loss", train, "loss")
    w.connect(train, "loss_history", chart, "loss_history")
    w.connect(chart, "chart", chart_view, "images")
    w.connect(train, "model", sample, "pipeline")
    w.connect(sample, "images", save, "images")
    w.group("model", [build, size, size_text], "#3f789e")
    w.group("data and training: 256², lr 2e-4", [pipeline, data, loss, train], "#b58b2a")
    return w.to_json()


def qwen_image_finetune(info) -> dict:
    """DiffSynth's Qwen-Image LoRA and full fine-tuning (seed 003): LoRA lr 1e-4 rank 32, full lr 1e-5; on ComfyUI's
    own Qwen-Image files (stock loaders -> Pipeline from ComfyUI Models)."""
    w = Workflow(info)
    note = w.note(f"""
## Fine-tune Qwen-Image: LoRA and full
DiffSynth-Studio's recipes (examples/qwen_image/model_training): flow-matching SFT on a DiffSynth-format
dataset (`metadata.csv` with `image,prompt`), dynamic resolution up to **1024×1024 pixels**
(`--max_pixels 1048576`), dataset repeat 50.
* **LoRA**: rank 32 on DiffSynth's layers, **lr 1e-4**, over the MODEL's fp8 weights. Saved to
  `models/loras/qwen_image_lora.safetensors` (loads in stock LoraLoaderModelOnly).
* **Full** (muted: select the three purple nodes, Ctrl+M): all DiT weights, **lr 1e-5**, Adafactor; needs far
  more memory (below). Saved to `models/diffusion_models/qwen_image_full.safetensors`.

### Data
`ComfyUI/input/example_image_dataset/` (`modelscope download --dataset DiffSynth-Studio/example_image_dataset
--local_dir ComfyUI/input/example_image_dataset`), or any folder of images + metadata.csv / .txt captions.

{QWEN_COMFY_SETUP}
### Memory (predicted, GPU peak of each DiT step)
Predictions of the memory plan ({QWEN_PLAN}; **Model Size Report** shows the LoRA one):
* the prompts and images are encoded once into the cache before training (the text encoder's 8.3 GiB and the VAE
  on the GPU only then).
* LoRA training at 1024² (`--mode lora --resolution 1024 --base-dtype fp8`): **26.0 GiB** (weights 20.4,
  activations 2.1); for a 24 GB card (`--budget 24GB`) the plan swaps 12 of the 60 blocks (22.8 GiB).
* full training at 1024² (`--mode full --resolution 1024`): **345 GiB** with AdamW, about 193 GiB with Adafactor:
  several GPUs, i.e. a training job with the models as files (Load Pipeline + Export Training Job).
* Sample at 1024², CFG 4 (`--mode sample --resolution 1024 --base-dtype fp8 --cfg 4`): **19.7 GiB**.
""", (480, 1000))
    loaders, pipeline = _qwen_comfy_pipeline(w)
    data = w.node("DD_DatasetFolder", box_width=360, folder="example_image_dataset", metadata="metadata.csv",
                  sizing="buckets", max_pixels=1048576, repeat=50)
    loss = w.node("DD_FlowMatchingLoss", box_width=360)
    size = w.node("DD_ModelSizeReport", box_width=360, lora_rank=32, plan="lora", base_dtype="fp8")
    size_text = w.node("PreviewAny", title="Memory: LoRA vs full", box_width=360)
    lora = w.node("DD_TrainLoRAFull", title="Train LoRA (lr 1e-4, rank 32)", box_width=420, mode="lora",
                  output_name="qwen_image_lora", steps=2000, batch_size=1, learning_rate=1e-4, lora_rank=32,
                  lora_targets="preset", gradient_checkpointing=True, save_every=500,
                  validation_prompts="a dog\na cat", validation_every=500, seed=0)
    lora_sample = w.node("DD_Sample", title="Sample the LoRA", prompt="a dog", seed=0, width=1024, height=1024)
    lora_save = w.node("SaveImage", filename_prefix="dit_distillery/qwen_image_lora")
    full = w.node("DD_TrainLoRAFull", title="Train full (lr 1e-5)", box_width=420, node_mode=2, mode="full",
                  output_name="qwen_image_full", steps=2000, batch_size=1, learning_rate=1e-5, optimizer="adafactor",
                  gradient_checkpointing=True, save_every=500, validation_prompts="a dog\na cat",
                  validation_every=500, seed=0)
    full_sample = w.node("DD_Sample", title="Sample the full fine-tune", node_mode=2, prompt="a dog", seed=0,
                         width=1024, height=1024)
    full_save = w.node("SaveImage", node_mode=2, filename_prefix="dit_distillery/qwen_image_full")
    for node in (full, full_sample, full_save):
        node["color"], node["bgcolor"] = "#323", "#535"
    w.columns([[note], [*loaders, pipeline], [data, loss, size, size_text], [lora], [lora_sample, lora_save],
               [full], [full_sample, full_save]])

    w.connect(pipeline, "pipeline", size, "pipeline")
    w.connect(size, "report", size_text, "source")
    for train, sample, save in ((lora, lora_sample, lora_save), (full, full_sample, full_save)):
        w.connect(pipeline, "pipeline", train, "pipeline")
        w.connect(data, "dataset", train, "dataset")
        w.connect(loss, "loss", train, "loss")
        w.connect(train, "model", sample, "pipeline")
        w.connect(sample, "images", save, "images")
    w.group("Qwen-Image: ComfyUI's files", [*loaders, pipeline], "#3f789e")
    w.group("LoRA: lr 1e-4, rank 32", [lora, lora_sample, lora_save], "#b58b2a")
    w.group("full: lr 1e-5 (muted)", [full, full_sample, full_save], "#a1309b")
    return w.to_json()


# ----------------------------------------------------------------------------------------------------------
# Recipes (issue 12 §3): keep a LoRA few-step on Z-Image-Turbo / Qwen-Image + Lightning; FLUX.2 [klein] to 4 steps.
# Memory figures: Model Size Report (bf16 weights; LoRA rank 32 training with gradient checkpointing).

_HF = "https://huggingface.co/"
Z_IMAGE_MODELS = {
    "z_image_turbo_bf16.safetensors": ("diffusion_models", _HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/"
                                       "diffusion_models/z_image_turbo_bf16.safetensors"),
    "z_image_bf16.safetensors": ("diffusion_models", _HF + "Comfy-Org/z_image/resolve/main/split_files/"
                                 "diffusion_models/z_image_bf16.safetensors"),
    "qwen_3_4b.safetensors": ("text_encoders", _HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/"
                              "text_encoders/qwen_3_4b.safetensors"),
    "ae.safetensors": ("vae", _HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors"),
}
Z_IMAGE_FOLDER = "Z-Image-Turbo"  # models/diffusers/Z-Image-Turbo: Tongyi-MAI/Z-Image-Turbo's tokenizer + configs
KLEIN_MODELS = {
    "flux-2-klein-base-4b.safetensors": ("diffusion_models", _HF + "Comfy-Org/flux2-klein/resolve/main/split_files/"
                                         "diffusion_models/flux-2-klein-base-4b.safetensors"),
    "qwen_3_4b.safetensors": ("text_encoders", _HF + "Comfy-Org/flux2-klein/resolve/main/split_files/"
                              "text_encoders/qwen_3_4b.safetensors"),
    "flux2-vae.safetensors": ("vae", _HF + "Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
}
KLEIN_FOLDER = "FLUX.2-klein-base-4B"  # models/diffusers/FLUX.2-klein-base-4B: its tokenizer + configs
LIGHTNING_MODELS = {
    "Qwen-Image-Lightning-8steps-V1.0.safetensors": ("loras", _HF + "lightx2v/Qwen-Image-Lightning/resolve/main/"
                                                     "Qwen-Image-Lightning-8steps-V1.0.safetensors"),
}
# The user's own LoRA (no download): the name the workflows show until it is picked in the Load Student node.
USER_LORAS = {"z_image": "my_z_image_lora.safetensors", "qwen_image": "my_qwen_image_lora.safetensors"}
RECIPE_PROMPTS = """A portrait of a woman in a sunlit garden, soft focus background, natural light.
A red fox sitting in a snowy forest at dusk, soft light, highly detailed fur.
A cozy cafe interior in the morning, sunlight through large windows, wooden tables, a latte with heart art.
An old fisherman mending a net on a wooden pier, overcast sky, documentary photo.
A bowl of ramen with a soft-boiled egg, steam rising, top-down food photography.
A watercolor painting of a lighthouse on a cliff, crashing waves, seagulls.
A neon sign that reads "OPEN LATE" above a rainy street at night, reflections on the pavement.
A cat sleeping on a stack of books beside a window, afternoon light."""
RECIPE_SAMPLE = RECIPE_PROMPTS.split("\n")[1]
KEEP_LORA_PROMPTS_NOTE = """**Prompts** (Generate Distill Dataset): replace the examples with prompts your LoRA is
meant for, with its trigger words: the repair is learnt on what the teacher draws from them. 50–200 prompts
generalise better than 8 (the rows are kept: queue again after adding more)."""


def _keep_lora_compare(w, teacher, before, after, steps_teacher, cfg_teacher, steps, size, prefix,
                       schedule_template="pipeline"):
    """Three Sample nodes (teacher | before | after, one prompt and seed) stitched side by side and saved."""
    extra = {} if schedule_template == "pipeline" else {"schedule_template": schedule_template}
    samples = [
        w.node("DD_Sample", title=f"Teacher: {steps_teacher} steps, CFG {cfg_teacher:g}", prompt=RECIPE_SAMPLE,
               seed=0, steps=steps_teacher, cfg=cfg_teacher, width=size, height=size),
        w.node("DD_Sample", title=f"Before: {steps} steps, CFG 1", prompt=RECIPE_SAMPLE, seed=0, steps=steps, cfg=1.0,
               width=size, height=size, **extra),
        w.node("DD_Sample", title=f"After (repair LoRA): {steps} steps, CFG 1", prompt=RECIPE_SAMPLE, seed=0,
               steps=steps, cfg=1.0, width=size, height=size, **extra),
    ]
    stitch_a = w.node("ImageStitch", spacing_width=8)
    stitch_b = w.node("ImageStitch", spacing_width=8)
    save = w.node("SaveImage", title="Teacher | before | after", box_width=360, filename_prefix=prefix)
    for sample, source in zip(samples, (teacher, before, after)):
        w.connect(*source, sample, "pipeline")
    w.connect(samples[0], "images", stitch_a, "image1")
    w.connect(samples[1], "images", stitch_a, "image2")
    w.connect(stitch_a, "IMAGE", stitch_b, "image1")
    w.connect(samples[2], "images", stitch_b, "image2")
    w.connect(stitch_b, "IMAGE", save, "images")
    return samples, [stitch_a, stitch_b, save]


def keep_lora_few_step_z_image(info) -> dict:
    """Your Z-Image LoRA on Z-Image-Turbo at 8 steps: the Base + LoRA teacher (50 steps, CFG 4) repairs it."""
    w = Workflow(info)
    lora = USER_LORAS["z_image"]
    note = w.note(f"""
## Keep my LoRA few-step: Z-Image-Turbo
A LoRA trained on **Z-Image (Base)** and used on **Z-Image-Turbo** at 8 steps comes out blurry or off-style: the
step distillation and your LoRA move the same weights and were never trained together. This graph repairs it
with a second, small LoRA:
1. **Teacher** = Z-Image Base + your LoRA, sampled the slow way: **50 steps, CFG 4** (Load Student: Base weights
   and your LoRA on the Turbo pipeline's text encoder and VAE).
2. **Generate Distill Dataset**: the teacher draws every prompt and keeps its exact final latents; the rows ask
   the student for **8 steps, CFG 1**.
3. **Student** = Turbo + your LoRA (merged); **Train** a new LoRA (rank 32, lr 1e-4) with **Direct Distill Loss**:
   the student samples 8 steps from the teacher's noise, with gradients through all of them, and is pulled onto
   the teacher's result.
4. **Teacher | before | after**, saved to `output/dit_distillery/keep_lora_z_image_*.png`.

Use it afterwards in any Z-Image-Turbo workflow: LoraLoaderModelOnly with your LoRA, then another with
`models/loras/my_z_image_lora_turbo_repair.safetensors` (strength 1), 8 steps, CFG 1.

{KEEP_LORA_PROMPTS_NOTE}

### Models
* `models/loras/{lora}`: **your LoRA** (pick it in both Load Student nodes).
* `z_image_turbo_bf16.safetensors` and `z_image_bf16.safetensors` (models/diffusion_models), `qwen_3_4b.safetensors`
  (text_encoders), `ae.safetensors` (vae): ComfyUI's Z-Image files; ComfyUI offers to download them.
* `models/diffusers/{Z_IMAGE_FOLDER}/`: from Tongyi-MAI/Z-Image-Turbo, `model_index.json` and `tokenizer/` (the
  files above replace its weights).

### Memory (bf16, 1024²)
Each 6B DiT is 11.5 GiB and the text encoder 7.5 GiB. The teacher dataset needs Base + your LoRA (~31 GiB with the
Turbo pipeline loaded); training adds Turbo + your LoRA and its training copy (Model Size Report: 14.8 GiB for LoRA
training at 1024² with gradient checkpointing, more for the 8 unrolled steps). The whole graph keeps about 65 GiB
loaded: an 80 GB GPU. On a smaller one run the same recipe from the command line, one stage per process
(~20 GiB each): `python -m dit_distillery recipe keep-lora-few-step --base models/diffusers/Z-Image --turbo
z_image_turbo_bf16.safetensors --lora {lora} --prompts prompts.txt --out runs/repair` (see the README).
""", (480, 1060))
    pipeline = w.node("DD_LoadPipeline", title="Load Pipeline (Z-Image-Turbo)", box_width=380,
                      models=["z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"],
                      model_files=Z_IMAGE_MODELS, source=Z_IMAGE_FOLDER, dit_name="z_image_turbo_bf16.safetensors",
                      text_encoder_name="qwen_3_4b.safetensors", vae_name="ae.safetensors")
    teacher = w.node("DD_LoadStudent", title="Teacher: Z-Image Base + your LoRA", box_width=380,
                     models=["z_image_bf16.safetensors"], model_files=Z_IMAGE_MODELS,
                     weights="z_image_bf16.safetensors", lora=lora, strength=1.0)
    student = w.node("DD_LoadStudent", title="Student: Turbo + your LoRA", box_width=380, lora=lora, strength=1.0)
    size = w.node("DD_ModelSizeReport", box_width=380, height=1024, width=1024, lora_rank=32)
    size_text = w.node("PreviewAny", title="Memory needed (LoRA training)", box_width=380)
    distill_data = w.node("DD_GenerateDistillDataset", title="Teacher dataset (50 steps, CFG 4)", box_width=400,
                          prompts=RECIPE_PROMPTS, seeds_per_prompt=2, start_seed=0, teacher_steps=50,
                          teacher_cfg=4.0, width=1024, height=1024, student_steps=8, student_cfg=1.0,
                          rand_device="cpu", batch_size=1, output_name="keep_lora_z_image")
    preview = w.node("PreviewImage", title="Teacher images", box_width=400)
    loss = w.node("DD_DirectDistillLoss", box_width=400)
    train = w.node("DD_TrainLoRAFull", title="Train repair LoRA (Direct Distill, 8 steps, CFG 1)", box_width=420,
                   mode="lora", output_name="my_z_image_lora_turbo_repair", steps=1000, batch_size=1,
                   learning_rate=1e-4, warmup_steps=50, lora_rank=32, lora_targets="preset",
                   gradient_checkpointing=True, save_every=250, seed=0)
    chart = w.node("DD_LossChart")
    chart_view = w.node("PreviewImage", title="Loss")
    samples, tail = _keep_lora_compare(w, (teacher, "pipeline"), (student, "pipeline"), (train, "model"), 50, 4.0, 8,
                                       1024, "dit_distillery/keep_lora_z_image")
    w.columns([[note], [pipeline, teacher, student, size, size_text], [distill_data, preview, loss], [train],
               [chart, chart_view], samples, tail])

    w.connect(pipeline, "pipeline", teacher, "pipeline")
    w.connect(pipeline, "pipeline", student, "pipeline")
    w.connect(pipeline, "pipeline", size, "pipeline")
    w.connect(size, "report", size_text, "source")
    w.connect(teacher, "pipeline", distill_data, "teacher")
    w.connect(distill_data, "preview", preview, "images")
    w.connect(student, "pipeline", train, "pipeline")
    w.connect(distill_data, "dataset", train, "dataset")
    w.connect(loss, "loss", train, "loss")
    w.connect(train, "loss_history", chart, "loss_history")
    w.connect(chart, "chart", chart_view, "images")
    w.group("1 · models: Turbo, the Base + LoRA teacher, the Turbo + LoRA student", [pipeline, teacher, student,
                                                                                    size, size_text], "#3f789e")
    w.group("2 · teacher dataset: 50 steps, CFG 4 → rows for 8 steps, CFG 1", [distill_data, preview, loss], "#8A8")
    w.group("3 · repair LoRA: Direct Distill at 8 steps", [train, chart, chart_view], "#b58b2a")
    w.group("4 · teacher | before | after", samples + tail, "#a1309b")
    return w.to_json()


def keep_lora_few_step_qwen_image(info) -> dict:
    """Your Qwen-Image LoRA with the Lightning 8-step LoRA: the Qwen-Image + LoRA teacher (40 steps, CFG 4)."""
    w = Workflow(info)
    lora = USER_LORAS["qwen_image"]
    lightning = "Qwen-Image-Lightning-8steps-V1.0.safetensors"
    note = w.note(f"""
## Keep my LoRA few-step: Qwen-Image + Lightning (8 steps)
Your LoRA, trained on Qwen-Image, loses its look when stacked with the **Lightning 8-step LoRA**. This graph trains
a small repair LoRA on top of both:
1. **Teacher** = Qwen-Image + your LoRA at **40 steps, CFG 4** (DiffSynth's teacher setting), 1328².
2. **Student base** = Qwen-Image with Lightning merged and saved as
   `models/diffusion_models/qwen_image_lightning_8steps_merged.safetensors` (Load Student's export_name: the
   graph continues from that file), then your LoRA on top.
3. **Train** a new LoRA (rank 32, lr 1e-4) with **Direct Distill Loss** at **8 steps, CFG 1** on Lightning's
   schedule (`schedule_template` Qwen-Image-Lightning: shift 3 at every size, as Lightning was trained).
4. **Teacher | before | after**, saved to `output/dit_distillery/keep_lora_qwen_image_*.png`.

Use it afterwards: Qwen-Image + Lightning 8-step LoRA + your LoRA + `models/loras/my_qwen_image_lora_lightning_repair
.safetensors`, 8 steps, CFG 1. For the 4-step Lightning LoRA, pick it in the export node and set 4 student steps.

{KEEP_LORA_PROMPTS_NOTE}

* `models/loras/{lora}`: **your LoRA** (pick it in both Load Student nodes); `models/loras/{lightning}`
  (lightx2v/Qwen-Image-Lightning; ComfyUI offers to download it).

{QWEN_SETUP}
### Memory (bf16, 1328²)
The 20B DiT is 38 GiB and the text encoder about 16 GiB. The teacher dataset needs Qwen-Image and Qwen-Image + your
LoRA (~95 GiB); training adds the Lightning-merged DiT and its training copy (Model Size Report: 45.5 GiB for LoRA
training with gradient checkpointing): about 170 GiB in one graph. Run the training elsewhere with
**Export Training Job** (muted: select it, Ctrl+M), or run the recipe from the command line, one stage per process
(~55 GiB teacher, ~50 GiB training): `python -m dit_distillery recipe keep-lora-few-step --base
models/diffusers/Qwen-Image --turbo-lora {lightning} --lora {lora} --student-schedule Qwen-Image-Lightning
--teacher-steps 40 --prompts prompts.txt --out runs/repair` (see the README).
""", (500, 1180))
    pipeline = w.node("DD_LoadPipeline", title="Load Pipeline (Qwen-Image)", box_width=380,
                      models=list(QWEN_MODELS), **QWEN_PIPELINE)
    teacher = w.node("DD_LoadStudent", title="Teacher: Qwen-Image + your LoRA", box_width=380, lora=lora,
                     strength=1.0)
    baked = w.node("DD_LoadStudent", title="Qwen-Image + Lightning, merged and saved", box_width=380,
                   models=[lightning], model_files=LIGHTNING_MODELS, lora=lightning, strength=1.0,
                   export_name="qwen_image_lightning_8steps_merged.safetensors")
    student = w.node("DD_LoadStudent", title="Student: + your LoRA", box_width=380, lora=lora, strength=1.0)
    size = w.node("DD_ModelSizeReport", box_width=380, height=1328, width=1328, lora_rank=32)
    size_text = w.node("PreviewAny", title="Memory needed (LoRA training)", box_width=380)
    distill_data = w.node("DD_GenerateDistillDataset", title="Teacher dataset (40 steps, CFG 4)", box_width=400,
                          prompts=RECIPE_PROMPTS, seeds_per_prompt=2, start_seed=0, teacher_steps=40,
                          teacher_cfg=4.0, width=1328, height=1328, student_steps=8, student_cfg=1.0,
                          rand_device="cpu", batch_size=1, output_name="keep_lora_qwen_image")
    preview = w.node("PreviewImage", title="Teacher images", box_width=400)
    loss = w.node("DD_DirectDistillLoss", title="Direct Distill Loss (Lightning schedule)", box_width=400,
                  schedule_template="Qwen-Image-Lightning")
    train_widgets = dict(mode="lora", output_name="my_qwen_image_lora_lightning_repair", steps=1000, batch_size=1,
                         learning_rate=1e-4, warmup_steps=50, lora_rank=32, lora_targets="preset",
                         gradient_checkpointing=True, save_every=250, seed=0)
    train = w.node("DD_TrainLoRAFull", title="Train repair LoRA (Direct Distill, 8 steps, CFG 1)", box_width=420,
                   **train_widgets)
    export = w.node("DD_ExportTrainingJob", title="Export Training Job (cluster)", box_width=420, node_mode=2,
                    num_processes=1, **train_widgets)
    samples, tail = _keep_lora_compare(w, (teacher, "pipeline"), (student, "pipeline"), (train, "model"), 40, 4.0, 8,
                                       1328, "dit_distillery/keep_lora_qwen_image",
                                       schedule_template="Qwen-Image-Lightning")
    w.columns([[note], [pipeline, teacher, baked, student], [size, size_text, distill_data, preview, loss], [train],
               [export], samples, tail])

    w.connect(pipeline, "pipeline", teacher, "pipeline")
    w.connect(pipeline, "pipeline", baked, "pipeline")
    w.connect(baked, "pipeline", student, "pipeline")
    w.connect(student, "pipeline", size, "pipeline")
    w.connect(size, "report", size_text, "source")
    w.connect(teacher, "pipeline", distill_data, "teacher")
    w.connect(distill_data, "preview", preview, "images")
    for trainer in (train, export):
        w.connect(student, "pipeline", trainer, "pipeline")
        w.connect(distill_data, "dataset", trainer, "dataset")
        w.connect(loss, "loss", trainer, "loss")
    w.group("1 · the Qwen-Image + LoRA teacher; the Lightning student base, saved", [pipeline, teacher, baked,
                                                                                    student], "#3f789e")
    w.group("2 · teacher dataset: 40 steps, CFG 4 → rows for 8 steps, CFG 1",
            [size, size_text, distill_data, preview, loss], "#8A8")
    w.group("3 · repair LoRA: Direct Distill at 8 steps", [train, export], "#b58b2a")
    w.group("4 · teacher | before | after", samples + tail, "#a1309b")
    return w.to_json()


def distill_flux2_klein_4step(info) -> dict:
    """FLUX.2 [klein] base 4B (50 steps, CFG 4) distilled into a 4-step, CFG-1 LoRA by Direct Distill."""
    w = Workflow(info)
    note = w.note(f"""
## Distill FLUX.2 [klein] base 4B to 4 steps, CFG 1
The undistilled klein base needs **50 steps with CFG 4** (100 DiT calls per image). This graph trains a LoRA that
draws the same images in **4 steps without CFG** (4 calls), Direct Distill as in DiffSynth's recipe:
1. **Generate Distill Dataset**: the base draws every prompt (50 steps, CFG 4, 1024²) and keeps its exact final
   latents; the rows ask the student for 4 steps, CFG 1.
2. **Train** a LoRA (rank 32, lr 1e-4) on the same base with **Direct Distill Loss**: the student samples 4 steps
   from the teacher's noise with gradients through all of them and is pulled onto the teacher's result. The
   validation grid shows the teacher beside the student.
3. **Teacher 50 steps | base 4 steps | student 4 steps**, saved to `output/dit_distillery/klein_4step_*.png`.

The LoRA is saved to `models/loras/flux2_klein_base_4b_4step.safetensors` (stock LoraLoaderModelOnly reads it on
`flux-2-klein-base-4b.safetensors`: 4 steps, CFG 1). Put your own prompts in Generate Distill Dataset: more
prompts (hundreds) generalise better; queue again to add rows or continue training.

### Models
* `flux-2-klein-base-4b.safetensors` (models/diffusion_models), `qwen_3_4b.safetensors` (text_encoders),
  `flux2-vae.safetensors` (vae): ComfyUI's FLUX.2 [klein] files; ComfyUI offers to download them.
* `models/diffusers/{KLEIN_FOLDER}/`: from black-forest-labs/FLUX.2-klein-base-4B, `model_index.json` and
  `tokenizer/` (the files above replace its weights).

### Memory (bf16, 1024²)
The 4B DiT is 7.2 GiB and the text encoder 7.5 GiB: the teacher dataset needs about 16 GiB; LoRA training shares
the base's weights (Model Size Report: 9.4 GiB with gradient checkpointing, more for the 4 unrolled steps), about
25 GiB in all. Command line: `python -m dit_distillery recipe distill-klein --base models/diffusers/{KLEIN_FOLDER}
--prompts prompts.txt --out runs/klein_4step`.
""", (480, 960))
    pipeline = w.node("DD_LoadPipeline", title="Load Pipeline (FLUX.2 [klein] base 4B)", box_width=380,
                      models=list(KLEIN_MODELS), model_files=KLEIN_MODELS, source=KLEIN_FOLDER,
                      dit_name="flux-2-klein-base-4b.safetensors", text_encoder_name="qwen_3_4b.safetensors",
                      vae_name="flux2-vae.safetensors")
    size = w.node("DD_ModelSizeReport", box_width=380, height=1024, width=1024, lora_rank=32)
    size_text = w.node("PreviewAny", title="Memory needed (LoRA training)", box_width=380)
    distill_data = w.node("DD_GenerateDistillDataset", title="Teacher dataset (50 steps, CFG 4)", box_width=400,
                          prompts=RECIPE_PROMPTS, seeds_per_prompt=2, start_seed=0, teacher_steps=50,
                          teacher_cfg=4.0, width=1024, height=1024, student_steps=4, student_cfg=1.0,
                          rand_device="cpu", batch_size=1, output_name="klein_base_4b_distill_1024")
    preview = w.node("PreviewImage", title="Teacher images", box_width=400)
    loss = w.node("DD_DirectDistillLoss", box_width=400)
    train = w.node("DD_TrainLoRAFull", title="Train LoRA (Direct Distill, 4 steps, CFG 1)", box_width=420,
                   mode="lora", output_name="flux2_klein_base_4b_4step", steps=2000, batch_size=1,
                   learning_rate=1e-4, warmup_steps=50, lora_rank=32, lora_targets="preset",
                   gradient_checkpointing=True, save_every=250, validation_prompts=RECIPE_SAMPLE,
                   validation_seeds="0", validation_every=250, seed=0)
    chart = w.node("DD_LossChart")
    chart_view = w.node("PreviewImage", title="Loss")
    student = w.node("DD_LoadStudent", title="Load Student (base + the 4-step LoRA)")
    samples = [
        w.node("DD_Sample", title="Teacher: 50 steps, CFG 4", prompt=RECIPE_SAMPLE, seed=0, steps=50, cfg=4.0,
               width=1024, height=1024),
        w.node("DD_Sample", title="Base: 4 steps, CFG 1 (no distillation)", prompt=RECIPE_SAMPLE, seed=0, steps=4,
               cfg=1.0, width=1024, height=1024),
        w.node("DD_Sample", title="Student: 4 steps, CFG 1", prompt=RECIPE_SAMPLE, seed=0, steps=4, cfg=1.0,
               width=1024, height=1024),
    ]
    stitch_a = w.node("ImageStitch", spacing_width=8)
    stitch_b = w.node("ImageStitch", spacing_width=8)
    save = w.node("SaveImage", title="Teacher 50 | base 4 | student 4", box_width=360,
                  filename_prefix="dit_distillery/klein_4step")
    w.columns([[note], [pipeline, size, size_text], [distill_data, preview, loss], [train], [chart, chart_view],
               [student, *samples], [stitch_a, stitch_b, save]])

    w.connect(pipeline, "pipeline", size, "pipeline")
    w.connect(size, "report", size_text, "source")
    w.connect(pipeline, "pipeline", distill_data, "teacher")
    w.connect(distill_data, "preview", preview, "images")
    w.connect(pipeline, "pipeline", train, "pipeline")
    w.connect(distill_data, "dataset", train, "dataset")
    w.connect(loss, "loss", train, "loss")
    w.connect(train, "loss_history", chart, "loss_history")
    w.connect(chart, "chart", chart_view, "images")
    w.connect(train, "model", student, "pipeline")
    w.connect(pipeline, "pipeline", samples[0], "pipeline")
    w.connect(pipeline, "pipeline", samples[1], "pipeline")
    w.connect(student, "pipeline", samples[2], "pipeline")
    w.connect(samples[0], "images", stitch_a, "image1")
    w.connect(samples[1], "images", stitch_a, "image2")
    w.connect(stitch_a, "IMAGE", stitch_b, "image1")
    w.connect(samples[2], "images", stitch_b, "image2")
    w.connect(stitch_b, "IMAGE", save, "images")
    w.group("1 · teacher dataset: 50 steps, CFG 4, 1024²", [distill_data, preview, loss], "#8A8")
    w.group("2 · LoRA student: 4 steps, CFG 1", [train, chart, chart_view], "#b58b2a")
    w.group("3 · teacher | base | student", [student, *samples, stitch_a, stitch_b, save], "#a1309b")
    return w.to_json()


WORKFLOWS = {
    "quickstart": quickstart,
    "shrink_qwen_image": shrink_qwen_image,
    "distill_qwen_image_lora": distill_qwen_image_lora,
    "aaadit_from_scratch": aaadit_from_scratch,
    "qwen_image_finetune": qwen_image_finetune,
    "keep_lora_few_step_z_image": keep_lora_few_step_z_image,
    "keep_lora_few_step_qwen_image": keep_lora_few_step_qwen_image,
    "distill_flux2_klein_4step": distill_flux2_klein_4step,
}


def node_specs() -> dict:
    """Our nodes (as ComfyUI serves them) and the recorded core nodes."""
    return {**oi.core_object_info(), **oi.pack_object_info(oi.load_pack())}


def render(name: str, info: dict | None = None) -> str:
    return json.dumps(WORKFLOWS[name](info or node_specs()), indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare the files with what would be written")
    args = parser.parse_args(argv)
    info = node_specs()
    stale = []
    for name in WORKFLOWS:
        text = render(name, info)
        path = OUT / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"out of date (run python scripts/make_workflows.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
