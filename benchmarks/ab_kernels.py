"""A/B of the step's small kernels, in one process: what each of them is worth in a training step.

    OMP_NUM_THREADS=1 python benchmarks/ab_kernels.py --case water/se_e2_a --rounds 60 [--precision float32]

Variants, each a training step of the same trainer (the weights move on; the timing does not care):

- ``before``: torch's ``tanh`` kernel and Adam's per-tensor loop (what mtcore did until these
  changes);
- ``tanh``: only tanh as 2σ(2x) − 1 (mtcore.model.fast_tanh);
- ``adam``: only fused Adam (mtcore.train.trainer.new_adam);
- ``after``: both (what mtcore does now);
- ``doubling`` (not kept): ``after`` plus width-doubling layers that add ``x`` to both halves of
  ``h`` by broadcasting instead of writing ``cat([x, x])`` out: its backward is a reduction over a
  middle dimension, slower than the concatenation's (se_e2_r 1.11× slower in one run).

    OMP_NUM_THREADS=1 python benchmarks/ab_kernels.py --inference [--precision float32] [--atoms 1536]

instead times frozen-model calls (energy, forces, virial; bench_inference.py's model and frames),
the scripted module built once with torch's ``tanh`` and once with mtcore's, calls alternating.

The variants alternate step by step (order reversed every other round), so slow spells of a
shared machine fall on all of them; the median per variant and its ratio to ``before`` are printed.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("before", "tanh", "adam", "after", "doubling")


def _broadcast_doubling_forward(self, x: torch.Tensor, narrow: bool = False) -> torch.Tensor:
    """Block.forward with the width-doubling residual as a broadcast add (tried, not kept)."""
    h = self.dense(x, narrow)
    idt = self.dense.idt
    if self.use_timestep and idt is not None:
        h = h * idt.to(h.dtype)
    if self.mode == 1:
        return x + h
    if self.mode == 2:
        return (h.unflatten(-1, (2, x.shape[-1])) + x.unsqueeze(-2)).flatten(-2)
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="water/se_e2_a")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--precision", default=None, help="set descriptor and fitting precision")
    parser.add_argument("--variants", default="before,tanh,adam,after", help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--inference", action="store_true", help="time frozen-model calls instead of training steps")
    parser.add_argument("--atoms", type=int, default=192, help="with --inference: 192, 1536 or 12288")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.inference:
        inference(args.precision or "float64", args.atoms, args.rounds)
        return

    from mtcore.model import mlp
    from mtcore.model.fast_tanh import Tanh
    from mtcore.runtime import tune_allocator
    from alternating import alternate, example_trainer, print_table

    tune_allocator()
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = example_trainer(args.case, args.precision, Path(tmp))
        denses = [m for m in trainer.model.modules() if isinstance(m, mlp.Dense) and isinstance(m.activation, Tanh)]
        optimizers = {}
        for name, runtime in trainer.heads.items():
            if runtime.optimizer is not None:
                params = [p for group in runtime.optimizer.param_groups for p in group["params"]]
                optimizers[name] = (torch.optim.Adam(params, lr=1e-3), runtime.optimizer)
        kept_forward = mlp.Block.forward

        def use(variant: str) -> None:
            for dense in denses:
                dense.activation = Tanh() if variant in ("tanh", "after", "doubling") else torch.nn.Tanh()
            for name, (plain, fused) in optimizers.items():
                trainer.heads[name].optimizer = fused if variant in ("adam", "after", "doubling") else plain
            mlp.Block.forward = _broadcast_doubling_forward if variant == "doubling" else kept_forward

        times = alternate(trainer, variants, use, args.rounds)
        use("after")
    print_table(f"{args.case} ({args.precision or 'as in the input'}, {torch.get_num_threads()} thread(s), {args.rounds} rounds)", times)


def inference(precision: str, atoms: int, rounds: int) -> None:
    import warnings

    from bench_inference import SIZES, build_module, replicated_water
    from mtcore.model import mlp
    from mtcore.runtime import tune_allocator

    warnings.simplefilter("ignore")  # torch.jit deprecation notes
    tune_allocator()
    kept = mlp.make_activation
    mlp.make_activation = lambda name: torch.nn.Tanh() if name == "tanh" else kept(name)
    modules = {"torch tanh": build_module(precision)}
    mlp.make_activation = kept
    modules["mtcore tanh"] = build_module(precision)
    coord, atype, box = replicated_water(SIZES[atoms])
    times: dict[str, list[float]] = {k: [] for k in modules}
    for module in modules.values():
        for _ in range(3):
            module(coord, atype, box)
    names = list(modules)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            modules[name](coord, atype, box)
            times[name].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(times[names[0]])
    print(f"frozen water se_e2_a, {atoms} atoms, {precision}, {torch.get_num_threads()} thread(s), {rounds} rounds")
    print("| activation | median ms/call | lower quartile | against torch tanh |")
    print("|---|---:|---:|---:|")
    for name in names:
        values = sorted(times[name])
        print(f"| {name} | {statistics.median(values):.1f} | {values[len(values) // 4]:.1f} | {statistics.median(values) / base:.3f} |")


if __name__ == "__main__":
    main()
