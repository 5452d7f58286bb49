"""One run per output folder, and the leftovers of killed writes.

`RunLock`: a training run or a gen-dataset run holds `<folder>/.dit_distillery.lock` while it works, so a second
run on the same folder is refused instead of pruning the first one's checkpoints or rewriting its metadata. The
file is created with O_CREAT|O_EXCL and holds the holder's pid, host and start time (for the error message). Where
the platform has `fcntl.flock`, the holder also keeps an exclusive flock on it: the kernel drops that lock when the
process dies however it dies (SIGKILL, OOM killer, power loss on a local disk), so "the file exists but nobody
holds its flock" means the holder is dead, even when its pid was reused (containers restart ComfyUI with the same
small pid). Where flock is missing or the filesystem refuses it, a lock is stale when its pid is dead on this host.
A lock written on another host is never taken over automatically (we cannot see that host's processes): the
error says to delete the file if no run uses it.

`remove_leftovers`: a killed write leaves what `formats.atomic_output` was writing (`<name>.<pid>.<8 random>.tmp`,
up to a whole shrunk DiT) and what `trainer.state.save_checkpoint` was writing (`.checkpoint-<step>.<8 random>/`).
Only these exact patterns are ours. A temp file is removed only when no live writer holds it: its writer keeps a
flock on it while writing (else: the pid in its name is dead on this host). Temp checkpoint folders are removed
only by the holder of the run lock (no one else writes in that folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

from .errors import DistilleryError

try:
    import fcntl
except ImportError:  # Windows: pid checks only
    fcntl = None

LOCK_NAME = ".dit_distillery.lock"
log = logging.getLogger("dit_distillery")

# What formats.atomic_output and trainer.state.save_checkpoint name their temporaries (tempfile's random part:
# 8 characters of [a-z0-9_]).
TEMP_FILE = re.compile(r"^(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
TEMP_CHECKPOINT = re.compile(r"^\.checkpoint-\d+\.[a-z0-9_]{8}$")

_held: set[str] = set()  # lock files this process holds (a lock naming our own pid but not in here is stale)
_held_guard = threading.Lock()


def _hostname() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this host (True when it cannot be told: never remove by mistake)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def try_flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True when taken, False when someone holds it, None when this
    platform or filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: a filesystem without flock


class RunLock:
    """An exclusive lock on a run's output folder (see the module docstring). Use as a context manager, or
    `acquire()` / `release()`. `field` names the setting the error message points at (e.g. `output.dir`)."""

    def __init__(self, folder: str | os.PathLike, field: str = "output.dir"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.field = field
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale holder's record, when this lock replaced a dead run's

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DistilleryError(self.field, str(self.folder), f"cannot create the folder ({exc.strerror or exc}).",
                                  "choose a folder you can write to.") from exc
        for _ in range(20):  # a retry only when the file changed under us (another run released or took it)
            fd = self._create()
            if fd is not None:
                if try_flock(fd) is False:  # a contender flocked our fresh file first: it wins
                    holder = _read_record(fd)
                    os.close(fd)
                    raise self._busy(holder)
                return self._hold(fd)
            fd = self._open_existing()
            if fd is None:
                continue
            holder = _read_record(fd)
            flocked = try_flock(fd)
            if flocked is False or not self._stale(holder, flocked):
                os.close(fd)
                raise self._busy(holder)
            if not _same_file(fd, self.path):  # released and re-created meanwhile: start over
                os.close(fd)
                continue
            if flocked is None:  # no flock: replace the dead run's file (best effort against a simultaneous start)
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                self.took_over = holder
                continue
            self.took_over = holder
            return self._hold(fd)
        raise self._busy(None)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _held_guard:
            _held.discard(os.path.realpath(self.path))
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)  # while still holding the flock: a contender then sees a new file or none
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped without release (should not happen): let the file go with it
        with contextlib.suppress(Exception):
            self.release()

    # -- internals
    def _create(self) -> int | None:
        try:
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        except OSError as exc:
            raise DistilleryError(self.field, str(self.folder), f"cannot create the lock file {self.path.name} "
                                  f"({exc.strerror or exc}).", "choose a folder you can write to.") from exc

    def _open_existing(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DistilleryError(self.field, str(self.folder), f"cannot open the lock file {self.path.name} "
                                  f"({exc.strerror or exc}).", f"check the folder's permissions, or delete "
                                  f"{self.path} if no run uses the folder.") from exc

    def _hold(self, fd: int) -> "RunLock":
        record = {"pid": os.getpid(), "host": _hostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        self._fd = fd
        with _held_guard:
            _held.add(os.path.realpath(self.path))
        return self

    def _stale(self, holder: dict | None, flocked: bool | None) -> bool:
        """Whether the run that wrote this lock is gone (we hold its flock, or flock is unavailable)."""
        if not holder:  # a run writes its record right after creating the file: an old empty one is a dead run's
            try:
                return flocked is not False and time.time() - os.stat(self.path).st_mtime > 10
            except OSError:
                return False
        if holder.get("host") != _hostname():
            return False  # another host's: we cannot see its processes, so never take it
        if flocked:
            return True  # nobody holds the flock: the holder's process has exited
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        if pid == os.getpid():
            with _held_guard:
                return os.path.realpath(self.path) not in _held
        return not pid_alive(pid)

    def _busy(self, holder: dict | None) -> DistilleryError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder
               else "a run that is still starting")
        return DistilleryError(self.field, str(self.folder), f"another run is using this folder ({who}); two runs "
                               "in one folder would overwrite each other's checkpoints and settings.",
                               "wait for that run to finish or stop it, or choose another output folder. If no run "
                               f"is using it (e.g. it ran on another machine and was killed), delete {self.path}.")


def _read_record(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        record = json.loads(data.decode()) if data else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def ensure_free(folder: str | os.PathLike, field: str = "output.dir") -> None:
    """Raise the busy error when a live run holds `folder` (e.g. before moving the folder aside)."""
    if (Path(folder) / LOCK_NAME).exists():
        with RunLock(folder, field):
            pass


# ----------------------------------------------------------------------------------------------------------
# Leftovers of killed writes

def temp_file_in_use(path: Path, pid: int) -> bool:
    """Whether a writer still holds this temp file: its flock (atomic_output keeps one while writing), else
    whether the pid in its name runs on this host."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone or unreadable: leave it
    try:
        flocked = try_flock(fd)
        if flocked is not None:
            return not flocked
    finally:
        os.close(fd)
    return pid == os.getpid() or pid_alive(pid)


def remove_leftovers(folder: str | os.PathLike, *, recursive: bool = True, target: str | None = None,
                     checkpoints: bool = False) -> tuple[list[Path], int]:
    """Delete our temporaries of killed writes in `folder`; returns (removed paths, bytes freed) and logs them.

    `target`: only temp files of that file name (e.g. a shrink's output, next to other people's files).
    `checkpoints`: also temp checkpoint folders; only the holder of the folder's `RunLock` may ask for that.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [], 0
    removed, freed = [], 0
    walker = os.walk(folder) if recursive else [(str(folder), [], [e.name for e in os.scandir(folder) if e.is_file()])]
    for root, dirs, files in walker:
        for name in files:
            m = TEMP_FILE.match(name)
            if not m or (target is not None and m.group("target") != target):
                continue
            path = Path(root) / name
            try:
                if path.is_symlink() or temp_file_in_use(path, int(m.group("pid"))):
                    continue
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            removed.append(path)
            freed += size
        if checkpoints:
            for name in [d for d in dirs if TEMP_CHECKPOINT.match(d)]:
                path = Path(root) / name
                if path.is_symlink():
                    continue
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path)
                    freed += size
                    dirs.remove(name)
    if removed:
        log.warning("DiT Distillery: removed %d leftover(s) of killed writes in %s (%.1f MB): %s", len(removed),
                    folder, freed / 1e6, ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed, freed
