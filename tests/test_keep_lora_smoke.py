"""bench/keep_lora_few_step.py runs end to end at tiny budgets (a quick demo, 3-step LoRAs) and writes its report
with the fields the results need; the figures themselves come from the committed full run."""

from __future__ import annotations

import json

import pytest

from bench import keep_lora_few_step as bench


@pytest.mark.slow  # 10-18 s on the shared 2-core CPU (the quick demo it needs is most of it)
def test_keep_lora_few_step_smoke(tmp_path):
    out, results = tmp_path / "work", tmp_path / "results"
    files = bench.main(["--preset", "smoke", "--demo-preset", "quick", "--out", str(out), "--results", str(results),
                        "--threads", "1"])
    assert sorted(p.name for p in files) == ["keep_lora_few_step.json", "keep_lora_few_step.md",
                                             "keep_lora_few_step.png"]
    doc = json.loads((results / "keep_lora_few_step.json").read_text())
    assert set(doc["runs"]) == {"style_teacher", "base_teacher", "turbo", "base_style_4step", "before", "after"}
    assert doc["runs"]["style_teacher"]["latent_mse"] == 0.0  # the reference against itself
    for run in doc["runs"].values():
        assert len(run["per_pair"]) == doc["eval_pairs"] == 3
        assert set(run["accuracy"]) == {"styled", "unstyled"}
    assert doc["ratios"]["after_over_before"] == doc["runs"]["after"]["latent_mse"] / doc["runs"]["before"]["latent_mse"]
    assert doc["machine"]["device"] and doc["command"].startswith("python bench/keep_lora_few_step.py")
    assert doc["verdict"].startswith("The repair ")
    md = (results / "keep_lora_few_step.md").read_text()
    assert "(before)" in md and "(after)" in md and doc["verdict"] in md
    # resumable: the same command again reuses every stage (no second demo, no retraining) and agrees
    again = bench.main(["--preset", "smoke", "--demo-preset", "quick", "--out", str(out), "--results", str(results),
                        "--threads", "1"])
    assert json.loads((results / "keep_lora_few_step.json").read_text())["runs"]["after"]["latent_mse"] == \
        doc["runs"]["after"]["latent_mse"] and len(again) == 3
