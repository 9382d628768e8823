"""Checkpoints: written atomically, checksummed, pruned to max_ckpt_keep, never touching a file
this run did not write.

Layout in the checkpoint folder (the folder of ``save_ckpt``; ``model.ckpt`` → the working folder,
``ckpts/model.ckpt`` → ``ckpts/``, created if missing):
    model.ckpt-<step>.pt   one file per save
    model.ckpt.pt          symlink to the newest
    checkpoint             text file: the newest first, then the older ones kept (names relative
                           to this folder)

A save is crash-consistent: new checkpoint (temp file, fsync, rename) → new index (same) →
symlink → only then the files that fell off the index are deleted. So the index never names a
deleted file, whatever moment a kill hits. Pruning only deletes files this run (or the run it
continues, i.e. the index beside the restart checkpoint) wrote; a file of anyone else in the way
is moved into a backup folder, never overwritten.

Best models (one per head with validation data): ``<stem>.best.<head>.pt`` beside the checkpoints
(``<stem>`` is the prefix without a trailing ``.ckpt``: ``model.ckpt`` → ``model.best.<head>.pt``),
written the same way (temp file, fsync, rename; checksummed) and under the same owned-only rule:
a file of that name this run did not write is moved into a backup folder before the first write.

Every checkpoint carries ``sha256``: a digest of its whole content (tensors byte for byte, the
rest by value), verified on load; a corrupted file falls back to the previous one in the index.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mtcore.errors import MtcoreError

FORMAT = "mtcore-checkpoint"
INDEX = "checkpoint"
DIGEST_KEY = "sha256"


# -- integrity --------------------------------------------------------------------------------
def _feed(h, obj: Any) -> None:
    """Hash ``obj`` by value, in a form that survives torch.save → torch.load unchanged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        h.update(f"A{obj.dtype.str}{obj.shape}|".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)) or (isinstance(obj, np.ndarray)):
        h.update(f"{type(obj).__name__}{len(obj)}|".encode())
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}|".encode())
        h.update(data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"B{len(obj)}|".encode())
        h.update(bytes(obj))
    else:
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def state_digest(state: dict) -> str:
    """sha256 of a checkpoint's content, without its own digest and the load-time ``path``."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k not in (DIGEST_KEY, "path")})
    return h.hexdigest()


# -- atomic writes ----------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: TEST-ONLY hook, ``<file name pattern>:<seconds>`` (fnmatch): an atomic write of a matching file
#: waits that long with its temporary file complete but not yet renamed, so that a test can SIGKILL
#: a real run during a checkpoint write (tests/test_kill_restart.py). Unset in normal use.
TEST_WRITE_DELAY_ENV = "MTCORE_TEST_WRITE_DELAY"


def _test_write_delay(name: str) -> None:
    setting = os.environ.get(TEST_WRITE_DELAY_ENV)
    if setting:
        pattern, _, seconds = setting.rpartition(":")
        if fnmatch.fnmatchcase(name, pattern):
            time.sleep(float(seconds))


def _atomic_write(path: Path, mode: str, write: Callable[[Any], None]) -> None:
    """Write through ``write(handle)`` into a temporary file beside ``path``, fsync, rename over
    ``path``, fsync the folder: a kill leaves either the old or the new content, and at most a
    temporary file that the next start removes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            _test_write_delay(path.name)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_text(path: Path, text: str) -> None:
    """Write a text file so that a kill leaves either the old or the new content."""
    _atomic_write(Path(path), "w", lambda handle: handle.write(text))


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.parent / f".{link.name}.{os.getpid()}.lnk"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def read_index(index: Path) -> list[str]:
    """Names listed in an index file, newest first (comment lines ignored)."""
    try:
        text = Path(index).read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def split_save_ckpt(workdir: Path, save_ckpt: str) -> tuple[Path, str]:
    """``save_ckpt`` → (checkpoint folder, file prefix)."""
    target = Path(workdir) / save_ckpt
    if not target.name or target.name in (".", ".."):
        raise MtcoreError(f"training/save_ckpt: '{save_ckpt}' names a folder, not a checkpoint prefix (e.g. 'ckpts/model.ckpt')")
    return target.parent, target.name


class CheckpointManager:
    def __init__(self, folder: Path, prefix: str, keep: int):
        self.folder = Path(folder)
        self.prefix = prefix
        self.keep = max(1, int(keep))
        self.owned: list[str] = []  # names this run wrote (or adopted from the run it continues), newest first
        self._pattern = re.compile(re.escape(prefix) + r"-\d+\.pt")
        stem = prefix[: -len(".ckpt")] if prefix.endswith(".ckpt") and len(prefix) > len(".ckpt") else prefix
        self.best_stem = stem
        self._best_pattern = re.compile(re.escape(stem) + r"\.best\.[A-Za-z0-9_][A-Za-z0-9_-]*\.pt")
        self.best_owned: set[str] = set()  # best files this run wrote or adopted

    @property
    def index(self) -> Path:
        return self.folder / INDEX

    @property
    def latest(self) -> Path:
        return self.folder / f"{self.prefix}.pt"

    def path_for(self, step: int) -> Path:
        return self.folder / f"{self.prefix}-{step}.pt"

    def recorded(self) -> list[str]:
        return read_index(self.index)

    def remove_leftovers(self) -> list[str]:
        """Temp files of interrupted saves: ``.<prefix>-<step>.pt.XXXXXXXX.tmp``, the index's and
        the symlink's. Matched by our own naming only; call with the folder locked."""
        from mtcore.train.outdir import _LNK, _TMP

        removed = []
        if not self.folder.is_dir():
            return removed
        for entry in self.folder.iterdir():
            match = _TMP.match(entry.name) or _LNK.match(entry.name)
            if match is None:
                continue
            name = match.group("name")
            if name in (INDEX, self.latest.name) or self._pattern.fullmatch(name) or self._best_pattern.fullmatch(name):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry.name)
        return removed

    def existing(self) -> list[Path]:
        found = sorted(p for p in self.folder.glob(f"{self.prefix}-*.pt") if self._pattern.fullmatch(p.name))
        best = sorted(p for p in self.folder.glob(f"{self.best_stem}.best.*.pt") if self._best_pattern.fullmatch(p.name))
        return found + best + [p for p in (self.latest, self.index) if p.exists() or p.is_symlink()]

    def _backup_folder(self) -> Path:
        n = 1
        while (self.folder / f"{self.prefix}.backup-{n}").exists():
            n += 1
        backup = self.folder / f"{self.prefix}.backup-{n}"
        backup.mkdir(parents=True)
        return backup

    def backup_previous_run(self, extra: list[Path]) -> Optional[Path]:
        """Move an earlier run's checkpoints (and ``extra`` files) aside; returns the backup folder."""
        moving = self.existing() + [p for p in extra if p.exists()]
        if not moving:
            return None
        backup = self._backup_folder()
        for path in moving:
            shutil.move(str(path), backup / path.name)
        self.owned = []
        self.best_owned = set()
        return backup

    def step_of(self, name: str) -> Optional[int]:
        """``<prefix>-<step>.pt`` → step; None for any other name."""
        if not self._pattern.fullmatch(name):
            return None
        return int(name[len(self.prefix) + 1 : -len(".pt")])

    def unindexed(self, run_id: Optional[str], newer_than: int = -1) -> list[str]:
        """Checkpoints of run ``run_id`` that the index does not list, newest first: a save killed
        after its file was renamed into place but before the index named it, or a pruning killed
        midway. Ours to continue from and to prune; any other unlisted file is left alone."""
        if not run_id or not self.folder.is_dir():
            return []
        listed = set(self.recorded())
        found = []
        for path in self.folder.glob(f"{self.prefix}-*.pt"):
            step = self.step_of(path.name)
            if step is None or step <= newer_than or path.name in listed or path.is_symlink():
                continue
            try:
                state = _read(path)
            except MtcoreError:
                continue
            if (state.get("best") or {}).get("run_id") == run_id:
                found.append((step, path.name))
        return [name for _, name in sorted(found, reverse=True)]

    def continue_run(self, restart_path: Optional[str], run_id: Optional[str] = None) -> bool:
        """--restart: adopt the index of the run being continued (and its unindexed checkpoints,
        see ``unindexed``), so that its files are pruned as if this run had written them. Returns
        False when the index here belongs to another run (it lists neither the restart checkpoint
        nor a file of ``run_id``); the caller then moves it aside."""
        names = self.recorded()
        if not names:
            self.owned = []
            return True
        source = Path(restart_path).resolve() if restart_path else None
        listed = [n for n in names if (self.folder / n).exists() and self._pattern.fullmatch(n)]
        lineage = listed + self.unindexed(run_id)
        if source is not None and any((self.folder / n).resolve() == source for n in lineage):
            self.owned = sorted(lineage, key=lambda n: self.step_of(n) or 0, reverse=True)
            return True
        return False

    def save(self, state: dict, step: int) -> Path:
        """Write a checkpoint; crash-consistent (see the module docstring)."""
        path = self.path_for(step)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (path.exists() or path.is_symlink()) and path.name not in self.owned:
            backup = self._backup_folder()  # someone else's file of the same name: keep it
            shutil.move(str(path), backup / path.name)
            warnings.warn(f"{path}: not written by this run; moved to {backup} before saving")
        state = dict(state)
        state[DIGEST_KEY] = state_digest(state)
        atomic_torch_save(state, path)
        order = [path.name] + [name for name in self.owned if name != path.name]
        kept, dropped = order[: self.keep], order[self.keep :]
        atomic_text(self.index, "\n".join(kept) + "\n")
        _atomic_symlink(path.name, self.latest)
        for old in dropped:
            (self.folder / old).unlink(missing_ok=True)
        self.owned = kept
        return path

    # best models ---------------------------------------------------------------------------
    def best_path(self, head: str) -> Path:
        return self.folder / best_file_name(self.prefix, head)

    def adopt_best(self, head: str) -> None:
        """--restart: the best file of ``head`` was written by the run being continued."""
        self.best_owned.add(self.best_path(head).name)

    def save_best(self, state: dict, head: str) -> tuple[Path, str]:
        """Write ``head``'s best model (atomic, checksummed); a same-named file this run did not
        write is moved into a backup folder first, never overwritten. Returns (path, digest)."""
        path = self.best_path(head)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (path.exists() or path.is_symlink()) and path.name not in self.best_owned:
            backup = self._backup_folder()
            shutil.move(str(path), backup / path.name)
            warnings.warn(f"{path}: not written by this run; moved to {backup} before saving the best model of head '{head}'")
        state = dict(state)
        state[DIGEST_KEY] = state_digest(state)
        atomic_torch_save(state, path)
        self.best_owned.add(path.name)
        return path, state[DIGEST_KEY]


def best_file_name(prefix: str, head: str) -> str:
    """``model.ckpt`` → ``model.best.<head>.pt``; any other prefix P → ``P.best.<head>.pt``."""
    stem = prefix[: -len(".ckpt")] if prefix.endswith(".ckpt") and len(prefix) > len(".ckpt") else prefix
    return f"{stem}.best.{head}.pt"


def read_checkpoint_file(path: Path) -> dict:
    """One checkpoint (or best) file, checksum verified; no index fallback."""
    return _read(Path(path))


# -- loading ----------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    """Load and verify one checkpoint file; MtcoreError says what is wrong with it."""
    if not path.exists():
        raise MtcoreError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise MtcoreError(f"{path}: cannot be read as an mtcore checkpoint ({type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MtcoreError(f"{path}: not an mtcore checkpoint")
    stored = state.get(DIGEST_KEY)
    if stored is not None and stored != state_digest(state):
        raise MtcoreError(f"{path}: checksum mismatch (the file is corrupted)")
    # checkpoints from before checksums (no sha256 key) load as they are
    state["path"] = str(path)
    return state


def _index_folder(folder: Path) -> Path:
    """The folder whose index to read for a working folder: out.json's save_ckpt folder when a
    run there saved into a subfolder, else the folder itself."""
    import json

    out = folder / "out.json"
    if out.is_file():
        try:
            save_ckpt = json.loads(out.read_text()).get("training", {}).get("save_ckpt")
        except (OSError, ValueError, AttributeError):
            save_ckpt = None
        if isinstance(save_ckpt, str) and save_ckpt:
            sub = (folder / save_ckpt).parent
            if (sub / INDEX).is_file():
                return sub
    return folder


def _first_intact(folder: Path, names: list[str], failed: list[str], start: Any = None) -> dict:
    """The first checkpoint of ``names`` that loads and verifies; warns when it is not the first."""
    first = str(start) if start is not None else None
    for name in names:
        candidate = folder / name
        try:
            state = _read(candidate)
        except MtcoreError as exc:
            failed.append(str(exc))
            first = first or str(candidate)
            continue
        if failed:
            warnings.warn(f"{first}: unusable ({failed[0].split(': ', 1)[-1]}); using the previous checkpoint {candidate} instead")
        return state
    raise MtcoreError(f"{folder / INDEX}: no intact checkpoint ({'; '.join(failed) or 'it lists none'})")


def load_checkpoint(path: Path, check_plugins: bool = True, data_loaders: bool = False) -> dict:
    """Load a checkpoint file (or the newest one named by a folder's ``checkpoint`` index). A file
    that fails its checksum falls back to the next older one its folder's index lists.

    ``check_plugins``: a descriptor, fitting net or loss the checkpoint records (its provenance)
    that no installed plugin provides is an error naming the package to install, instead of an
    "unknown type" from the schema later; ``data_loaders`` (a restart, which reads the data
    again) also warns about a missing data loader. Checked after the fallback, so a missing
    plugin never makes an older checkpoint look preferable."""
    state = _load_checkpoint(Path(path))
    if check_plugins:
        check_provenance(state, data_loaders, str(path))
    return state


def check_provenance(state: dict, data_loaders: bool = False, path: str = "") -> None:
    """The plugins a checkpoint records must be installed (see ``load_checkpoint``)."""
    from mtcore.plugins import get_registry
    from mtcore.provenance import check

    registry = get_registry()
    check(state.get("provenance"), registry, str(state.get("path", path)))
    if data_loaders:
        check(state.get("provenance"), registry, str(state.get("path", path)), ("data_loader",), missing_is_error=False)


def newest_complete(folder: Path, prefix: str) -> tuple[Optional[dict], str]:
    """``--restart auto``: the newest complete checkpoint ``<prefix>-<step>.pt`` in ``folder``.

    Complete = it loads and its digest verifies. Candidates are the index's entries, newest first
    (a torn or corrupted one is skipped with a warning naming it), then a newer file of the same
    run that a kill kept out of the index (``CheckpointManager.unindexed``). Returns (state, '')
    or (None, why there is none): the caller then starts a fresh run, so one job-script line
    serves the first start and every re-run. Reads only; nothing in the folder changes."""
    folder = Path(folder)
    manager = CheckpointManager(folder, prefix, 1)
    if not (folder / INDEX).is_file():
        return None, f"no checkpoint index '{folder / INDEX}'"
    names = [n for n in manager.recorded() if manager.step_of(n) is not None]
    if not names:
        return None, f"{folder / INDEX} lists no {prefix}-<step>.pt checkpoint"
    failed: list[str] = []
    state = None
    for name in names:
        try:
            state = _read(folder / name)
            break
        except MtcoreError as exc:
            failed.append(str(exc))
    if state is None:
        return None, f"no complete checkpoint in {folder / INDEX} ({'; '.join(failed)})"
    if failed:
        warnings.warn(f"{failed[0]}; skipped, using the previous checkpoint {state['path']} instead")
    newer = manager.unindexed((state.get("best") or {}).get("run_id"), newer_than=int(state.get("step", -1)))
    if newer:
        state = _read(folder / newer[0])  # verified a moment ago by unindexed()
    return state, ""


def _load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        folder = _index_folder(path)
        index = folder / INDEX
        if not index.is_file():
            raise MtcoreError(f"{path}: no '{INDEX}' index file in this folder; give a checkpoint file")
        names = read_index(index)
        if not names:
            raise MtcoreError(f"{index}: lists no checkpoint")
        return _first_intact(folder, names, [])
    if not path.exists() and not path.is_symlink():
        candidate = path.with_name(path.name + ".pt")
        if candidate.exists():
            path = candidate
        else:
            raise MtcoreError(f"{path}: checkpoint not found")
    try:
        return _read(path)
    except MtcoreError as exc:
        # fall back along the index beside the file, if the file is one of its entries
        folder = path.parent
        names = read_index(folder / INDEX)
        real = path.resolve()
        position = next((i for i, n in enumerate(names) if (folder / n).resolve() == real), None)
        if position is None or position + 1 >= len(names):
            raise
        shown = f"{path} (-> {os.readlink(path)})" if path.is_symlink() else path
        return _first_intact(folder, names[position + 1 :], [str(exc)], start=shown)


def latest_checkpoint(folder: Path) -> Path:
    folder = _index_folder(Path(folder))
    index = folder / INDEX
    if not index.is_file():
        raise MtcoreError(f"{folder}: no '{INDEX}' file; run mtcore train here first or pass -c CHECKPOINT")
    names = read_index(index)
    if not names:
        raise MtcoreError(f"{index}: lists no checkpoint")
    return folder / names[0]
