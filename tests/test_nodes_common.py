"""The node pack's shared helpers (nodes/common.py) and the fake ComfyUI the other node tests use.

`FakeComfy` stands in for the few ComfyUI functions the nodes call (folder_paths, comfy.utils.ProgressBar,
comfy.model_management's interrupt flag and memory calls, server.PromptServer.send_sync / send_progress_text),
with the same behaviour: a ProgressBar update raises InterruptProcessingException once Cancel was pressed, and
clears the flag, as ComfyUI's hook does (main.py `hijack_progress`).
"""

import sys
import types
from pathlib import Path

import pytest
import torch

from dit_distillery.errors import DistilleryError, StopRequested
from tests.comfyui_support import object_info as oi


def load_pack():
    return oi.load_pack()


def defaults(node_class, section: str = "required") -> dict:
    """Every widget of a node at its default (first option for combos without one); sockets are left out."""
    out = {}
    for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            out[name] = options.get("default", kind[0] if kind else None)
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            out[name] = options["default"]
    return out


def call(node_id: str, **inputs):
    """Run a node the way ComfyUI does (its FUNCTION with defaults + inputs); returns the result tuple."""
    cls = load_pack().NODE_CLASS_MAPPINGS[node_id]
    kwargs = defaults(cls)
    kwargs.update(inputs)
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    return out["result"] if isinstance(out, dict) else out


class InterruptProcessingException(Exception):
    pass


class FakeComfy:
    def __init__(self, base: Path):
        self.base = base
        self.interrupt = False
        self.events: list[tuple[str, dict, str]] = []
        self.texts: list[tuple[str, str]] = []
        self.bar_updates: list[tuple[int, int, str]] = []
        self.unloaded = 0
        self.interrupt_after_updates: int | None = None
        for sub in ("output", "temp", "input", "models/diffusion_models", "models/unet", "models/loras", "models/vae",
                    "models/text_encoders", "models/diffusers"):
            (base / sub).mkdir(parents=True, exist_ok=True)

    def modules(self) -> dict:
        fake = self
        fp = types.ModuleType("folder_paths")
        fp.get_output_directory = lambda: str(fake.base / "output")
        fp.get_temp_directory = lambda: str(fake.base / "temp")
        fp.get_input_directory = lambda: str(fake.base / "input")
        folders = {"diffusion_models": ["models/unet", "models/diffusion_models"], "loras": ["models/loras"],
                   "vae": ["models/vae"], "text_encoders": ["models/text_encoders"], "diffusers": ["models/diffusers"]}
        fp.get_folder_paths = lambda kind: [str(fake.base / p) for p in folders[kind]]

        def filename_list(kind):
            names = []
            for root in fp.get_folder_paths(kind):
                names += [p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()]
            return sorted(names)

        fp.get_filename_list = filename_list

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = InterruptProcessingException
        mm.processing_interrupted = lambda: fake.interrupt

        def throw():
            if fake.interrupt:
                fake.interrupt = False
                raise InterruptProcessingException()

        mm.throw_exception_if_processing_interrupted = throw
        mm.unload_all_models = lambda: setattr(fake, "unloaded", fake.unloaded + 1)
        mm.soft_empty_cache = lambda force=False: None
        mm.get_torch_device = lambda: torch.device("cpu")

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.node_id, self.current = total, node_id, 0

            def update_absolute(self, value, total=None, preview=None):
                self.total = total if total is not None else self.total
                self.current = min(value, self.total)
                fake.bar_updates.append((self.current, self.total, self.node_id))
                if fake.interrupt_after_updates is not None and len(fake.bar_updates) >= fake.interrupt_after_updates:
                    fake.interrupt = True
                throw()  # what ComfyUI's progress hook does first

        utils.ProgressBar = ProgressBar

        server = types.ModuleType("server")

        class Instance:
            client_id = "client-1"
            last_prompt_id = "prompt-1"

            def send_sync(self, event, data, sid=None):
                fake.events.append((event, data, sid))

            def send_progress_text(self, text, node_id, sid=None):
                fake.texts.append((node_id, text))

        server.PromptServer = types.SimpleNamespace(instance=Instance())
        comfy = types.ModuleType("comfy")
        comfy.utils, comfy.model_management = utils, mm
        return {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
                "server": server}

    def of(self, event: str) -> list[dict]:
        return [data for name, data, _ in self.events if name == event]


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    fake = FakeComfy(tmp_path / "comfyui")
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


@pytest.fixture
def no_comfy(tmp_path, monkeypatch):
    """No ComfyUI: the helpers write under $DIT_DISTILLERY_COMFY_HOME."""
    for name in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("DIT_DISTILLERY_COMFY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def common():
    return sys.modules[load_pack().__name__ + ".nodes.common"]


# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "/etc/passwd", "C:evil", "..", ".hidden", "", "  ", "a\x00b",
                                  "x" * 200, "con:out"])
def test_output_names_cannot_escape(name, no_comfy):
    c = common()
    with pytest.raises(DistilleryError) as err:
        c.path_inside(no_comfy / "output", name, "output_name", ".safetensors")
    assert err.value.field == "output_name" and err.value.fix


def test_output_names_that_are_fine(no_comfy):
    c = common()
    root = no_comfy / "models" / "loras"
    assert c.path_inside(root, "my student v2", "name", ".safetensors") == root / "my student v2.safetensors"
    assert c.path_inside(root, "lora.safetensors", "name", ".safetensors") == root / "lora.safetensors"
    assert c.safe_name("run-1", "output_name") == "run-1"


def test_a_symlinked_name_cannot_lead_out(no_comfy, tmp_path):
    c = common()
    root = no_comfy / "output"
    root.mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DistilleryError, match="outside"):
        c.path_inside(root, "escape", "output_name")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs.safetensors", "a/../../b", "C:/x"])
def test_picked_files_must_stay_in_the_model_folders(name, no_comfy):
    with pytest.raises(DistilleryError):
        common().find_model("loras", name, "lora")


def test_without_comfyui_everything_degrades(no_comfy):
    c = common()
    assert not c.in_comfyui()
    assert c.output_dir() == no_comfy / "output"
    assert c.model_write_dir("diffusion_models") == no_comfy / "models" / "diffusion_models"
    progress = c.Progress(10, "3")
    progress(5, 10)  # no bar, no error
    assert progress.stop() is False
    c.send_event("x", {})  # nowhere to send: no error
    c.free_comfy_memory()
    with pytest.raises(StopRequested):  # without ComfyUI a stop stays the core's StopRequested
        with c.user_errors(progress):
            raise StopRequested("stop")


def test_model_write_dir_prefers_diffusion_models_over_unet(fake_comfy):
    assert common().model_write_dir("diffusion_models") == fake_comfy.base / "models" / "diffusion_models"


def test_progress_turns_cancel_into_stop_then_into_comfyuis_interrupt(fake_comfy):
    c = common()
    progress = c.Progress(4, "7", min_interval=0)
    progress(1, 4)
    assert fake_comfy.bar_updates == [(1, 4, "7")] and not progress.stop()
    fake_comfy.interrupt = True
    progress(2, 4)  # the bar raises; the bridge remembers instead of unwinding the core
    assert progress.stop() is True
    with pytest.raises(InterruptProcessingException):
        with c.user_errors(progress):
            raise StopRequested("the core saved and stopped")


def test_stop_sees_cancel_between_throttled_updates(fake_comfy):
    c = common()
    progress = c.Progress(100, "7", min_interval=60)
    progress(1, 100)
    fake_comfy.interrupt = True
    progress(2, 100)  # throttled: not sent, so it cannot raise
    assert progress.stop() is True
    with pytest.raises(InterruptProcessingException):
        with c.user_errors(progress):
            raise StopRequested("stopped")
    assert fake_comfy.interrupt is False  # ComfyUI's flag is cleared, as its own nodes do


def test_out_of_memory_becomes_an_error_that_says_what_to_change(fake_comfy):
    c = common()
    with pytest.raises(DistilleryError) as err:
        with c.user_errors():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    assert "batch size" in err.value.fix and fake_comfy.unloaded == 1


def test_events_go_to_the_client_that_queued(fake_comfy):
    c = common()
    c.send_event("dit_distillery.train", {"step": 1})
    c.send_text("4", "hello")
    assert fake_comfy.events == [("dit_distillery.train", {"step": 1}, "client-1")]
    assert fake_comfy.texts == [("4", "hello")]


def test_view_url_of_output_files(fake_comfy):
    c = common()
    path = fake_comfy.base / "output" / "dit_distillery" / "run" / "validation" / "step-0000002.png"
    ref = c.view_url(path)
    assert ref["type"] == "output" and ref["filename"] == "step-0000002.png"
    assert ref["subfolder"] == "dit_distillery/run/validation"
    assert ref["url"] == "/view?filename=step-0000002.png&subfolder=dit_distillery%2Frun%2Fvalidation&type=output"
    assert c.view_url(Path("/elsewhere/x.png")) is None


def test_downsample_keeps_the_last_point():
    c = common()
    points = [[i, float(i)] for i in range(1000)]
    short = c.downsample(points, 256)
    assert len(short) == 256 and short[0] == [0, 0.0] and short[-1] == [999, 999.0]
    assert c.downsample(points[:10]) == points[:10]


def test_output_connected_reads_the_prompt_graph():
    c = common()
    prompt = {"1": {"class_type": "DD_LoadStudent", "inputs": {}},
              "2": {"class_type": "KSampler", "inputs": {"model": ["1", 1]}}}
    assert c.output_connected(prompt, "1", 1) and not c.output_connected(prompt, "1", 0)
    assert c.output_connected(None, "1", 1)  # unknown graph: assume connected


def test_image_conversions_round_trip():
    c = common()
    pixels = torch.rand(2, 3, 8, 12) * 2 - 1
    image = c.pixels_to_image(pixels)
    assert image.shape == (2, 8, 12, 3) and 0 <= image.min() and image.max() <= 1
    back = c.pil_to_image(c.image_to_pil(image))
    assert torch.allclose(back, image, atol=1 / 255)
