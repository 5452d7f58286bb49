"""A prompts-only dataset (data.prompts, or data.prompts_only over a metadata.csv without images): DMD trains on
it with the samples' size from the job (the pipeline's default when none is given), the text cached as usual;
losses that need images refuse it by name before any work; DMD's fake-score loss is logged beside the loss."""

import json

import pytest
import torch

from dit_distillery.data import read_metadata
from dit_distillery.data.cache import build_cache
from dit_distillery.data.dataset import CachedDataset, EncodingDataset, collate
from dit_distillery.data.images import Resolution
from dit_distillery.data.metadata import prompt_rows
from dit_distillery.errors import DistilleryError
from dit_distillery.trainer import train
from tests.trainer_helpers import make_job

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
DMD = {"kind": "dmd", "steps": 2, "fake_updates": 2, "fake_rank": 4, "teacher_cfg": 2.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts_job(out, **overrides):
    spec = dict(mode="lora", steps=2, loss=DMD, lora={"rank": 4}, optim={"lr": 1e-3},
                data={"synthetic": None, "prompts": PROMPTS, "height": 32, "width": 32})
    return make_job(out, **{**spec, **overrides})


def test_prompt_rows_cache_and_collate_without_images(tmp_path):
    from dit_distillery import tiny

    pipe = tiny.tiny_pipeline("aaadit", seed=0)
    rows = prompt_rows(PROMPTS)
    assert [r.image for r in rows] == [None, None] and rows[1].where == "data.prompts[1]"
    with pytest.raises(DistilleryError, match="data.height/width"):  # nothing to size the samples by
        build_cache(list(rows), tmp_path / "c", pipe.codec, pipe.prompt_encoder, Resolution(max_pixels=1024))
    resolution = Resolution(32, 48, factor=pipe.size_multiple)
    cache, report = build_cache(list(rows), tmp_path / "c", pipe.codec, pipe.prompt_encoder, resolution)
    assert (report.encoded, report.total) == (2, 2)
    again = build_cache(list(rows), tmp_path / "c", pipe.codec, pipe.prompt_encoder, resolution)[1]
    assert (again.reused, again.encoded) == (2, 0)  # cached as usual
    shape = pipe.codec.latent_shape(32, 48)
    for dataset in (CachedDataset(list(rows), cache), EncodingDataset(list(rows), pipe.codec, pipe.prompt_encoder,
                                                                      resolution)):
        assert dataset.sizes == [(32, 48), (32, 48)]
        batch = collate([dataset[0], dataset[1]])
        assert batch["latents"] is None and batch["latent_shape"] == tuple(shape)
        assert batch["text"].embeds.shape[0] == 2 and batch["target_latents"] is None
    with torch.no_grad():
        direct = pipe.prompt_encoder.encode(PROMPTS[:1]).embeds[0]
    cached = CachedDataset(list(rows), cache)[0]["text"][0]
    assert torch.allclose(cached, direct[:cached.shape[0]].float().cpu())


def test_prompts_only_metadata_ignores_images(tmp_path):
    (tmp_path / "metadata.csv").write_text("prompt,seed\na red circle,3\na blue square,\n")
    rows = read_metadata(tmp_path, prompts_only=True)
    assert [(r.image, r.prompt, r.seed) for r in rows] == [(None, "a red circle", 3), (None, "a blue square", None)]
    with pytest.raises(DistilleryError, match="image"):  # without the flag the image column is required
        read_metadata(tmp_path)


def test_dmd_trains_on_prompts_only_and_logs_the_fake_loss(tmp_path):
    result = train(_prompts_job(tmp_path / "a"))
    assert result.data["rows"] == 2 and len(result.history) == 2
    assert all("fake_loss" in h and h["fake_loss"] > 0 for h in result.history)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["fake_loss"] for x in lines] == [h["fake_loss"] for h in result.history]
    # a prompts-only folder (metadata.csv with prompts), at the pipeline's default size (none given)
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "metadata.csv").write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    result = train(_prompts_job(tmp_path / "b", steps=1, data={"synthetic": None, "path": str(folder),
                                                               "prompts_only": True}))
    assert len(result.history) == 1 and result.data["rows"] == 2


@pytest.mark.parametrize("loss", [{"kind": "flow_matching"}, {"kind": "direct_distill"}, {"kind": "trajectory"}])
def test_losses_needing_images_refuse_a_prompts_only_dataset(tmp_path, loss):
    with pytest.raises(DistilleryError) as err:
        _prompts_job(tmp_path / "x", loss=loss)
    assert err.value.field == "loss.kind" and err.value.value == loss["kind"] and "dmd" in err.value.fix.lower()
    assert not (tmp_path / "x").exists()


def test_prompts_settings_refused_by_name(tmp_path):
    with pytest.raises(DistilleryError, match=r"data.prompts\[1\]"):
        _prompts_job(tmp_path, data={"synthetic": None, "prompts": ["ok", " "]})
    with pytest.raises(DistilleryError, match="data.synthetic"):
        _prompts_job(tmp_path, data={"synthetic": {}, "prompts": PROMPTS})
    with pytest.raises(DistilleryError, match="data.prompts_only"):
        _prompts_job(tmp_path, data={"synthetic": {}, "prompts": None, "prompts_only": True})
    plain = make_job(tmp_path)
    assert plain.fingerprint() == make_job(tmp_path).fingerprint()
    assert "prompts" not in json.dumps(plain.to_dict()["loss"])


def test_chart_draws_the_losss_own_series():
    from dit_distillery.charts import render_loss_chart
    from dit_distillery.trainer.validation import aux_series

    history = [{"step": i, "loss": 1.0 / i, "lr": 1e-3, "fake_loss": 0.5 + 0.01 * i} for i in range(1, 20)]
    series = aux_series(history)
    assert series["aux_label"] == "fake_loss" and len(series["aux"]) == 19
    img, boxes = render_loss_chart([h["step"] for h in history], [h["loss"] for h in history], **series)
    plain, plain_boxes = render_loss_chart([h["step"] for h in history], [h["loss"] for h in history])
    assert len(boxes["stats"]) == len(plain_boxes["stats"]) + 1
    purple = sum(1 for p in img.getdata() if p == (170, 60, 170))
    assert purple > 20 and not any(p == (170, 60, 170) for p in plain.getdata())
    assert aux_series([{"step": 1, "loss": 1.0, "lr": 1e-3}]) == {}
