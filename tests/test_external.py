"""`dit_distillery.external`: a pipeline over a front end's model, text encoder, VAE and sampler (what the
"Pipeline from ComfyUI Models" node builds from ComfyUI's objects), on the tiny Qwen-Image pipeline.

The "front end" here is the tiny pipeline itself; tests/test_comfy_models.py runs the same against real
ComfyUI objects."""

import functools

import pytest
import torch

from dit_distillery import families, tiny
from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.external import (ExternalCodec, ExternalPipeline, ExternalPromptEncoder, assign_weights,
                                     detect_state, skeleton)
from dit_distillery.noise import initial_noise
from dit_distillery.sampling import euler_denoise
from dit_distillery.velocity import predict_velocity

PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def ref():
    return tiny.tiny_pipeline("qwen_image")


def _front_end(ref, calls=None):
    """An ExternalPipeline over `ref`'s parts, as a front end would hand them over."""
    state = ref.dit.state_dict()
    family, config = detect_state(state, lambda k: tuple(state[k].shape))
    built = []

    def materialise():
        built.append(1)
        return assign_weights(skeleton(family, config), state)

    def encode_one(prompt):
        text = ref.prompt_encoder.encode([prompt])
        return text.embeds, text.mask

    def sampler(noise, sigmas, text, *, cfg_scale, negative_text, callback, stop, states=None):
        if calls is not None:
            calls.append(noise.clone())
        return euler_denoise(functools.partial(predict_velocity, ref.dit), noise, sigmas, text, cfg_scale=cfg_scale,
                             negative_text=negative_text, callback=callback, stop=stop, states=states)

    encoder = ExternalPromptEncoder(encode_one, ref.prompt_encoder.width, "te:tiny")
    codec = ExternalCodec(ref.codec.encode, ref.codec.decode, ref.codec.latent_channels, ref.codec.spatial_factor,
                          "vae:tiny")
    pipe = ExternalPipeline(skeleton(family, config), materialise, encoder, codec, dit_identity="dit:tiny",
                            sampler=sampler, defaults=dict(ref.defaults))
    return pipe, built


def test_detect_state_reads_the_family_and_config_of_a_state(ref):
    state = ref.dit.state_dict()
    family, config = detect_state(state, lambda k: tuple(state[k].shape))
    assert family == "qwen_image" and families.detect(skeleton(family, config))[1] == families.detect(ref.dit)[1]
    with pytest.raises(DistilleryError, match="not a DiT"):
        detect_state(["a.weight"], lambda k: (1,))


def test_assign_weights_shares_the_tensors_and_never_changes_them(ref):
    state = {k: v.clone() for k, v in ref.dit.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    family, config = families.detect(ref.dit)[:2]
    model = assign_weights(skeleton(family, config), state)
    ours = model.state_dict()
    assert all(ours[k].data_ptr() == state[k].data_ptr() for k in state)  # no copy
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p is not state[k] for k, p in model.named_parameters())  # our own Parameter wrappers
    # a LoRA training step on our module: the caller's tensors are bit-identical afterwards
    from dit_distillery.lora import add_lora

    add_lora(model, families.get(family).default_lora_preset, rank=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    latents = torch.randn(1, 16, 4, 4)
    text = ref.prompt_encoder.encode(PROMPTS[:1])
    loss = predict_velocity(model, latents, torch.tensor([0.5]), text).square().mean()
    loss.backward()
    opt.step()
    assert all(torch.equal(state[k], before[k]) for k in state)
    model.to(torch.float64)  # casting or moving our module rebinds our Parameters only
    assert all(v.dtype == torch.float32 for v in state.values())


def test_fp8_weights_are_held_in_fp8_and_computed_in_the_compute_dtype(ref):
    from dit_distillery import fp8

    family, config = families.detect(ref.dit)[:2]
    state = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in ref.dit.state_dict().items()}
    model = assign_weights(skeleton(family, config), state, compute_dtype=torch.float32)
    ours = model.state_dict()
    assert ours["img_in.weight"].dtype == torch.float8_e4m3fn and ours["img_in.weight"].data_ptr() == \
        state["img_in.weight"].data_ptr()
    assert fp8.is_fp8_linear(model.img_in)
    dequantised = assign_weights(skeleton(family, config), {k: v.float() for k, v in state.items()})
    latents, text = torch.randn(1, 16, 4, 4), ref.prompt_encoder.encode(PROMPTS[:1])
    sigma = torch.tensor([0.5])
    assert torch.allclose(predict_velocity(model, latents, sigma, text),
                          predict_velocity(dequantised, latents, sigma, text), atol=1e-5)


def test_assign_weights_refuses_tensors_that_do_not_fit_by_name(ref):
    family, config = families.detect(ref.dit)[:2]
    state = dict(ref.dit.state_dict())
    state["img_in.scale_weight"] = torch.ones(())
    with pytest.raises(DistilleryError, match="unexpected: \\['img_in.scale_weight'\\]"):
        assign_weights(skeleton(family, config), state)
    del state["img_in.scale_weight"], state["proj_out.bias"]
    with pytest.raises(DistilleryError, match="missing: \\['proj_out.bias'\\]"):
        assign_weights(skeleton(family, config), state)


def test_prompt_encoder_pads_with_a_mask_and_checks_the_width(ref):
    pipe, _ = _front_end(ref)
    text = pipe.prompt_encoder.encode(PROMPTS)
    want = ref.prompt_encoder.encode(PROMPTS)
    assert text.embeds.shape == want.embeds.shape and torch.equal(text.mask, want.mask)
    for i in range(len(PROMPTS)):  # each row is the front end's own encoding of that prompt, padded with zeros
        n = int(want.mask[i].sum())
        assert torch.equal(text.embeds[i, :n], ref.prompt_encoder.encode([PROMPTS[i]]).embeds[0, :n])
        assert not text.embeds[i, n:].any()
    wrong = ExternalPromptEncoder(lambda p: (torch.zeros(1, 3, 7), None), 32, "x", what="clip", fix="use its CLIP.")
    with pytest.raises(DistilleryError, match=r"clip.*\[1, L, 32\]"):
        wrong.encode(["a"])


def test_identity_is_computed_once_and_only_when_asked():
    calls = []

    def identity():
        calls.append(1)
        return "te:1"

    enc = ExternalPromptEncoder(lambda p: (torch.zeros(1, 2, 4), None), 4, identity)
    assert calls == []
    assert enc.identity == enc.identity == "te:1" and calls == [1]


def test_codec_checks_the_front_ends_latent_shape(ref):
    codec = ExternalCodec(lambda x: torch.zeros(x.shape[0], 16, 2, 2), lambda z: z, 16, 8, "v")
    with pytest.raises(DistilleryError, match="not \\(1, 16, 4, 4\\)"):
        codec.encode(torch.zeros(1, 3, 32, 32))
    pipe, _ = _front_end(ref)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(pipe.codec.encode(images), ref.codec.encode(images))


def test_sampling_is_the_front_ends_from_our_noise_without_building_our_dit(ref):
    calls = []
    pipe, built = _front_end(ref, calls)
    got = pipe.sample(PROMPTS, seeds=[3, 4], steps=3, cfg_scale=2.0, output="latent", record=[0, 2])
    want = ref.sample(PROMPTS, seeds=[3, 4], steps=3, cfg_scale=2.0, output="latent", record=[0, 2])
    assert built == []  # teacher sampling needs only the front end
    assert torch.equal(calls[0], initial_noise([3, 4], (16, 4, 4), out_dtype=torch.float32))
    assert torch.allclose(got.latents, want.latents, atol=1e-6)
    assert torch.allclose(got.trajectory, want.trajectory, atol=1e-6)
    with pytest.raises(StopRequested):
        pipe.sample(PROMPTS[0], steps=2, stop=lambda: True)


def test_a_teacher_dataset_records_the_front_ends_identity_without_building_our_dit(ref, tmp_path):
    import json

    from dit_distillery.gen_dataset import generate_distill_dataset

    pipe, built = _front_end(ref)
    generate_distill_dataset(pipe, PROMPTS, tmp_path, teacher_steps=2, teacher_cfg=2.0, batch_size=2)
    settings = json.loads((tmp_path / "gen_dataset.json").read_text())
    assert built == [] and settings["teacher"]["dit"] == "dit:tiny"
    assert settings["teacher"]["prompt_encoder"] == "te:tiny" and settings["teacher"]["codec"] == "vae:tiny"


def test_our_dit_is_built_when_needed_and_students_use_our_sampler(ref):
    pipe, built = _front_end(ref)
    assert pipe.device == torch.device("cpu") and not pipe.materialised()
    student = pipe.with_dit(tiny.tiny_qwen_image_dit(ref.prompt_encoder.width, seed=5))
    assert student.sampler is None and type(student).__name__ == "TextToImagePipeline"
    dit = pipe.dit
    assert built == [1] and pipe.dit is dit  # once
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(dit.state_dict().values(), ref.dit.state_dict().values()))
    pipe.forget_dit()
    assert pipe.dit is not dit and built == [1, 1]
