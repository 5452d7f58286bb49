"""DiT Distillery core: make diffusion transformers smaller and faster.

Shrink a big DiT, build a small one, generate a teacher dataset, train (SFT or Direct Distill, LoRA or full)
and load the student back. This package never imports ComfyUI; the node pack in `nodes/` is a thin adapter
over it, and `python -m dit_distillery` runs the same jobs headless.
"""

__version__ = "0.1.0"
