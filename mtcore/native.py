"""Small C libraries that mtcore compiles once with the system C compiler and caches.

Why: two jobs need a few lines of native code that plain PyTorch does not offer (MKL's vendor
answer, :mod:`mtcore.mkl_dispatch`; the embedding net's fused element-wise passes,
:mod:`mtcore.model.tangent_embedding`). They are plain C (no torch headers, no build system): one
compiler call of well under a second, so a fresh install needs nothing beyond a C compiler, and
without one mtcore runs the same arithmetic in plain PyTorch. Where torch's GNU OpenMP runtime is
in the process, the kernel libraries are built with -fopenmp and split their rows over torch's
own threads (``PARALLEL``). This module must not import torch (mkl_dispatch runs before torch is
loaded).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence


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


#: Put ``MTCORE_CLONES`` before a hot loop's function (with this text at the top of the source):
#: the compiler then builds it for AVX-512, AVX2 + FMA and plain x86-64, and the loader picks the
#: best the processor has (function multiversioning). Why: the system compiler's default target
#: is plain x86-64 (SSE2, two doubles per instruction); compiling for the build machine instead
#: (-march=native) would crash a cached library on an older node of a cluster sharing the cache.
CLONES = r"""
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MTCORE_NO_CLONES)
#define MTCORE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MTCORE_CLONES
#endif
"""
#: flags to build the same source again without clones, where the compiler or C library lacks them
NO_CLONES = ("-DMTCORE_NO_CLONES",)


def cached_library(stem: str, source: str, flags: Sequence[str] = ("-O2",),
                   fallback: Optional[Sequence[str]] = None) -> tuple[Optional[Path], str]:
    """The cached library for ``source``, built first if missing: (path, "") or (None, why not).
    Where building with ``flags`` fails, ``flags + fallback`` are tried (and used from then on)."""
    target = library_path(stem, source, flags)
    if target.exists():
        return target, ""
    spare = library_path(stem, source, [*flags, *fallback]) if fallback is not None else None
    if spare is not None and spare.exists():
        return spare, ""
    why = build_library(source, target, flags)
    if why is None:
        return target, ""
    if spare is None or build_library(source, spare, [*flags, *fallback]) is not None:
        return None, why
    return spare, ""


def load_library(path: Path, signatures: Mapping[str, Sequence[type]]) -> tuple[Optional[ctypes.CDLL], str]:
    """Load ``path`` and declare each function's argument types (all return void):
    (library, "on") or (None, "off (why)")."""
    try:
        lib = ctypes.CDLL(str(path))
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = list(argtypes)
            fn.restype = None
    except (OSError, AttributeError) as exc:
        return None, f"off (could not load {path}: {exc})"
    return lib, "on"


class KernelLibrary:
    """A kernel library built and loaded on first use. ``switch`` (an environment variable set
    to 1) keeps it off; so does a failed build. ``library`` is None while off, ``status`` says why."""

    def __init__(self, stem: str, source: str, flags: Sequence[str], signatures: Mapping[str, Sequence[type]],
                 switch: str):
        self.stem, self.source, self.flags, self.signatures, self.switch = stem, source, flags, signatures, switch
        self.library: Optional[ctypes.CDLL] = None
        self.status = "not tried"
        #: the kernels split their rows over OpenMP threads themselves (see PARALLEL)
        self.parallel = False

    def load(self) -> Optional[ctypes.CDLL]:
        if self.status == "not tried":
            if os.environ.get(self.switch) == "1":
                self.status = f"off ({self.switch}=1)"
            else:
                self.library, self.status = open_library(self.stem, self.source, self.flags, self.signatures)
                self.parallel = parallel(self.library)
        return self.library


_pool: Optional[ThreadPoolExecutor] = None


def run_together(calls: Sequence[Callable[[], None]]) -> None:
    """Run ``calls`` at the same time: the first on this thread, the others on a shared pool.
    Meant for chunks of one ctypes kernel call: ctypes releases the GIL while C runs, so the
    chunks use separate cores."""
    global _pool
    others = calls[1:]
    if others and (_pool is None or _pool._max_workers < len(others)):  # noqa: SLF001 (size of the executor)
        _pool = ThreadPoolExecutor(max_workers=len(others), thread_name_prefix="mtcore-kernels")
    futures = [_pool.submit(call) for call in others] if others else []
    calls[0]()
    for future in futures:
        future.result()


#: Put ``MTCORE_PARALLEL_FOR`` before a kernel's outer loop over independent rows (with this text
#: at the top of the source, after CLONES): built with OpenMP, the rows are split over torch's
#: own OpenMP threads (the same runtime: see :func:`gomp_loaded`), so the kernels use the cores
#: ``torch.set_num_threads`` gives without a second pool of threads competing with torch's
#: (whose workers spin for a while after each of torch's parallel operations). Without OpenMP the
#: pragma is ignored and the caller splits the rows over Python threads (:func:`run_together`).
PARALLEL = r"""
#ifdef _OPENMP
#define MTCORE_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
int mtcore_openmp(void) { return 1; }
#else
#define MTCORE_PARALLEL_FOR
int mtcore_openmp(void) { return 0; }
#endif
"""
OPENMP = ("-fopenmp",)


def gomp_loaded() -> bool:
    """Whether GNU OpenMP is already in this process (torch's Linux wheels bring it): a kernel
    library built with -fopenmp then binds to that same runtime (one libgomp.so.1 per process),
    so its threads are torch's. Elsewhere (another OpenMP runtime, or none) no OpenMP is built."""
    try:
        with open("/proc/self/maps") as maps:
            # by the name it binds to: a wheel's own copy under a mangled name (libgomp-<hash>.so) is not it
            return any("/libgomp.so" in line for line in maps)
    except OSError:
        return False


def open_library(stem: str, source: str, flags: Sequence[str],
                 signatures: Mapping[str, Sequence[type]]) -> tuple[Optional[ctypes.CDLL], str]:
    """A kernel library built with function clones where the compiler has them (``CLONES``),
    else without, and with OpenMP where torch's runtime is loaded and the source asks for it
    (``PARALLEL``): (library, "on") or (None, "off (why)")."""
    if "mtcore_openmp" in source and gomp_loaded():
        path, _ = cached_library(stem, source, [*flags, *OPENMP], NO_CLONES)
        if path is not None:
            library, status = load_library(path, signatures)
            if library is not None:
                return library, status
    path, why = cached_library(stem, source, flags, NO_CLONES)
    if path is None:
        return None, f"off ({why})"
    return load_library(path, signatures)


def parallel(library: Optional[ctypes.CDLL]) -> bool:
    """Whether ``library`` splits its rows over OpenMP threads itself (built with ``PARALLEL`` and -fopenmp)."""
    if library is None:
        return False
    try:
        function = library.mtcore_openmp
    except AttributeError:
        return False
    function.restype = ctypes.c_int
    return bool(function())
