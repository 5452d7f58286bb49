"""Pipeline from ComfyUI Models without ComfyUI: what it refuses, and the refs it makes (stand-ins for ComfyUI's
objects with just the attributes the node reads). The node against real ComfyUI objects is
tests/test_comfy_models.py."""

import sys
from types import SimpleNamespace

import pytest
import torch

from dit_distillery import tiny
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError
from tests.test_nodes_common import call, load_pack


class LatentFormat:
    latent_channels = 16
    latent_dimensions = 3


def fake_model(dit=None, patches=None):
    dit = dit if dit is not None else tiny.tiny_qwen_image_dit(32)
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=dit), patches=patches or {}, object_patches={},
                           model_options={"transformer_options": {}},
                           get_model_object=lambda name: LatentFormat())


def fake_vae(channels=16):
    return SimpleNamespace(latent_channels=channels, spacial_compression_encode=lambda: 8)


@pytest.fixture(scope="module")
def module():
    load_pack()
    return next(m for name, m in sys.modules.items() if name.endswith("nodes.comfy_models"))


def test_every_input_is_required_and_named_when_missing():
    with pytest.raises(DistilleryError, match="clip.*no CLIP is connected"):
        call("DD_PipelineFromComfyModels", model=fake_model(), clip=None, vae=fake_vae())
    with pytest.raises(DistilleryError, match="model.*not a ComfyUI MODEL"):
        call("DD_PipelineFromComfyModels", model=object(), clip=object(), vae=fake_vae())


def test_a_vae_of_another_model_is_refused_before_anything_runs():
    with pytest.raises(DistilleryError, match="48 latent channels.*takes 16.*VAE of Qwen-Image"):
        call("DD_PipelineFromComfyModels", model=fake_model(), clip=object(), vae=fake_vae(48))


def test_the_ref_describes_the_model_and_its_lora_patches_and_keeps_them_when_derived():
    patches = {"diffusion_model.transformer_blocks.0.attn.to_q.weight": [(1.0,)]}
    ref, summary = call("DD_PipelineFromComfyModels", model=fake_model(patches=patches), clip=object(),
                        vae=fake_vae())
    assert summary.startswith("ComfyUI MODEL (Qwen-Image, 2 blocks, width 64) + CLIP + VAE")
    assert "1 weights patched (LoRA on the MODEL)" in summary
    child = ref.with_lora("/x/student.safetensors", 0.5)
    assert type(child) is type(ref) and child.comfy is ref.comfy and child.parent is ref
    assert child.describe().endswith("LoRA student.safetensors x0.5") and child.same_components(ref)
    assert child.not_exportable
    # the size report reads the MODEL's family and config without building anything
    report, _ = call("DD_ModelSizeReport", pipeline=child)
    assert "ComfyUI MODEL (Qwen-Image" in report


def test_quantized_weights_are_refused_for_our_dit_by_name(module):
    class Quantized(torch.Tensor):
        pass

    weight = torch.zeros(2, 2).as_subclass(Quantized)
    with pytest.raises(DistilleryError, match="img_in.weight.*Quantized.*GGUF.*Sampling with this MODEL"):
        module._plain("img_in.weight", weight)
    with torch.inference_mode():
        frozen, fp8 = torch.ones(3), torch.ones(2, 2).to(torch.float8_e4m3fn)
    for tensor in (frozen, fp8):
        alias = module._plain("w", tensor)
        assert not alias.is_inference() and alias.data_ptr() == tensor.data_ptr() and alias.dtype == tensor.dtype


def test_our_text_rows_become_comfyui_conditioning_of_their_real_tokens(module):
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    text = TextEmbeds(embeds, torch.tensor([[True, True, True, True], [True, True, False, False]]))
    full, short = module._cond_row(text, 0), module._cond_row(text, 1)
    assert torch.equal(full[0], embeds[:1]) and full[1] == {}
    assert torch.equal(short[0], embeds[1:2, :2]) and short[1] == {}
    assert module._same_cond(full, module._cond_row(text, 0)) and not module._same_cond(full, short)


def test_export_training_job_refuses_a_pipeline_of_comfyui_objects():
    ref, _ = call("DD_PipelineFromComfyModels", model=fake_model(), clip=object(), vae=fake_vae())
    dataset, *_ = call("DD_SyntheticShapesDataset", count=2, size=32)
    (loss,) = call("DD_DirectDistillLoss")
    with pytest.raises(DistilleryError, match="ComfyUI's MODEL, CLIP and VAE.*Train LoRA / Full"):
        call("DD_ExportTrainingJob", pipeline=ref, dataset=dataset, loss=loss)
