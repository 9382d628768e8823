"""Checkpoints: written atomically, pruned to max_ckpt_keep, never overwriting a user's files.

Layout in the working folder (``save_ckpt`` = ``model.ckpt``):
    model.ckpt-<step>.pt   one file per save
    model.ckpt.pt          symlink to the newest
    checkpoint             text file: the newest first, then the older ones kept
A run from scratch moves checkpoints and the lcurve of an earlier run into a backup folder
instead of overwriting them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from mtcore.errors import MtcoreError

FORMAT = "mtcore-checkpoint"
INDEX = "checkpoint"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.parent / f".{link.name}.{os.getpid()}.lnk"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


class CheckpointManager:
    def __init__(self, folder: Path, prefix: str, keep: int):
        self.folder = Path(folder)
        self.prefix = prefix
        self.keep = max(1, int(keep))

    def path_for(self, step: int) -> Path:
        return self.folder / f"{self.prefix}-{step}.pt"

    def recorded(self) -> list[str]:
        index = self.folder / INDEX
        if not index.is_file():
            return []
        return [line.strip() for line in index.read_text().splitlines() if line.strip()]

    def existing(self) -> list[Path]:
        found = sorted(self.folder.glob(f"{self.prefix}-*.pt"))
        latest = self.folder / f"{self.prefix}.pt"
        index = self.folder / INDEX
        return found + [p for p in (latest, index) if p.exists() or p.is_symlink()]

    def backup_previous_run(self, extra: list[Path]) -> Optional[Path]:
        """Move an earlier run's checkpoints (and ``extra`` files) aside; returns the backup folder."""
        moving = self.existing() + [p for p in extra if p.exists()]
        if not moving:
            return None
        n = 1
        while (self.folder / f"{self.prefix}.backup-{n}").exists():
            n += 1
        backup = self.folder / f"{self.prefix}.backup-{n}"
        backup.mkdir()
        for path in moving:
            shutil.move(str(path), backup / path.name)
        return backup

    def save(self, state: dict, step: int) -> Path:
        path = self.path_for(step)
        atomic_torch_save(state, path)
        _atomic_symlink(path.name, self.folder / f"{self.prefix}.pt")
        kept = [path.name] + [name for name in self.recorded() if name != path.name]
        for old in kept[self.keep :]:
            (self.folder / old).unlink(missing_ok=True)
        _atomic_text(self.folder / INDEX, "\n".join(kept[: self.keep]) + "\n")
        return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint file (or the newest one named by a folder's ``checkpoint`` index)."""
    path = Path(path)
    if path.is_dir():
        index = path / INDEX
        if not index.is_file():
            raise MtcoreError(f"{path}: no '{INDEX}' index file in this folder; give a checkpoint file")
        names = [line.strip() for line in index.read_text().splitlines() if line.strip()]
        if not names:
            raise MtcoreError(f"{index}: lists no checkpoint")
        path = path / names[0]
    if not path.exists():
        candidate = path.with_name(path.name + ".pt")
        if candidate.exists():
            path = candidate
        else:
            raise MtcoreError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise MtcoreError(f"{path}: cannot be read as an mtcore checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MtcoreError(f"{path}: not an mtcore checkpoint")
    state["path"] = str(path)
    return state


def latest_checkpoint(folder: Path) -> Path:
    index = Path(folder) / INDEX
    if not index.is_file():
        raise MtcoreError(f"{folder}: no '{INDEX}' file; run mtcore train here first or pass -c CHECKPOINT")
    names = [line.strip() for line in index.read_text().splitlines() if line.strip()]
    if not names:
        raise MtcoreError(f"{index}: lists no checkpoint")
    return Path(folder) / names[0]
