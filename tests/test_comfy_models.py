"""Pipeline from ComfyUI Models in a real ComfyUI: parity with CLIPTextEncode, VAEEncode/VAEDecode, ComfyUI's
sampler and ModelPatcher's LoRA patches, and the MODEL unchanged by training on it.

Runs only where `COMFYUI_DIR` names a ComfyUI checkout (scripts/setup_comfyui.sh), in its Python (`COMFYUI_PYTHON`):
tests/comfyui_support/comfy_models_check.py builds small random CLIP/VAE/MODEL objects with ComfyUI's own classes,
runs our node and ComfyUI's nodes on them, and reports what it measured (about a minute on 2 CPU cores).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfyui-venv/bin/python python -m pytest -m comfyui tests/test_comfy_models.py

Full-size parity (the real 7B Qwen2.5-VL, the 20B DiT, a real VAE at 1328x1328) is the slow real-scale check's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "comfyui_support" / "comfy_models_check.py"

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout (scripts/setup_comfyui.sh)"),
]

FP32 = 1e-5  # fp32 rounding of the same computation done in another order (e.g. ComfyUI's process_in/out)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy_models")
    out = work / "report.json"
    run = subprocess.run([COMFYUI_PYTHON, str(SCRIPT), COMFYUI_DIR, str(REPO), str(work), str(out)], cwd=work,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0 and out.is_file(), run.stderr[-6000:]
    return json.loads(out.read_text())


def test_prompts_are_encoded_exactly_as_clip_text_encode(report):
    for row in report["text"]:
        assert row["equal"] and row["ours_tokens"] == row["comfy_shape"][1]  # the same tokens, template dropped
        assert not row["comfy_mask"] and row["ours_mask_real_prefix"] and row["padding_zero"]


def test_comfyuis_qwen_image_encoding_is_diffusers_template_and_34_token_drop(report):
    """The same text-encoder weights in transformers' Qwen2.5-VL behind diffusers' QwenImagePipeline encoding
    (Load Pipeline's path), with ComfyUI's Qwen2.5 tokenizer: the same tokens are kept, the same values."""
    ref = report["diffusers_text"]
    assert ref["tokens"] == [row["comfy_shape"][1] for row in report["text"]]
    assert ref["scale"] > 0.1 and ref["max_diff"] < FP32 * max(1.0, ref["scale"])


def test_the_training_cache_holds_clip_text_encode_and_vae_encode(report):
    for item in report["cache"]:
        assert item["embeds_equal"] and item["mask_all_real"]
        assert item["latents_max_diff"] < FP32  # process_in(VAEEncode) of the same image


def test_latents_decode_and_encode_as_vae_decode_and_encode(report):
    assert report["decode"]["shape"] == [1, 3, 32, 32] and report["decode"]["comfy_shape"] == [1, 32, 32, 3]
    assert report["decode"]["max_diff"] < FP32
    assert report["encode"]["shape"] == [1, 16, 4, 4] and report["encode"]["max_diff"] < FP32


def test_our_latents_are_diffusers_qwen_image_latents(report):
    """The same VAE weights in diffusers' AutoencoderKLQwenImage (Load Pipeline's path): our normalised latents
    (ComfyUI's Wan21 process_in) are its `(z - latents_mean) / latents_std`."""
    vae = report["diffusers_vae"]
    assert vae["latent_scale"] > 0.1
    assert vae["encode_max_diff"] < FP32 and vae["decode_max_diff"] < FP32


def test_comfyui_samples_the_teacher_from_our_noise(report):
    sample = report["sample"]
    assert sample["starts_from_our_noise"]
    assert not report["sample_materialised_by_sampling"]  # ComfyUI's sampler needed no DiT of ours
    assert sample["max_diff"] < FP32 * max(1.0, sample["scale"]) and sample["trajectory_max_diff"] < FP32


def test_our_dit_holds_the_models_own_tensors(report):
    alias = report["alias"]
    assert alias["shared"] == alias["total"] > 0 and alias["inference_tensors_in_ours"] == 0


def test_generate_distill_dataset_records_comfyuis_samples_and_our_seeds(report):
    dataset = report["dataset"]
    assert dataset["rows"] == 2 and dataset["latents_equal"] and dataset["seeds"] == [21, 22]


def test_training_a_lora_leaves_the_model_bit_identical(report):
    train = report["train"]
    assert train["steps"] == 2 and train["weights"] == "comfy_lora.safetensors" and train["model_unchanged"]


def test_load_student_merges_the_trained_lora_over_the_models_weights(report):
    student = report["student"]
    assert student["model"] == "ModelPatcher" and student["text"].count("LoRA comfy_lora.safetensors") == 1
    assert student["same_as_train_output"]  # Train's `model` output is the same student
    assert student["uses_our_sampler"] and student["differs_from_teacher"] > 0 and student["model_unchanged"]


def test_a_lora_on_the_model_is_trained_with_as_comfyui_patches_it(report):
    lora = report["lora"]
    assert lora["patched"] == 6 and "6 weights patched" in lora["summary"]
    assert lora["equal_to_comfy"] and lora["patched_differ_from_base"] and lora["unpatched_shared"]
    assert lora["sample_max_diff"] < FP32 < lora["lora_changes_sample"] and lora["model_unchanged"]


def test_fp8_weights_are_sampled_by_comfyui_and_shared_by_our_dit(report):
    fp8 = report["fp8"]
    assert fp8["stored"] == fp8["ours"] == "torch.float8_e4m3fn" and fp8["values_equal"]
    assert fp8["fp8_shared"] == fp8["fp8_total"] > 10  # every Linear weight: the MODEL's own fp8 tensor
    assert fp8["sample_max_diff"] < FP32 * max(1.0, fp8["scale"])


def test_export_training_job_refuses_it_by_name(report):
    assert report["export"].startswith("DistilleryError") and "ComfyUI's MODEL, CLIP and VAE" in report["export"]
