"""Small C libraries that mtcore compiles once with the system C compiler and caches.

Why: two jobs need a few lines of native code that plain PyTorch does not offer (MKL's vendor
answer, :mod:`mtcore.mkl_dispatch`; the embedding net's fused element-wise passes,
:mod:`mtcore.model.tangent_embedding`). They are plain C (no torch headers, no build system): one
compiler call of well under a second, so a fresh install needs nothing beyond a C compiler, and
without one mtcore runs the same arithmetic in plain PyTorch. This module must not import torch
(mkl_dispatch runs before torch is loaded).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def cache_dir() -> Path:
    """$MTCORE_CACHE_DIR, else $XDG_CACHE_HOME/mtcore, else ~/.cache/mtcore."""
    if os.environ.get("MTCORE_CACHE_DIR"):
        return Path(os.environ["MTCORE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtcore"


def library_path(stem: str, source: str, flags: Sequence[str]) -> Path:
    """Where the library built from ``source`` with ``flags`` is cached (a new source or new
    flags give a new file, so a stale library is never loaded)."""
    digest = hashlib.sha256((source + "\0" + " ".join(flags)).encode()).hexdigest()[:12]
    return cache_dir() / f"{stem}-{digest}-{platform.machine()}.so"


def build_library(source: str, target: Path, flags: Sequence[str] = ("-O2",)) -> Optional[str]:
    """Compile ``source`` into the shared library ``target`` (atomically: a half-written file is
    never loaded); None on success, else why not, in a few words."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "source.c"
            src.write_text(source)
            built = Path(tmp) / "library.so"
            run = subprocess.run([compiler, "-shared", "-fPIC", *flags, "-o", str(built), str(src)],
                                 capture_output=True, text=True, timeout=120)
            if run.returncode != 0 or not built.exists():
                return f"{compiler} failed: {(run.stderr or run.stdout).strip()[:200]}"
            os.replace(built, target)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not build {target}: {exc}"
    return None


def cached_library(stem: str, source: str, flags: Sequence[str] = ("-O2",)) -> tuple[Optional[Path], str]:
    """The cached library for ``source``, built first if missing: (path, "") or (None, why not)."""
    target = library_path(stem, source, flags)
    if not target.exists():
        why = build_library(source, target, flags)
        if why is not None:
            return None, why
    return target, ""
