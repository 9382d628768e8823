"""The output folder of a training run: is it writable, is another run using it, what did a
killed run leave behind.

Why: two runs in one folder used to move each other's open files aside and both exit 0, and a
read-only folder was only noticed after minutes of data loading. A lock file (pid, host, start
time; created atomically with O_EXCL) makes the second run refuse at once, naming the first; a
lock whose process is gone (same host, pid not alive or reused) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

from mtcore.errors import MtcoreError

LOCK_NAME = ".mtcore-train.lock"
PROBE_PREFIX = ".mtcore-write-probe-"
#: an unreadable (half-written) lock file older than this is taken as left by a killed run
GARBLED_LOCK_GRACE_S = 10.0

# temporary names our atomic writes use: ".<name>.<8 random chars>.tmp" (mkstemp),
# ".<name>.<pid>.lnk" (symlink swap) and the write probe
_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_LNK = re.compile(r"^\.(?P<name>.+)\.\d+\.lnk$")
_PROBE = re.compile(r"^" + re.escape(PROBE_PREFIX) + r"\d+-[0-9a-f]+\.tmp$")


def ensure_writable(folder: Path, create: bool = False) -> None:
    """One line naming ``folder`` unless a file can really be created there. os.access alone is
    not enough: as root it says yes to a chmod 0555 folder, yet a read-only mount still refuses."""
    folder = Path(folder)
    if create and not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MtcoreError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    if not folder.is_dir():
        raise MtcoreError(f"{folder}: the output folder does not exist or is not a folder")
    probe = folder / f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    try:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
    except OSError as exc:
        raise MtcoreError(
            f"{folder.resolve()}: the output folder is not writable ({exc.strerror or exc}); "
            "nothing was loaded or written"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def ensure_can_create(path: Path) -> None:
    """Before a long load: fail now if ``path`` (a file, its folder maybe missing) cannot be
    written, probing the nearest folder that exists."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    ensure_writable(folder)


def remove_leftovers(folder: Path, names: Iterable[str], console_print=None) -> list[str]:
    """Delete temporary files a killed run left in ``folder``: only ones matching our own temp
    patterns for the file names in ``names`` (and our write probes). Call with the lock held."""
    wanted = set(names)
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        match = _TMP.match(name) or _LNK.match(name)
        ours = (match is not None and match.group("name") in wanted) or _PROBE.match(name) is not None
        if ours and (entry.is_file() or entry.is_symlink()):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(name)
    if removed and console_print is not None:
        console_print(f"removed {len(removed)} temporary file(s) left by an interrupted run in {folder}")
    return removed


# -- the lock -------------------------------------------------------------------------------
def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux), to tell a reused pid from the locking run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X"):
            return False  # a zombie: killed, only waiting to be reaped
    except (OSError, IndexError):
        pass
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid belongs to another process now
    return True


_HELD: dict[str, int] = {}  # folders this process holds → nesting depth (CLI and trainer both lock)


class FolderLock:
    """``with FolderLock(folder):`` — exclusive use of an output folder by one training run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._key: Optional[str] = None

    def _content(self) -> str:
        since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since,
                           "start": _process_start(os.getpid()), "token": self.token}) + "\n"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise MtcoreError(f"{self.folder.resolve()}: cannot create the lock file {LOCK_NAME} ({exc.strerror})") from None
        try:
            os.write(fd, self._content().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        key = str(self.folder.resolve())
        if key in _HELD:
            _HELD[key] += 1
            self._key = key
            return
        for _ in range(3):
            if self._create():
                _HELD[key] = 1
                self._key = key
                return
            holder = self._holder()
            if holder is None:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if age < GARBLED_LOCK_GRACE_S:
                    raise MtcoreError(f"{self.folder.resolve()}: another mtcore train is starting here ({self.path.name} is being written)")
                warnings.warn(f"{self.path}: unreadable lock file left by a killed run; taking over")
            else:
                pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since", "?")
                who = f"pid {pid} on {host} since {since}"
                if host != socket.gethostname():
                    raise MtcoreError(
                        f"{self.folder.resolve()}: another mtcore train uses this folder ({who}); its host cannot be "
                        f"checked from here: delete {self.path} only if that run has ended"
                    )
                if not isinstance(pid, int) or _alive(pid, holder.get("start")):
                    raise MtcoreError(
                        f"{self.folder.resolve()}: another mtcore train is running in this folder ({who}); "
                        "wait for it to end or use another folder"
                    )
                warnings.warn(f"{self.path}: taking over the lock of a run that is gone ({who})")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise MtcoreError(f"{self.folder.resolve()}: could not take the lock file {LOCK_NAME} (runs starting at the same time?)")

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        _HELD[key] -= 1
        if _HELD[key] > 0:
            return
        del _HELD[key]
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(folders: Iterable[Path]) -> Iterator[None]:
    """Lock each distinct folder (the working folder and the checkpoint folder)."""
    seen: list[str] = []
    with contextlib.ExitStack() as stack:
        for folder in folders:
            key = str(Path(folder).resolve())
            if key not in seen:
                seen.append(key)
                stack.enter_context(FolderLock(Path(folder)))
        yield
