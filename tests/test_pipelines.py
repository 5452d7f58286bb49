"""Velocity adapters, the Euler/CFG loop and the text-to-image pipelines on tiny models of both families."""

import functools
import json

import pytest
import torch

from dit_distillery import tiny
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.pipelines import TextToImagePipeline
from dit_distillery.pipelines.loading import load_pipeline, save_pipeline
from dit_distillery.sampling import euler_denoise, guided_velocity
from dit_distillery.velocity import predict_velocity

FAMILIES = ["aaadit", "qwen_image"]
PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny.tiny_pipeline(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def folders(pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(pipe, root / family) for family, pipe in pipes.items()}


def _text(pipe, prompts):
    return pipe.encode_prompts(prompts)


# ----------------------------------------------------------------------------------------------------------
# velocity

def test_qwen_image_velocity_is_diffusers_call(pipes):
    from diffusers import QwenImagePipeline

    pipe = pipes["qwen_image"]
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    text = _text(pipe, PROMPTS)
    with torch.no_grad():
        ours = predict_velocity(pipe.dit, latents, sigma, text)
        # what QwenImagePipeline.__call__ does: pack, timestep = t / 1000 with t = 1000 sigma, unpack
        packed = QwenImagePipeline._pack_latents(latents, 2, 16, 4, 6)
        out = pipe.dit(hidden_states=packed, timestep=sigma * 1000 / 1000, encoder_hidden_states=text.embeds,
                       encoder_hidden_states_mask=text.mask, img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)[0]
        expected = QwenImagePipeline._unpack_latents(out, 32, 48, 8)[:, :, 0]
    assert ours.shape == latents.shape
    assert torch.allclose(ours, expected, atol=1e-6)


def test_aaadit_velocity_passes_sigma_times_1000(pipes):
    pipe = pipes["aaadit"]
    latents = torch.randn(2, 128, 2, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    text = _text(pipe, PROMPTS)
    with torch.no_grad():
        ours = predict_velocity(pipe.dit, latents, sigma, text)
        expected = pipe.dit(latents, text.embeds, sigma * 1000, text.mask)
        assert torch.equal(ours, expected)
        assert not torch.allclose(ours, pipe.dit(latents, text.embeds, sigma, text.mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_through_peft_wrapper(pipes, family):
    from peft import LoraConfig, get_peft_model

    pipe = pipes[family]
    model = tiny.tiny_aaadit(32) if family == "aaadit" else tiny.tiny_qwen_image_dit(32)
    c = pipe.codec.latent_channels
    latents = torch.randn(1, c, 4, 4, generator=torch.Generator().manual_seed(1))
    text = _text(pipe, PROMPTS[:1])
    with torch.no_grad():
        before = predict_velocity(model, latents, torch.tensor([0.5]), text)
        wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["to_q", "to_k"]))
        after = predict_velocity(wrapped, latents, torch.tensor([0.5]), text)
    assert torch.allclose(before, after, atol=1e-6)  # LoRA B starts at zero


def test_velocity_rejects_mismatched_batches(pipes):
    pipe = pipes["aaadit"]
    with pytest.raises(DistilleryError):
        predict_velocity(pipe.dit, torch.zeros(2, 128, 2, 2), torch.tensor([0.5, 0.5]), _text(pipe, PROMPTS[:1]))
    with pytest.raises(DistilleryError):
        predict_velocity(pipe.dit, torch.zeros(128, 2, 2), torch.tensor([0.5]), _text(pipe, PROMPTS[:1]))


# ----------------------------------------------------------------------------------------------------------
# Euler + CFG

def test_euler_with_the_ideal_velocity_lands_on_x0():
    x0 = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    text = TextEmbeds(torch.zeros(3, 1, 2))
    sigmas = [1.0, 0.7, 0.3, 0.05]
    x_start = 0.0 * x0 + 1.0 * noise

    def ideal(x, sigma, _text):  # the exact velocity noise - x0, read off the current point
        return (x - x0) / sigma.view(-1, 1, 1, 1)

    seen = []
    out = euler_denoise(ideal, x_start, sigmas, text, callback=lambda i, n, p: seen.append((i, n, p)))
    assert torch.allclose(out, x0, atol=1e-5)
    assert [(i, n) for i, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert torch.allclose(seen[0][2], x0, atol=1e-5)  # the preview is the x0 estimate


def test_cfg_is_one_batched_call_and_diffsynths_formula():
    calls = []

    def fake(x, sigma, text):  # the mean of each row's real (unmasked) embeddings
        calls.append(x.shape[0])
        mask = torch.ones(text.embeds.shape[:2]) if text.mask is None else text.mask.float()
        mean = (text.embeds.mean(-1) * mask).sum(1) / mask.sum(1)
        return mean.view(-1, 1, 1, 1) + 0 * x

    pos, neg = TextEmbeds(torch.full((2, 3, 4), 2.0)), TextEmbeds(torch.full((1, 5, 4), 0.5))
    x, sigma = torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 0.5])
    v = guided_velocity(fake, x, sigma, pos, 4.0, neg.repeat(2))
    assert calls == [4]  # positive and negative in one call
    # the positive rows were padded from 3 to 5 tokens to share the call; the mask keeps them exact
    assert torch.allclose(v, torch.full_like(v, 0.5 + 4.0 * (2.0 - 0.5)))
    calls.clear()
    euler_denoise(fake, torch.zeros(2, 1, 2, 2), [1.0, 0.5], pos)
    assert calls == [2, 2]  # cfg 1: no negative pass at all
    with pytest.raises(DistilleryError):
        euler_denoise(fake, torch.zeros(2, 1, 2, 2), [1.0, 0.5], pos, cfg_scale=3.0)


def test_euler_is_differentiable_through_every_step(pipes):
    pipe = pipes["aaadit"]
    dit = tiny.tiny_aaadit(32).train()
    text = _text(pipe, PROMPTS)
    noise = pipe.initial_noise([0, 1], 32, 32)
    out = euler_denoise(functools.partial(predict_velocity, dit), noise, [1.0, 0.6, 0.3], text)
    out.square().mean().backward()
    grads = [p.grad for p in dit.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_stop_flag_and_bad_sigmas():
    v = lambda x, s, t: x  # noqa: E731
    text = TextEmbeds(torch.zeros(1, 1, 2))
    with pytest.raises(StopRequested):
        euler_denoise(v, torch.zeros(1, 1, 2, 2), [1.0, 0.5], text, stop=lambda: True)
    for bad in ([], [0.5, 0.7], [1.0, 0.0], [1.2]):
        with pytest.raises(DistilleryError):
            euler_denoise(v, torch.zeros(1, 1, 2, 2), bad, text)


# ----------------------------------------------------------------------------------------------------------
# pipelines

@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_round_trip(pipes, folders, family):
    loaded = load_pipeline(folders[family])
    assert loaded.family == family and loaded.template == pipes[family].template
    assert loaded.codec.identity == pipes[family].codec.identity
    assert loaded.prompt_encoder.identity == pipes[family].prompt_encoder.identity
    first = loaded.sample(PROMPTS, seeds=[0, 1], steps=8, height=32, width=32)
    second = loaded.sample(PROMPTS, seeds=[0, 1], steps=8, height=32, width=32)
    original = pipes[family].sample(PROMPTS, seeds=[0, 1], steps=8, height=32, width=32, output="latent")
    assert torch.equal(first.latents, second.latents) and torch.equal(first.latents, original.latents)
    assert len(first.images) == 2 and first.images[0].size == (32, 32)
    assert first.pixels.shape == (2, 3, 32, 32) and float(first.pixels.abs().max()) <= 1.0
    assert original.images == [] and original.pixels is None


def test_saved_qwen_folder_is_a_diffusers_pipeline(folders):
    from diffusers import QwenImagePipeline

    diffusers_pipe = QwenImagePipeline.from_pretrained(folders["qwen_image"])
    assert type(diffusers_pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    index = json.loads((folders["qwen_image"] / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline" and index["_dit_distillery"]["family"] == "qwen_image"


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_seeds_equals_singles(pipes, family):
    pipe = pipes[family]
    batch = pipe.sample(PROMPTS[0], seeds=[3, 4, 5], steps=4, output="latent").latents
    singles = torch.cat([pipe.sample(PROMPTS[0], seeds=s, steps=4, output="latent").latents for s in (3, 4, 5)])
    chunked = pipe.sample(PROMPTS[0], seeds=[3, 4, 5], steps=4, output="latent", batch_size=2).latents
    assert torch.allclose(batch, singles, atol=1e-5) and torch.allclose(batch, chunked, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_path(pipes, family):
    pipe = pipes[family]
    text, negative = pipe.encode_prompts(PROMPTS[:1]), pipe.encode_prompts([""])
    noise = pipe.initial_noise([7], 32, 32)
    sigmas = pipe.sigmas(4, 32, 32)
    with torch.no_grad():
        expected = euler_denoise(functools.partial(predict_velocity, pipe.dit), noise, sigmas, text,
                                 cfg_scale=3.0, negative_text=negative)
    guided = pipe.sample(PROMPTS[0], seeds=7, steps=4, cfg_scale=3.0, negative_prompt="", output="latent")
    plain = pipe.sample(PROMPTS[0], seeds=7, steps=4, cfg_scale=1.0, output="latent")
    assert torch.allclose(guided.latents, expected, atol=1e-6)
    assert not torch.allclose(guided.latents, plain.latents, atol=1e-3)


def test_pipeline_shapes_schedule_and_noise(pipes):
    qwen, aaa = pipes["qwen_image"], pipes["aaadit"]
    assert qwen.latent_shape(64, 32) == (16, 8, 4) and aaa.latent_shape(64, 32) == (128, 4, 2)
    assert qwen.image_seq_len(1328, 1328) == 6889 and aaa.image_seq_len(256, 256) == 256
    assert qwen.sigmas(4, 1328, 1328) == pytest.approx([1, 0.78098, 0.47555, 0.02], abs=6e-5)
    assert qwen.sigmas(4, 1328, 1328, mu=0.8) == pytest.approx([1, 0.77764, 0.47078, 0.02], abs=6e-5)
    from dit_distillery.noise import initial_noise

    assert torch.equal(aaa.initial_noise([1, 2], 32, 32), initial_noise([1, 2], (128, 2, 2)).float())
    for bad in ((30, 32), (32, 0), (8, 8)):
        with pytest.raises(DistilleryError):
            qwen.latent_shape(*bad)


def test_pairing_prompts_seeds_and_callbacks(pipes):
    pipe = pipes["aaadit"]
    steps = []
    result = pipe.sample(PROMPTS, seeds=9, steps=3, output="latent", batch_size=1,
                         callback=lambda i, n, preview: steps.append((i, n, tuple(preview.shape))))
    assert result.seeds == [9, 9] and result.prompts == PROMPTS
    assert [(i, n) for i, n, _ in steps] == [(i, 6) for i in range(1, 7)] and steps[0][2] == (1, 128, 2, 2)
    with pytest.raises(DistilleryError):
        pipe.sample(PROMPTS, seeds=[1, 2, 3], steps=2)
    with pytest.raises(DistilleryError):
        pipe.sample(PROMPTS, steps=2, output="video")
    with pytest.raises(StopRequested):
        pipe.sample(PROMPTS, steps=2, stop=lambda: True)


def test_pipeline_checks_components(pipes):
    qwen, aaa = pipes["qwen_image"], pipes["aaadit"]
    with pytest.raises(DistilleryError):  # AAADiT with Qwen-Image's 16-channel VAE
        TextToImagePipeline(aaa.dit, aaa.prompt_encoder, qwen.codec)
    with pytest.raises(DistilleryError):
        TextToImagePipeline(aaa.dit, aaa.prompt_encoder, aaa.codec, family="qwen_image")


def test_embedded_default_pipeline():
    pipe = tiny.embedded_default_pipeline()
    assert pipe.codec.identity == "pixel:p4" and pipe.family == "aaadit"
    params = sum(p.numel() for p in pipe.dit.parameters())
    assert 500_000 < params < 3_000_000  # CPU-trainable in minutes
    result = pipe.sample("a red circle on a blue background", seeds=0, steps=2)
    assert result.images[0].size == (32, 32)


# ----------------------------------------------------------------------------------------------------------
# loading components from files

def test_load_with_single_file_components(pipes, folders, tmp_path):
    from safetensors.torch import save_file

    from dit_distillery.models import registry

    pipe = pipes["aaadit"]
    dit_file = registry.save_dit(pipe.dit, tmp_path / "student.safetensors")
    te_file = tmp_path / "te.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.prompt_encoder.text_encoder.state_dict().items()}, str(te_file))
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.codec.vae.state_dict().items()}, str(vae_file))
    folder = folders["aaadit"]
    loaded = load_pipeline(folder, dit=dit_file, text_encoder=te_file, vae=vae_file)
    reference = pipe.sample(PROMPTS[0], seeds=2, steps=3, output="latent").latents
    for part in ("dit", "text_encoder", "vae"):  # the files bring back every weight bit for bit ...
        module = {"dit": lambda p: p.dit, "text_encoder": lambda p: p.prompt_encoder.text_encoder,
                  "vae": lambda p: p.codec.vae}[part]
        for (name, a), (_, b) in zip(module(pipe).state_dict().items(), module(loaded).state_dict().items(), strict=True):
            assert torch.equal(a, b), f"{part}.{name}"
    # ... while sampling through other module instances is reproducible only to float rounding (kernel paths can
    # differ with memory alignment, ~1e-7 on some CPUs)
    torch.testing.assert_close(loaded.sample(PROMPTS[0], seeds=2, steps=3, output="latent").latents, reference,
                               rtol=1e-5, atol=1e-5)
    # without a diffusers folder, every component must be named; a lone text-encoder file needs its config
    with pytest.raises(DistilleryError, match="config"):
        load_pipeline(None, dit=dit_file, text_encoder=te_file, tokenizer=folder / "tokenizer", vae=vae_file)
    alone = load_pipeline(None, dit=dit_file, text_encoder=folder / "text_encoder", tokenizer=folder / "tokenizer",
                          vae=vae_file, vae_config=folder / "vae", text_max_length=32)
    assert alone.defaults["height"] == 256  # no model_index: the family's own defaults
    again = alone.sample(PROMPTS[0], seeds=2, steps=3, cfg_scale=1.0, height=32, width=32, output="latent").latents
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(DistilleryError, match="tokenizer"):
        load_pipeline(None, dit=dit_file, text_encoder=folder / "text_encoder", vae=vae_file)


def test_builtin_sources_and_missing_folders(pipes, tmp_path):
    tiny_q = load_pipeline("tiny:qwen_image")
    assert tiny_q.family == "qwen_image"
    with pytest.raises(DistilleryError, match="model_index"):
        load_pipeline(tmp_path)
    with pytest.raises(DistilleryError, match="no such"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(DistilleryError):
        save_pipeline(pipes["aaadit"], tmp_path.parent)  # exists and is not empty


def test_sample_cli(tmp_path, capsys):
    from dit_distillery.cli import main

    out = tmp_path / "img.png"
    code = main(["sample", "--pipeline", "tiny", "--prompt", "a red circle", "--seed", "1", "--seed", "2",
                 "--steps", "2", "--out", str(out), "--latents-out", str(tmp_path / "lat.safetensors"), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["seeds"] == [1, 2] and report["steps"] == 2
    assert (tmp_path / "img_0.png").is_file() and (tmp_path / "img_1.png").is_file()
    assert (tmp_path / "lat.safetensors").is_file()
    assert main(["sample", "--pipeline", "tiny", "--prompt", "x", "--out", str(tmp_path / "x.jpg")]) == 2
    assert not (tmp_path / "x.jpg").exists()


WAN_VAE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
from comfy.ldm.wan.vae import WanVAE
from safetensors.torch import save_file
torch.manual_seed(0)
vae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]).eval()
for p in vae.parameters():  # comfy's layers start uninitialised
    p.data = torch.randn_like(p) * 0.1
image = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
with torch.no_grad():
    mean = vae.encode(image)
save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, sys.argv[2] + "/wan_vae.safetensors")
save_file({"image": image, "mean": mean.contiguous()}, sys.argv[2] + "/reference.safetensors")
"""


@pytest.mark.comfyui
@pytest.mark.skipif(not __import__("os").environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_comfyui_qwen_image_vae_file_loads(tmp_path):
    """ComfyUI keeps Qwen-Image's VAE in Wan 2.1's layout: converted with diffusers' converter, it encodes the same."""
    import os
    import subprocess
    import sys

    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import load_file

    from dit_distillery.pipelines.loading import load_vae

    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    subprocess.run([python, "-c", WAN_VAE_SCRIPT, os.environ["COMFYUI_DIR"], str(tmp_path)], check=True)
    AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2).save_config(tmp_path / "cfg")
    vae = load_vae(tmp_path / "wan_vae.safetensors", "qwen_image", config_dir=tmp_path / "cfg")
    reference = load_file(str(tmp_path / "reference.safetensors"))
    with torch.no_grad():
        mean = vae.encode(reference["image"]).latent_dist.mode()
    assert torch.allclose(mean, reference["mean"], atol=1e-5)
