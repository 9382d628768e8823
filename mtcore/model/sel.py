"""Resolving ``sel`` ("auto", "auto:f" or explicit) from pooled neighbour statistics."""

from __future__ import annotations

import math
import warnings
from typing import Union

from mtcore.errors import MtcoreError
from mtcore.hookspecs import NeighborStat


def auto_factor(sel: str, where: str) -> float:
    if sel == "auto":
        return 1.1
    if sel.startswith("auto:"):
        try:
            return float(sel.split(":", 1)[1])
        except ValueError:
            pass
    raise MtcoreError(f"{where}/sel: '{sel}' is neither a list of ints, an int, 'auto' nor 'auto:<factor>'")


def round_sel(count: int, factor: float) -> int:
    """DeePMD-kit's headroom rule: truncate count·factor, then round up to a multiple of 4."""
    return int(4 * math.ceil(int(count * factor) / 4))


def resolve_sel(
    sel: Union[str, list, int], rcut: float, stat: NeighborStat, ntypes: int, mixed: bool, where: str
) -> Union[list, int]:
    """The ``sel`` to build with: computed for "auto", checked (with a warning) when explicit."""
    counts = stat.max_count(rcut, mixed)
    if isinstance(sel, str):
        factor = auto_factor(sel, where)
        if mixed:
            return round_sel(int(counts[0]), factor)
        return [round_sel(int(c), factor) for c in counts]
    explicit = [sel] if isinstance(sel, int) else list(sel)
    if mixed:
        explicit = [sum(explicit)]
    elif len(explicit) != ntypes:
        raise MtcoreError(f"{where}/sel has {len(explicit)} entries; expected one per type in type_map ({ntypes})")
    for t, (mine, seen) in enumerate(zip(explicit, counts)):
        if seen > mine:
            warnings.warn(
                f"{where}/sel[{t}] = {mine} is smaller than the {seen} neighbours seen in the training data; "
                "the farthest are dropped and energy conservation suffers",
                stacklevel=2,
            )
    return explicit[0] if mixed else explicit
