"""Which frames the statistics read: a bounded, seeded sample instead of the whole data set.

Statistics run before the first step; reading every frame would make the time to the first step
(neighbour statistics: ~5 ms a frame of 192 atoms) grow with the data. Small
data is read whole, exactly as before; beyond the caps (``model/neighbor_stat_nframes``,
``model/data_stat_nframes``) every system gets an even share, and when there are more systems
than the cap allows, a seeded choice of systems is read.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: default of model/neighbor_stat_nframes: frames read for sel "auto" (all trained heads pooled)
NEIGHBOR_STAT_NFRAMES = 1000
#: default of model/data_stat_nframes: frames one head's davg/dstd and output biases read
DATA_STAT_NFRAMES = 1000


def even_shares(sizes: Sequence[int], cap: int) -> np.ndarray:
    """Frames per system summing to ``min(cap, sum(sizes))``, as even as the sizes allow (a small
    system gives all its frames, the rest is shared by the others). Needs ``cap >= len(sizes)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    shares = np.zeros_like(sizes)
    left, open_ = int(cap), list(np.argsort(sizes, kind="stable"))
    while open_ and left > 0:
        fair = left // len(open_)
        smallest = open_[0]
        if sizes[smallest] <= fair:  # fits whole: take it, share the rest among the others
            shares[smallest] = sizes[smallest]
            left -= int(sizes[smallest])
            open_.pop(0)
            continue
        extra = left - fair * len(open_)  # the remainder goes one each to the first systems
        for rank, s in enumerate(sorted(open_)):
            shares[s] = fair + (1 if rank < extra else 0)
        break
    return shares


def neighbor_stat_frames(sizes: Sequence[int], cap: Optional[int], rng: np.random.Generator) -> list[np.ndarray]:
    """For each system, the (sorted) frames that neighbour statistics read: every frame when the
    systems hold at most ``cap`` together (None: no cap); else an even seeded share per system,
    or one frame of each of ``cap`` seeded systems when there are more systems than ``cap``."""
    sizes = [int(n) for n in sizes]
    if cap is None or sum(sizes) <= cap:
        return [np.arange(n) for n in sizes]
    if len(sizes) > cap:
        chosen = set(int(i) for i in rng.choice(len(sizes), size=cap, replace=False))
        shares = np.array([1 if i in chosen else 0 for i in range(len(sizes))])
    else:
        shares = even_shares(sizes, cap)
    return [np.sort(rng.choice(n, size=int(k), replace=False)) if k else np.zeros(0, np.int64)
            for n, k in zip(sizes, shares)]


def stat_systems(batch_sizes: Sequence[int], nbatch: int, cap: Optional[int],
                 rng: np.random.Generator) -> tuple[list[int], int]:
    """(systems, batches per system) for a head's statistics: ``nbatch`` batches of each system
    when that fits in ``cap`` frames (None: no cap); else fewer batches per system, down to one;
    else a seeded choice of systems whose one batch each fits (at least one system). ``rng`` is
    used only in that last case, so uncapped statistics draw exactly what they always drew."""
    total = int(sum(batch_sizes))
    everyone = list(range(len(batch_sizes)))
    if cap is None or nbatch * total <= cap:
        return everyone, nbatch
    if total <= cap:
        return everyone, max(1, cap // total)
    chosen, used = [], 0
    for s in rng.permutation(len(batch_sizes)):
        if chosen and used + batch_sizes[s] > cap:
            continue
        chosen.append(int(s))
        used += int(batch_sizes[s])
    return sorted(chosen), 1
