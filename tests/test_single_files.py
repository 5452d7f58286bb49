"""ComfyUI's standard files, headless: DiT, text encoder and VAE files with no diffusers folder, the text encoders
read with the family's own configuration (bf16 and scaled fp8, ComfyUI's and transformers' names), the tokenizers
shipped with the pack, and the CLI's `sample` on the three files alone."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dit_distillery import families, fp8, tiny
from dit_distillery.errors import DistilleryError
from dit_distillery.families import flux2, qwen_image, z_image
from dit_distillery.pipelines.loading import load_pipeline, load_text_encoder
from dit_distillery.text import TOKENIZERS, QwenImagePromptEncoder, bundled_tokenizer

F8 = torch.float8_e4m3fn
PROMPTS = ["a cat on a mat", "hi"]


# ----------------------------------------------------------------------------------------------------------
# The shipped tokenizers

def test_shipped_tokenizers_give_qwens_token_ids():
    qwen25, qwen3 = bundled_tokenizer("qwen2_5"), bundled_tokenizer("qwen3")
    assert (len(qwen25), len(qwen3)) == (151665, 151669)
    for tok in (qwen25, qwen3):
        assert tok("a cat")["input_ids"] == [64, 8251]
        assert (tok.pad_token_id, tok.eos_token_id) == (151643, 151645)
    # Qwen-Image's template: diffusers drops its first 34 tokens (the system prompt up to "user\n")
    from diffusers import QwenImagePipeline

    template = QwenImagePipeline(None, None, None, qwen25, None).prompt_template_encode
    ids = qwen25(template.format("a cat"))["input_ids"]
    assert ids[:3] == [151644, 8948, 198] and ids[31:34] == [151644, 872, 198] and ids[34:36] == [64, 8251]
    # Qwen3: its think tokens (FLUX.2 [klein] encodes with enable_thinking=False), none for Z-Image's (True)
    chat = [{"role": "user", "content": "a cat"}]
    off = qwen3.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = qwen3.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3(off)["input_ids"] == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198, 151667, 271,
                                       151668, 271]
    assert qwen25("<think>")["input_ids"] == [13708, 766, 29]  # not a token of Qwen2.5
    assert "Apache License" in (TOKENIZERS / "qwen2_5" / "LICENSE").read_text()
    with pytest.raises(DistilleryError, match="no tokenizer of this name"):
        bundled_tokenizer("t5")


# ----------------------------------------------------------------------------------------------------------
# Qwen-Image's Qwen2.5-VL

def _qwen25(tokenizer=None, hidden=128, vocab=None, seed=0):
    """A tiny Qwen2.5-VL (heads of 128, as every Qwen2.5; the release's norm eps) and its ComfyUI-named state."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = tiny._special_ids(tokenizer) if tokenizer is not None else {}
    if vocab is not None:
        special["vocab_size"] = vocab
    text = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=hidden // 128,
                num_key_value_heads=1, rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                **special)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=56)
    with tiny.seeded(seed):
        full = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                   **special)).eval()
    comfy = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v.contiguous()
             for k, v in full.state_dict().items()}
    return full, comfy


def _scaled(state, prefix="model.layers."):
    """ComfyUI's scaled fp8 (scale_weight) of every Linear weight under `prefix`; embeddings and norms as they are."""
    out = {"scaled_fp8": torch.empty(0, dtype=F8)}
    for k, v in state.items():
        if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            out[k], out[k[: -len(".weight")] + ".scale_weight"] = (v / scale).to(F8), scale.reshape(())
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def qwen25():
    tok = tiny.tiny_tokenizer()
    full, comfy = _qwen25(tok)
    return tok, full, comfy, QwenImagePromptEncoder(full, tok).encode(PROMPTS).embeds


def test_qwen25_text_model_from_comfyui_and_transformers_files(qwen25, tmp_path):
    """Only the text model is loaded, and the prompt embeddings equal the full model's."""
    tok, full, comfy, want = qwen25
    assert {k.split(".")[0] for k in comfy} == {"model", "visual", "lm_head"}
    for name, state in (("comfyui", comfy), ("transformers", full.state_dict())):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        te = load_text_encoder(path, "qwen_image")
        assert type(te).__name__ == "Qwen2_5_VLTextModel" and not any("visual" in k for k in te.state_dict())
        torch.testing.assert_close(QwenImagePromptEncoder(te, tok).encode(PROMPTS).embeds, want, rtol=0, atol=1e-6)


def test_qwen25_scaled_fp8_file(qwen25, tmp_path):
    tok, full, comfy, want = qwen25
    path = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_file(_scaled(comfy), str(path))
    te = load_text_encoder(path, "qwen_image")
    q_proj = te.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == F8 and fp8.is_fp8_linear(q_proj) and q_proj.bias.dtype == torch.bfloat16
    assert te.embed_tokens.weight.dtype == torch.bfloat16 and te.dtype == torch.bfloat16  # fp8 computes in bf16
    got = QwenImagePromptEncoder(te, tok).encode(PROMPTS).embeds
    assert float((got.float() - want).norm() / want.norm()) < 0.1
    plain = load_text_encoder(path, "qwen_image", dtype=torch.float32, fp8="dequantise")
    assert not any(fp8.is_fp8_linear(m) for m in plain.modules())
    kept = load_text_encoder(path, "qwen_image", dtype=torch.float32)
    torch.testing.assert_close(QwenImagePromptEncoder(kept, tok).encode(PROMPTS).embeds,
                               QwenImagePromptEncoder(plain, tok).encode(PROMPTS).embeds)


def test_wrong_or_damaged_text_encoder_files_are_refused_by_name(qwen25, tmp_path, monkeypatch):
    tok, full, comfy, _ = qwen25
    cases = {}
    qwen3 = {"model." + k: v for k, v in tiny.tiny_qwen3_encoder(tok).state_dict().items()}
    cases["qwen3.safetensors"] = (qwen3, "qwen_image", "as Qwen3 does, not Qwen2.5")
    cases["qwen25.safetensors"] = (comfy, "z_image", "Qwen3 normalises queries per head")
    dit = tiny.tiny_qwen_image_dit().state_dict()
    cases["dit.safetensors"] = (dit, "qwen_image", "no token embedding")
    unscaled = _scaled(comfy)
    del unscaled["model.layers.1.mlp.down_proj.scale_weight"]
    cases["missing_scale.safetensors"] = (unscaled, "qwen_image", "no scale.*layers.1.mlp.down_proj.weight")
    incomplete = {k: v for k, v in comfy.items() if k != "model.layers.1.mlp.up_proj.weight"}
    cases["incomplete.safetensors"] = (incomplete, "qwen_image", "1 tensors the .* needs are missing")
    for name, (state, family, message) in cases.items():
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        with pytest.raises(DistilleryError, match=message) as err:
            load_text_encoder(path, family)
        assert str(path) in str(err.value) and "Fix:" in str(err.value), name
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "qwen25.safetensors").read_bytes()[:-500])
    with pytest.raises(DistilleryError, match="corrupt or incomplete"):
        load_text_encoder(truncated, "qwen_image")
    # a file of the released width is read with the released config: a missing layer is named
    release = json.loads(json.dumps(qwen_image.QWEN25_VL_7B_CONFIG))
    release["text_config"].update(hidden_size=128, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1,
                                  num_hidden_layers=3, vocab_size=len(tok))
    monkeypatch.setattr(qwen_image, "QWEN25_VL_7B_CONFIG", release)
    with pytest.raises(DistilleryError, match="needs are missing .*layers.2"):
        load_text_encoder(tmp_path / "qwen25.safetensors", "qwen_image")


def test_released_encoders_are_chosen_by_the_files_width():
    """Only shapes are read: Qwen-Image's 7B, Z-Image's Qwen3-4B, klein's Qwen3-4B / 8B."""
    def shapes(width, layers=36, head=128):
        return {"embed_tokens.weight": (151936, width), "norm.weight": (width,),
                "layers.0.self_attn.q_norm.weight": (head,), "layers.0.self_attn.q_proj.bias": (width,)}

    for family, width, name, size in ((flux2, 2560, "Qwen3Model", 9728), (flux2, 4096, "Qwen3Model", 12288),
                                      (z_image, 2560, "Qwen3Model", 9728)):
        s = shapes(width)
        got_name, config = family.FAMILY.text_encoder_from_shapes(s.__getitem__, s)
        assert (got_name, config.intermediate_size, config.num_hidden_layers) == (name, size, 36)
    s = {k: v for k, v in shapes(3584).items() if "q_norm" not in k}
    name, config = qwen_image.FAMILY.text_encoder_from_shapes(s.__getitem__, s)
    assert (name, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == \
        ("Qwen2_5_VLTextModel", 28, 4, 152064)
    from transformers import Qwen2_5_VLTextModel

    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(config)
    assert sum(p.numel() for p in model.parameters()) == qwen_image.QWEN25_VL_7B_TEXT_PARAMS


@pytest.mark.parametrize("family", ["z_image", "flux2"])
def test_qwen3_files_of_z_image_and_flux2(family, tmp_path):
    """A Qwen3 file of another width (the release's other settings): read from its shapes, bf16 and scaled fp8."""
    from transformers import Qwen3Config, Qwen3Model

    spec, tok = families.get(family), tiny.tiny_tokenizer()
    release = z_image.QWEN3_4B_CONFIG if family == "z_image" else flux2.QWEN3_8B_CONFIG
    config = dict(release, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, **tiny._special_ids(tok))
    with tiny.seeded(4):
        model = Qwen3Model(Qwen3Config(**config)).eval()
    settings = {} if family == "z_image" else {"hidden_layers": [1, 2, 3], "max_length": 32}
    want = spec.prompt_encoder(model, tok, settings).encode(PROMPTS).embeds
    state = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn(len(tok), 32)  # an untied LM head (8B): not loaded
    for name, st in (("bf16", state), ("fp8_scaled", _scaled(state))):
        path = tmp_path / f"qwen3_{name}.safetensors"
        save_file(st, str(path))
        te = load_text_encoder(path, family, dtype=torch.float32)
        assert type(te).__name__ == "Qwen3Model"
        got = spec.prompt_encoder(te, tok, settings).encode(PROMPTS).embeds
        if name == "bf16":
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        else:
            assert fp8.is_fp8_linear(te.layers[0].self_attn.q_proj)
            assert float((got - want).norm() / want.norm()) < 0.1


# ----------------------------------------------------------------------------------------------------------
# The three files and nothing else

@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory):
    """Qwen-Image as ComfyUI's files: an fp8_e4m3fn DiT (diffusers names), a scaled fp8 Qwen2.5-VL (the full
    Qwen vocabulary, so the shipped tokenizer fits), and the VAE (here a tiny one: its config folder)."""
    out = tmp_path_factory.mktemp("comfy")
    dit = tiny.tiny_qwen_image_dit(joint_attention_dim=128, seed=1)
    save_file({k: (v.to(F8) if v.ndim == 2 else v).contiguous() for k, v in dit.state_dict().items()},
              str(out / "qwen_image_fp8_e4m3fn.safetensors"))
    _, comfy = _qwen25(tiny.tiny_tokenizer(), seed=2)
    comfy = {k: v.to(torch.bfloat16) for k, v in comfy.items() if not k.startswith(("visual.", "lm_head."))}
    comfy["model.embed_tokens.weight"] = (torch.randn(151665, 128, generator=torch.Generator().manual_seed(2)) *
                                          0.02).to(torch.bfloat16)
    save_file(_scaled(comfy), str(out / "qwen_2.5_vl_7b_fp8_scaled.safetensors"))
    tiny.tiny_qwen_image_vae(seed=3).save_pretrained(out / "vae")
    return out


def test_pipeline_from_comfyui_files_alone(comfy_files):
    files = dict(dit=comfy_files / "qwen_image_fp8_e4m3fn.safetensors", vae=comfy_files / "vae",
                 text_encoder=comfy_files / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    pipe = load_pipeline(None, **files, dtype=torch.float32)
    assert pipe.family == "qwen_image" and len(pipe.prompt_encoder.tokenizer) == 151665  # the shipped tokenizer
    assert fp8.is_fp8_linear(pipe.dit.transformer_blocks[0].attn.to_q)
    assert fp8.is_fp8_linear(pipe.prompt_encoder.text_encoder.layers[0].mlp.up_proj)
    image = pipe.sample("a cat", seeds=0, steps=2, height=32, width=32).pixels
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    # the CLI's and a training job's pipeline "default" given with all three files: the files alone
    same = load_pipeline("default", **files, dtype=torch.float32).sample("a cat", seeds=0, steps=2, height=32,
                                                                         width=32).pixels
    torch.testing.assert_close(same, image)
    with pytest.raises(DistilleryError, match="built-in pipelines only take a replacement DiT"):
        load_pipeline("default", dit=files["dit"], text_encoder=files["text_encoder"])
    with pytest.raises(DistilleryError, match="no vae given"):
        load_pipeline(None, dit=files["dit"], text_encoder=files["text_encoder"])


def test_cli_sample_with_the_three_files(comfy_files, tmp_path, capsys):
    from dit_distillery.cli import build_parser, main

    out = tmp_path / "cat.png"
    argv = ["--dit", str(comfy_files / "qwen_image_fp8_e4m3fn.safetensors"),
            "--text-encoder", str(comfy_files / "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
            "--vae", str(comfy_files / "vae")]
    assert main(["sample", *argv, "--prompt", "a cat", "--width", "32", "--height", "32", "--steps", "2",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["family"] == "qwen_image" and report["size"] == [32, 32] and out.is_file()
    args = build_parser("gen-dataset").parse_args(["gen-dataset", *argv, "--fp8", "dequantise", "--prompts", "x",
                                                   "--out", str(tmp_path / "d")])
    assert (args.text_encoder, args.fp8) == (argv[3], "dequantise")
