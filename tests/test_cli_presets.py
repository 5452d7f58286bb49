"""Build AAADiT's presets: one core table, the same choices and the same built config in the CLI and the node."""

import functools

import pytest

from dit_distillery.cli import build_parser, main
from dit_distillery.models import aaadit, aaadit_presets
from tests.test_nodes_common import call, fake_comfy, load_pack  # noqa: F401  (fixture)


class Built(Exception):
    """Raised by the captured model constructor: what would have been built, with nothing written."""


@pytest.fixture
def captured(monkeypatch):
    """AAADiT's constructor records its config and stops (its signature kept: the node's size check reads it)."""
    configs = []

    @functools.wraps(aaadit.AAADiT.__init__)
    def init(self, *args, **config):
        configs.append(config)
        raise Built()

    monkeypatch.setattr(aaadit.AAADiT, "__init__", init)
    return configs


def _cli_choices() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["build-aaadit"]
    return list(next(a for a in sub._actions if a.dest == "preset").choices)


def test_node_and_cli_offer_the_core_table():
    node = load_pack().NODE_CLASS_MAPPINGS["DD_BuildAAADiT"].INPUT_TYPES()["required"]["preset"]
    assert node[0] == _cli_choices() == list(aaadit_presets.PRESETS) == ["tutorial", "tiny", "demo"]
    assert node[1]["default"] == "tutorial"
    with pytest.raises(Exception, match="unknown preset"):
        aaadit_presets.preset_config("no-such-preset")


@pytest.mark.parametrize("preset", list(aaadit_presets.PRESETS))
@pytest.mark.parametrize("overrides", [{}, {"width": 96, "heads": 3, "pos_grid": "2x3", "text_mask": True}])
def test_cli_and_node_build_the_same_config(preset, overrides, captured, fake_comfy, tmp_path):  # noqa: F811
    argv = ["build-aaadit", "--preset", preset, "--out", str(tmp_path / "m")]
    node_inputs = {"preset": preset, "name": "m"}
    if overrides:
        argv += ["--width", "96", "--heads", "3", "--pos-grid", "2x3", "--text-mask"]
        node_inputs.update(width=96, num_heads=3, pos_grid="2x3", use_text_mask=True)
    with pytest.raises(Built):
        main(argv)
    with pytest.raises(Built):
        call("DD_BuildAAADiT", **node_inputs)
    cli, node = captured[0], captured[-1]
    assert cli == node
    expected = aaadit_presets.preset_config(preset)
    if overrides:
        expected.update(width=96, num_heads=3, pos_grid=[2, 3], use_text_mask=True)
    assert cli == expected
    assert not (tmp_path / "m").exists()


def test_presets_are_the_models_they_name():
    """demo is the embedded 'default' pipeline's DiT (so a demo-built DiT replaces it), tutorial DiffSynth's."""
    from dit_distillery import tiny
    from dit_distillery.models import registry

    assert registry.model_config(tiny.embedded_default_pipeline().dit) == aaadit_presets.preset_config("demo")
    assert aaadit_presets.preset_config("tutorial") == aaadit.TUTORIAL_CONFIG
    tiny_config = aaadit_presets.preset_config("tiny")
    assert (tiny_config["latent_channels"], tiny_config["text_width"]) == (128, 32)  # tiny Flux2 VAE, tiny Qwen3
