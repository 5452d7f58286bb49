import torch

from dit_distillery.shrink.blocks import block_influence, drop_blocks
from dit_distillery.tiny import tiny_pipeline
from dit_distillery.velocity import predict_velocity


def _skip_forward_equal(family):
    pipe = tiny_pipeline(family)
    dit = pipe.dit
    blocks = dit.blocks if family == "aaadit" else dit.transformer_blocks
    n = len(blocks)
    student, kept = drop_blocks(dit, layers=n - 1, strategy="first")
    assert kept == list(range(n - 2)) + [n - 1]
    x = torch.randn(2, pipe.codec.latent_channels, 4, 4)
    text = pipe.encode_prompts(["a red circle", "a blue square"])
    sigma = torch.tensor([0.8, 0.2])
    # the source with the dropped block made an identity must equal the student
    dropped = blocks[n - 2]
    if family == "aaadit":
        hook = dropped.register_forward_hook(lambda m, a, k, o: k.get("emb", a[0] if a else None), with_kwargs=True)
    else:
        hook = dropped.register_forward_hook(
            lambda m, a, k, o: (k["encoder_hidden_states"], k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        want = predict_velocity(dit, x, sigma, text)
        hook.remove()
        got = predict_velocity(student, x, sigma, text)
    assert torch.allclose(want, got, atol=1e-6)
    prefix = "blocks" if family == "aaadit" else "transformer_blocks"
    src, dst = dit.state_dict(), student.state_dict()
    for i, s in enumerate(kept):
        for k, v in dst.items():
            if k.startswith(f"{prefix}.{i}."):
                assert torch.equal(v, src[k.replace(f"{prefix}.{i}.", f"{prefix}.{s}.", 1)])
    scores = block_influence(dit, x, sigma, text)
    assert len(scores) == n and all(0 <= s <= 2 for s in scores)
    imp, kept_imp = drop_blocks(dit, layers=1, strategy="importance", scores=scores)
    assert kept_imp == [n - 1]


def test_drop_blocks_aaadit():
    _skip_forward_equal("aaadit")


def test_drop_blocks_qwen_image():
    _skip_forward_equal("qwen_image")
