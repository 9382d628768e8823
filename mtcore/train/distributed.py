"""The process group of a data-parallel run (torchrun), and the few collectives training needs.

Why this shape: every rank keeps the SAME random stream (the run's seed) and draws what one
process with the summed batch would draw; each rank then takes its own slice of the drawn frames
(:func:`rank_positions`). Every decision that follows from a draw (which head steps, which system,
when to validate) is therefore identical on all ranks without a broadcast per step, and a run with
N ranks of batch b equals a single-process run with batch N·b up to rounding.

Gradients are averaged with one flat all_reduce per step (:func:`average_gradients`, what
DistributedDataParallel does) rather than by wrapping the model in DDP: the stepped head changes
from step to step and the force loss differentiates inside ``forward``; an explicit reduction of
exactly the stepped optimiser's parameters is simpler to make exact, and it carries the per-step
flags (a non-finite loss on any rank, a stop request on any rank) in the same message so that
every rank takes the same decision at the same step.

A peer that dies makes gloo (or nccl) raise RuntimeError inside a collective; :class:`PeerLost`
turns it into one line for the user.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mtcore.errors import MtcoreError

#: environment variables torchrun sets for every worker (MASTER_* name the rendezvous)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerLost(MtcoreError):
    """A collective failed because another rank went away (killed, crashed, or its host lost)."""

    def __init__(self, rank: int, world: int, what: str, detail: str):
        self.rank, self.world, self.what, self.detail = rank, world, what, detail
        super().__init__(f"rank {rank} of {world} lost its peers while {what} ({detail})")


@dataclass
class Group:
    """This process's place in the run: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = Group()
_lost = {"peers": False}
_departure = {"arranged": False}  # wait_for_peers completed: leave now, no teardown


def current() -> Group:
    return _current


def peers_lost() -> bool:
    """True once a collective failed: the job is over, and this rank only reports and exits."""
    return _lost["peers"]


def stand_down() -> None:
    """A peer is gone: ignore the SIGTERM torchrun sends the survivors, so that this rank can
    still print its one line (which names the last checkpoint) and release the folder lock."""
    _lost["peers"] = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise MtcoreError(f"environment variable {name}: expected an integer (as torchrun sets it), got {value!r}") from None


def launched_world() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1


def setup(device: Optional[str] = None) -> tuple[Group, Optional[str]]:
    """Join the process group when the environment says so (WORLD_SIZE > 1): gloo on the CPU,
    nccl on GPUs (one per rank: cuda:LOCAL_RANK). Returns the group and the device to train on
    (None: the trainer's default). A single process is left alone."""
    global _current
    world = launched_world()
    if world <= 1:
        return _current, device
    missing = [name for name in TORCHRUN_ENV if not os.environ.get(name)]
    if missing:
        raise MtcoreError(
            f"WORLD_SIZE={world} but environment variable {missing[0]} is not set; launch with "
            "torchrun --nproc_per_node=N -m mtcore train ..."
        )
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise MtcoreError(f"environment variable RANK: {rank} is outside 0..{world - 1}")
    wanted = device or os.environ.get("MTCORE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(wanted).type
    except RuntimeError:
        raise MtcoreError(f"--device {wanted}: not a torch device (cpu, cuda)") from None
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MtcoreError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "use --nproc_per_node at most the number of GPUs"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif kind == "cpu":
        device = "cpu"
        backend = "gloo"
    else:
        raise MtcoreError(f"--device {wanted}: data-parallel training runs on cpu (gloo) or cuda (nccl)")
    if not dist.is_available() or not (dist.is_gloo_available() if backend == "gloo" else dist.is_nccl_available()):
        raise MtcoreError(f"this torch build has no {backend} backend for data-parallel training")
    if not dist.is_initialized():
        try:
            minutes = float(os.environ.get("MTCORE_DIST_TIMEOUT_MIN") or 30)
        except ValueError:
            raise MtcoreError("environment variable MTCORE_DIST_TIMEOUT_MIN: expected minutes (a number)") from None
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=minutes))
        except (RuntimeError, ValueError) as exc:
            raise MtcoreError(
                f"rank {rank} of {world}: cannot join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(exc)})"
            ) from None
    _current = Group(rank, world, local_rank, backend)
    return _current, device


def wait_for_peers() -> None:
    """At a run's clean end: every rank gets here before any leaves, and rank 0 (whose process
    holds the rendezvous store when the ranks were started by hand, as the tests do) leaves
    last. Each other rank says so in the store and is then to leave at once without tearing its
    process group down (:func:`departure_arranged`, the CLI's ``os._exit``): a teardown that
    races a peer's, or a peer that already left, can make gloo abort the process
    ("terminate called without an active exception", exit -6) after a run that succeeded.
    Not after an error: a failed peer would never come."""
    if not (_current.enabled and dist.is_available() and dist.is_initialized()) or _lost["peers"]:
        return
    try:
        dist.barrier()
        store = dist.distributed_c10d._get_default_store()
        if _current.rank:
            store.set(f"mtcore/left/{_current.rank}", "1")
        else:
            store.wait([f"mtcore/left/{r}" for r in range(1, _current.world)], timedelta(seconds=120))
    except (RuntimeError, AttributeError):  # a peer left already (its own error is its to report)
        return
    _departure["arranged"] = True



def departure_arranged() -> bool:
    """True once :func:`wait_for_peers` completed: this rank leaves the process now, as it is
    (no process-group teardown, no interpreter teardown of torch's C++ state)."""
    return _departure["arranged"]


def shutdown() -> None:
    """Leave the process group (at the end of a run, also after an error). After an arranged
    departure the group is left as it is: the process ends next, and a teardown could race."""
    global _current
    if dist.is_available() and dist.is_initialized() and not _departure["arranged"]:
        try:
            dist.destroy_process_group()
        except RuntimeError:
            pass
    _current = Group()


def main_only(context):
    """``context`` on rank 0, a no-op elsewhere (locks and folder checks belong to rank 0)."""
    return context if _current.is_main else contextlib.nullcontext()


def _first_line(exc: BaseException) -> str:
    """The backend's message without its source location and advice: 'Connection closed by peer ...'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return text.split(". ")[0].rstrip(".") or lines[0]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _current.backend == "nccl" else torch.device("cpu")


def _guard(what: str):
    """Context: a failed collective (a peer died) becomes PeerLost naming this rank."""
    group = _current

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            if exc is not None and isinstance(exc, RuntimeError):
                raise PeerLost(group.rank, group.world, what, _first_line(exc)) from None
            return False

    return _Guard()


def broadcast_object(obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` on every rank (small picklable things: a seed, a config section)."""
    if not _current.enabled:
        return obj
    box = [obj if _current.is_main else None]
    with _guard(what):
        dist.broadcast_object_list(box, src=0, device=_device() if _current.backend == "nccl" else None)
    return box[0]


def gather_objects(obj: Any, what: str) -> list:
    """Every rank's ``obj``, in rank order, on every rank (so all compute the same thing from it)."""
    if not _current.enabled:
        return [obj]
    out: list = [None] * _current.world
    with _guard(what):
        dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, what: str) -> None:
    """Rank 0's parameters and buffers on every rank (statistics are computed on rank 0 only)."""
    if not _current.enabled:
        return
    with _guard(what), torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(params: Sequence[torch.Tensor], flags: Sequence[float], what: str) -> list[float]:
    """Average the gradients of ``params`` over the ranks in one all_reduce and sum ``flags``.

    A parameter without a gradient on some rank counts as zero there and gets the average
    (as one process holding every rank's frames would); one without a gradient on every rank
    keeps ``grad`` None, so Adam leaves it alone exactly as in a single process."""
    if not _current.enabled:
        return list(flags)
    reference = params[0]
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])  # float64 stays exact
    parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=p.device)
             for p in params]
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params] + [float(f) for f in flags],
                           dtype=dtype, device=reference.device)
    flat = torch.cat(parts + [present])
    with _guard(what):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    world = float(_current.world)
    total = sum(part.numel() for part in parts)
    counts = flat[total : total + len(params)].tolist()
    offset = 0
    for index, p in enumerate(params):
        n = p.numel()
        if counts[index] > 0:
            p.grad = (flat[offset : offset + n] / world).view_as(p).to(p.dtype).clone()
        offset += n
    return [float(v) for v in flat[total + len(params) :].tolist()]


def rank_positions(drawn: int, per_rank: int, rank: int, world: int) -> np.ndarray:
    """Which of the ``drawn`` frames (what one process with batch world·per_rank drew) this rank
    takes: ``[rank·b, (rank+1)·b)``. A system with fewer frames than world·b wraps round, so the
    ranks' batches overlap (documented: such a run is not the single-process run with the summed
    batch)."""
    b = min(per_rank, drawn)
    return (rank * b + np.arange(b)) % drawn
