"""A real ComfyUI server for tests: start it on 127.0.0.1 with its own base directory, talk to it, stop it.

Why a subprocess and not an import: ComfyUI parses its command line, owns global state (`folder_paths`, the
prompt queue) and runs in its own venv (scripts/setup_comfyui.sh), so the only faithful way to test our pack
inside it is the way users run it. HTTP goes through `urllib` (stdlib); websocket events go through
`websocket-client`, imported only when events are recorded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HOST = "127.0.0.1"


class PromptRejected(RuntimeError):
    """`POST /prompt` answered 400: the server's own validation failed (`error`, `node_errors`)."""

    def __init__(self, reply: dict):
        self.reply = reply
        super().__init__(json.dumps(reply, indent=1)[:4000])


class PromptFailed(RuntimeError):
    """The prompt was queued but did not finish with `status_str == "success"`."""

    def __init__(self, entry: dict, log_tail: str):
        self.entry = entry
        messages = entry.get("status", {}).get("messages", [])
        super().__init__(f"prompt failed: {json.dumps(messages)[:3000]}\n--- server log ---\n{log_tail}")


def import_problems(log: str, folder: str, also: tuple[str, ...] = ()) -> list[str]:
    """What ComfyUI's log says went wrong importing the custom node pack `custom_nodes/<folder>`: its
    "(IMPORT FAILED)" / "Cannot import" lines and every traceback with a frame in the pack (or in `also` paths,
    e.g. the real path behind a symlink). [] means it imported cleanly."""
    markers = (f"custom_nodes/{folder}/", *also)
    ends_with_pack = (f"custom_nodes/{folder}", f"custom_nodes/{folder}/")
    problems = []
    for line in log.splitlines():
        if ("IMPORT FAILED" in line and line.rstrip().endswith(ends_with_pack)) or \
                ("Cannot import" in line and any(f"custom_nodes/{folder}{end}" in line for end in (" ", "/ "))):
            problems.append(line.strip())
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = block.splitlines()[1:]
        end = next((i for i, line in enumerate(lines) if not line.startswith(" ")), len(lines))
        frames = "\n".join(lines[: end + 1])  # the frames and the exception line
        if any(marker in frames for marker in markers):
            problems.append("Traceback (most recent call last):\n" + frames)
    return problems


def custom_node_loaded(log: str, folder: str) -> bool:
    """True if ComfyUI's "Import times for custom nodes" list has the pack without "(IMPORT FAILED)"."""
    return any(line.rstrip().endswith(f"custom_nodes/{folder}") and "seconds:" in line
               for line in log.splitlines())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ComfyUIServer:
    """One ComfyUI process. Use as a context manager, or call `start()` / `stop()`.

    `base_dir` gets ComfyUI's `custom_nodes/`, `models/`, `input/`, `output/`, `temp/` and `user/`; the caller
    fills `custom_nodes/` and `models/` before starting. Its database is in memory, so nothing is written into
    the ComfyUI checkout.
    """

    def __init__(self, comfyui_dir: str | os.PathLike, base_dir: str | os.PathLike, python: str | None = None,
                 port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.comfyui_dir = Path(comfyui_dir)
        self.base_dir = Path(base_dir)
        self.python = python or sys.executable
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.extra_args = tuple(extra_args)
        self.log_path = self.base_dir / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
                "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 180) -> "ComfyUIServer":
        if not (self.comfyui_dir / "main.py").is_file():
            raise FileNotFoundError(f"{self.comfyui_dir} is not a ComfyUI checkout (no main.py)")
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        began = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if self.request("GET", "/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - began > timeout:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- log -------------------------------------------------------------------------------------------------
    def log(self, since: int = 0) -> str:
        """The server's stdout+stderr from byte offset `since` (see `log_mark`)."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", "replace")

    def log_mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:] if self.log_path.exists() else ""

    # -- HTTP ------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload=None, timeout: float = 60) -> tuple[int, bytes]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str, timeout: float = 60):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    # -- prompts ---------------------------------------------------------------------------------------------
    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        status, body = self.request("POST", "/prompt", payload)
        reply = json.loads(body) if body else {}
        if status != 200 or reply.get("node_errors"):
            raise PromptRejected(reply)
        return reply["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 300, poll: float = 0.25) -> dict:
        """The `/history/<id>` entry once the prompt has finished (success, error or interruption)."""
        deadline = time.monotonic() + timeout
        while True:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log_tail()}")
            time.sleep(poll)

    def run_prompt(self, prompt: dict, timeout: float = 300, client_id: str | None = None, check: bool = True) -> dict:
        """Queue an API-format prompt and return its history entry; `check` raises `PromptFailed` unless success."""
        mark = self.log_mark()
        entry = self.wait_for(self.queue_prompt(prompt, client_id), timeout)
        if check and entry["status"].get("status_str") != "success":
            raise PromptFailed(entry, self.log(mark)[-6000:])
        return entry

    def free(self) -> None:
        """Unload models and drop cached outputs, so large test models do not stay in memory."""
        self.request("POST", "/free", {"unload_models": True, "free_memory": True})

    def events(self, client_id: str | None = None) -> "EventRecorder":
        return EventRecorder(self, client_id)


class EventRecorder:
    """Collects the websocket messages ComfyUI sends to one client id (JSON ones as dicts, binary previews as
    `{"type": "binary", "size": n}`). Use `with server.events() as ev: server.run_prompt(p, client_id=ev.client_id)`.
    """

    def __init__(self, server: ComfyUIServer, client_id: str | None = None):
        self.server = server
        self.client_id = client_id or uuid.uuid4().hex
        self.messages: list[dict] = []
        self._ws = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self):
        import websocket  # websocket-client

        self._ws = websocket.create_connection(f"ws://{HOST}:{self.server.port}/ws?clientId={self.client_id}",
                                               timeout=10)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        import websocket

        while True:
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue  # a quiet stretch (a long validation or checkpoint) is not the end of the stream
            except (websocket.WebSocketException, OSError):
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                message = json.loads(data)
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                message = {"type": "binary", "size": len(data)}
            else:
                continue
            with self._lock:
                self.messages.append(message)

    def wait_for(self, event_type: str, timeout: float = 30, **data) -> dict:
        """The first message of `event_type` whose data contains `data` (e.g. prompt_id=...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.of_type(event_type):
                if all(message.get("data", {}).get(k) == v for k, v in data.items()):
                    return message
            time.sleep(0.05)
        raise TimeoutError(f"no {event_type} {data} within {timeout} s; got {self.types()}")

    def of_type(self, event_type: str) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if m.get("type") == event_type]

    def types(self) -> list[str]:
        with self._lock:
            return [m.get("type") for m in self.messages]

    def __exit__(self, *exc):
        try:
            self._ws.close()
        finally:
            if self._thread is not None:
                self._thread.join(5)
