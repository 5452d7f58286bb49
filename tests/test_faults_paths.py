"""Fault suite (issue 9, section 3, Security): node fields that name a file or folder to read may only reach
inside ComfyUI's folders for it (nodes.common.resolve_name). For every such field: an absolute path, a '../'
escape and a symlink escape are refused with a DistilleryError naming the field, and a legitimate name works.

The rule's one deliberate exception is tested too: a model file or diffusers folder that ComfyUI itself lists
(dropdown names) is followed through a symlink the machine's owner put in models/, as ComfyUI does.
"""

import os
import sys
from pathlib import Path

import pytest

from dit_distillery.errors import DistilleryError
from tests.test_nodes_common import call, fake_comfy, load_pack  # noqa: F401  (fixture)

SECRET = "TOP SECRET LINE"


def pack_module(name: str):
    return sys.modules[load_pack().__name__ + ".nodes." + name]


@pytest.fixture
def outside(tmp_path):
    """A folder outside ComfyUI's folders holding what an attacker would like to read."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET + "\n")
    (folder / "x.safetensors").write_bytes(b"not read")
    return folder


def escapes(root: Path, target: Path) -> list[str]:
    """An absolute path and a '../' path from `root` to `target`."""
    return [str(target), os.path.relpath(target, root)]


def refused(field: str, node: str, **inputs) -> DistilleryError:
    with pytest.raises(DistilleryError) as err:
        call(node, **inputs)
    assert err.value.field == field, err.value
    assert err.value.fix and SECRET not in str(err.value)
    return err.value


# ----------------------------------------------------------------------------------------------------------
# Generate Distill Dataset: prompts

def test_prompts_file_outside_the_input_folder_is_refused_before_anything_is_written(fake_comfy, outside):
    input_dir = fake_comfy.base / "input"
    (input_dir / "linked.txt").symlink_to(outside / "secret.txt")
    (input_dir / "drive").symlink_to(outside, target_is_directory=True)
    teacher, _ = call("DD_LoadPipeline", source="default")
    for name in escapes(input_dir, outside / "secret.txt") + ["linked.txt", "drive/secret.txt", "../secret.txt"]:
        error = refused("prompts", "DD_GenerateDistillDataset", teacher=teacher, prompts=name, output_name="leak")
        assert "outside" in error.problem or "not accepted" in error.problem, error
    assert not (fake_comfy.base / "output" / "dit_distillery" / "datasets" / "leak").exists()
    assert not teacher.loaded()  # refused before the teacher was even loaded


def test_prompts_from_a_file_in_the_input_folder_or_as_text(fake_comfy):
    from dit_distillery.gen_dataset import read_prompts

    source = pack_module("data")._prompt_source
    (fake_comfy.base / "input" / "sub").mkdir()
    path = fake_comfy.base / "input" / "sub" / "prompts.txt"
    path.write_text("# teacher prompts\na red circle\na blue square\n")
    assert read_prompts(source("sub/prompts.txt", 0)) == ["a red circle", "a blue square"]
    assert read_prompts(source(str(path), 0)) == ["a red circle", "a blue square"]  # absolute, but inside input
    assert source("a red circle on a blue background", 0) == ["a red circle on a blue background"]
    assert source("# a note\na cat\n\na dog", 0) == ["a cat", "a dog"]
    with pytest.raises(DistilleryError, match="no such file") as err:
        source("missing.txt", 0)
    assert err.value.field == "prompts"


def test_a_prompt_is_never_read_as_a_path_by_the_core(fake_comfy, outside):
    """The widget's text reaches the core as a list: a file named inside a prompts file is not followed."""
    from dit_distillery.gen_dataset import read_prompts

    (fake_comfy.base / "input" / "p.txt").write_text(str(outside / "secret.txt") + "\n")
    assert read_prompts(pack_module("data")._prompt_source("p.txt", 0)) == [str(outside / "secret.txt")]


# ----------------------------------------------------------------------------------------------------------
# Load Pipeline: source (diffusers folders)

def _pipeline_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    return folder


def test_load_pipeline_source_outside_models_diffusers_is_refused(fake_comfy, outside):
    diffusers = fake_comfy.base / "models" / "diffusers"
    target = _pipeline_folder(outside / "pipe")
    for name in escapes(diffusers, target) + ["sub/../../../outside/pipe"]:
        refused("source", "DD_LoadPipeline", source=name)
    (diffusers / "drive").symlink_to(outside, target_is_directory=True)
    (outside / "plain").mkdir()  # a folder ComfyUI does not list (no model_index.json) through the symlink
    refused("source", "DD_LoadPipeline", source="drive/plain")


def test_load_pipeline_source_inside_models_diffusers_and_owner_symlinks_load(fake_comfy, outside):
    diffusers = fake_comfy.base / "models" / "diffusers"
    own = _pipeline_folder(diffusers / "qwen")
    shared = _pipeline_folder(outside / "shared_qwen")
    (diffusers / "linked_qwen").symlink_to(shared, target_is_directory=True)  # how users share a model drive
    listed = pack_module("models").LoadPipeline.INPUT_TYPES()["required"]["source"][0]
    assert "qwen" in listed and "linked_qwen" in listed  # ComfyUI's DiffusersLoader follows links too
    ref, _ = call("DD_LoadPipeline", source="qwen")
    assert ref.source == str(own) and not ref.loaded()
    ref, _ = call("DD_LoadPipeline", source="linked_qwen")
    assert Path(ref.source) == diffusers / "linked_qwen"


# ----------------------------------------------------------------------------------------------------------
# Every model-file field

MODEL_FIELDS = [  # (node, field, kind)
    ("DD_LoadPipeline", "dit_name", "diffusion_models"),
    ("DD_LoadPipeline", "text_encoder_name", "text_encoders"),
    ("DD_LoadPipeline", "vae_name", "vae"),
    ("DD_LoadDiT", "dit_name", "diffusion_models"),
    ("DD_ShrinkDiT", "source", "diffusion_models"),
    ("DD_LoadStudent", "weights", "diffusion_models"),
    ("DD_LoadStudent", "lora", "loras"),
    ("DD_TrainLoRAFull", "init_lora", "loras"),
]


def _sockets(node: str) -> dict:
    refs = pack_module("refs")
    pipe = refs.PipelineRef()
    return {"DD_LoadStudent": {"pipeline": pipe},
            "DD_TrainLoRAFull": {"pipeline": pipe, "loss": {"kind": "flow_matching"},
                                 "dataset": refs.DatasetRef({"synthetic": {"count": 4, "size": 32}})}}.get(node, {})


@pytest.mark.parametrize("node, field, kind", MODEL_FIELDS)
def test_model_names_outside_the_model_folders_are_refused(fake_comfy, outside, node, field, kind):
    root = fake_comfy.base / "models" / kind
    (root / "secret.txt").symlink_to(outside / "secret.txt")  # not a model ComfyUI lists: no dropdown offers it
    (root / "drive").symlink_to(outside, target_is_directory=True)
    for name in escapes(root, outside / "x.safetensors") + ["secret.txt", "drive/secret.txt", "a/../../x.safetensors"]:
        refused(field, node, **{field: name}, **_sockets(node))


@pytest.fixture
def comfy_listing(fake_comfy, monkeypatch):
    """ComfyUI's get_filename_list walks with os.walk(followlinks=True) (folder_paths.recursive_search); the
    shared fake uses rglob, which does not enter symlinked folders."""
    fp = sys.modules["folder_paths"]

    def filename_list(kind):
        names = []
        for root in fp.get_folder_paths(kind):
            for folder, _, files in os.walk(root, followlinks=True):
                names += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files]
        return sorted(names)

    monkeypatch.setattr(fp, "get_filename_list", filename_list)
    return fake_comfy


@pytest.mark.parametrize("kind", ["diffusion_models", "loras", "vae", "text_encoders"])
def test_model_names_inside_and_listed_owner_symlinks_are_found(comfy_listing, outside, kind):
    fake_comfy = comfy_listing
    common = pack_module("common")
    root = fake_comfy.base / "models" / kind
    (root / "sub").mkdir()
    (root / "sub" / "own.safetensors").write_bytes(b"x")
    (root / "shared.safetensors").symlink_to(outside / "x.safetensors")
    (root / "drive").symlink_to(outside, target_is_directory=True)
    assert common.find_model(kind, "sub/own.safetensors", "f") == root / "sub" / "own.safetensors"
    assert {"shared.safetensors", "drive/x.safetensors"} <= set(common.list_models(kind))
    assert common.find_model(kind, "shared.safetensors", "f") == root / "shared.safetensors"
    assert common.find_model(kind, "drive/x.safetensors", "f") == root / "drive" / "x.safetensors"
    with pytest.raises(DistilleryError, match="leads"):
        common.find_model(kind, "drive/secret.txt", "f")


# ----------------------------------------------------------------------------------------------------------
# Dataset (Folder): folder, metadata, and the files its rows name

@pytest.fixture
def datasets(fake_comfy, outside):
    from dit_distillery.data import write_dataset

    write_dataset(fake_comfy.base / "input" / "shapes", 2, size=32)
    write_dataset(outside / "shapes", 2, size=32)
    return fake_comfy.base / "input"


def test_dataset_folder_outside_the_input_folder_is_refused(datasets, outside):
    (datasets / "linked").symlink_to(outside / "shapes", target_is_directory=True)
    for name in escapes(datasets, outside / "shapes") + ["linked", "shapes/../../../outside/shapes"]:
        refused("folder", "DD_DatasetFolder", folder=name)


def test_dataset_metadata_outside_the_folders_is_refused(datasets, outside):
    (datasets / "shapes" / "linked.csv").symlink_to(outside / "shapes" / "metadata.csv")
    for name in escapes(datasets / "shapes", outside / "shapes" / "metadata.csv") + ["linked.csv"]:
        refused("metadata", "DD_DatasetFolder", folder="shapes", metadata=name)


def test_dataset_rows_naming_files_outside_are_refused(datasets, outside):
    image = next((outside / "shapes").glob("*.png"))
    for value in (str(image), os.path.relpath(image, datasets / "shapes")):
        (datasets / "shapes" / "evil.csv").write_text(f"image,prompt\n{value},a cat\n")
        error = refused("metadata", "DD_DatasetFolder", folder="shapes", metadata="evil.csv")
        assert error.value == "evil.csv line 2"


def test_dataset_folder_and_metadata_inside_are_read(datasets, fake_comfy):
    dataset, _ = call("DD_DatasetFolder", folder="shapes", metadata="metadata.csv")
    assert dataset.rows == 2 and dataset.spec["path"] == str(datasets / "shapes")
    (datasets / "merged.csv").write_text((datasets / "shapes" / "metadata.csv").read_text())
    dataset, _ = call("DD_DatasetFolder", folder="shapes", metadata="../merged.csv")  # DiffSynth's layout: beside
    assert dataset.rows == 2 and dataset.spec["metadata"] == str(datasets / "shapes" / "../merged.csv")
    dataset, _ = call("DD_DatasetFolder", folder=str(datasets / "shapes"))  # absolute, inside input
    assert dataset.rows == 2
    generated, _, _ = call("DD_SyntheticShapesDataset", count=2, size=32)  # the pack's own output may be read back
    folder = Path(generated.spec["path"])
    dataset, _ = call("DD_DatasetFolder", folder=str(folder))
    assert dataset.rows == 2
    dataset, _ = call("DD_DatasetFolder", folder=f"datasets/{folder.name}")  # relative to output/dit_distillery
    assert dataset.rows == 2


def test_resolver_refuses_names_that_are_not_names(fake_comfy):
    common = pack_module("common")
    for name in ("", "  ", "a\x00b", None, 3):
        with pytest.raises(DistilleryError) as err:
            common.resolve_name(name, "f", [fake_comfy.base / "input"])
        assert err.value.field == "f"
