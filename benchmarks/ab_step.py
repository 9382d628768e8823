"""A/B of the training step's backward, in one process: what each change since 2026-12-03 is worth.

    OMP_NUM_THREADS=1 python benchmarks/ab_step.py --case water/se_e2_a --rounds 40 [--precision float32]

Variants, each a training step of the same trainer (the weights move on; the timing does not
care). Each variant adds one change to the one before it:

- ``before``: ``loss.backward()`` over the whole graph (also back to the coordinates, whose
  gradient nobody reads) and the embedding nets differentiated twice by autograd;
- ``inputs``: the backward only toward the head's trainable parameters
  (``loss.backward(inputs=...)``);
- ``nets``: the nets' value and input derivative computed together
  (mtcore/model/tangent_embedding.py);
- ``loops``: se_e2_a's per-atom contraction as C loops over the real pairs instead of the padded
  batched product (mtcore/model/pair_contraction.py);
- ``join``: the per-type nets' rows joined by a concatenation whose second derivative is one pass
  (mtcore/model/row_blocks.py);
- ``clones``: the C loops built for AVX-512 and AVX2 + FMA too, picked at load time
  (mtcore.native.CLONES), not for plain x86-64 only;
- ``attach``: the nets' derivative attached by a small Function instead of
  ``G + T·(s − s.detach())``;
- ``groups``: the per-type nets of se_e2_a and se_e2_r run as one fused Function writing one G,
  instead of one per net joined afterwards;
- ``through``: se_e2_a's contraction takes the nets' derivative in s itself
  (pair_contraction.contract_with_tangent), so the forces and their parameter gradient need no
  [pairs × M] row-dot, product or sum;
- ``tanh``: the nets' forward loop adds the bias and takes tanh itself
  (tangent_embedding.TANH_IN_LOOP) instead of torch's addmm (a bias copy per row) and sigmoid
  pass;
- ``env``: the environment rows and their derivative from one C loop, the backward a second
  one (mtcore/model/env_kernel.py) instead of a dozen torch operations and their backward;
- ``blocks``: the fitting nets take their type's atoms as blocks of rows where a frame's atoms
  are sorted by type (fitting_net.TypeFittingNet._by_blocks) instead of gathering them and
  putting their outputs back;
- ``tiles`` (= all of them): the embedding nets' parameter backward runs each net's rows in
  tiles of tangent_embedding.TILE_BYTES of the widest layer per thread through all its layers, so the layers'
  gradients stay in cache between the element-wise pass and the matrix products, instead of
  every layer over all rows: what mtcore does now.

Before timing, the parameter gradients of one batch are computed under each variant and compared
(largest difference relative to the largest gradient entry, per parameter), so a speed-up that
changed the numbers would show. The variants alternate step by step (order reversed every other
round), so slow spells of a shared machine fall on all of them; the median per variant and its
ratio to ``before`` are printed.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("before", "inputs", "nets", "loops", "join", "clones", "attach", "groups", "through", "tanh", "env", "blocks", "tiles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="water/se_e2_a")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--precision", default=None, help="set descriptor and fitting precision")
    parser.add_argument("--head", default=None, help="time this head's steps only (multi-task inputs)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    from mtcore import native
    from mtcore.model import env, pair_contraction, row_blocks, tangent_embedding
    from mtcore.model.fitting_net import TypeFittingNet
    from mtcore.runtime import tune_allocator
    from mtcore.train.trainer import labels_on
    from alternating import alternate, example_trainer, print_table

    tune_allocator()
    variants = [v for v in args.variants.split(",") if v]
    print(f"fused embedding path: {tangent_embedding.status()}; pair contraction: {pair_contraction.status()}")
    backward, embed, contract = torch.Tensor.backward, tangent_embedding.embed, pair_contraction.contract
    embed_groups = tangent_embedding.embed_groups
    takes_tangent = pair_contraction.takes_tangent
    join = row_blocks.join_rows
    env_in_c = env._rows_in_c
    tile_bytes = tangent_embedding.TILE_BYTES
    type_blocks = TypeFittingNet._type_blocks

    def without_clones(module, stem: str):
        path, why = native.cached_library(stem, module.SOURCE, [*module.FLAGS, *native.NO_CLONES])
        return native.load_library(path, module.SIGNATURES)[0] if path else None

    libraries = {"clones": (tangent_embedding.KERNELS.load(), pair_contraction.KERNELS.load()),
                 "sse2": (without_clones(tangent_embedding, "embedding_tangent"),
                          without_clones(pair_contraction, "pair_contraction"))}

    def whole_graph_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        return backward(self, gradient, retain_graph, create_graph)

    attach = tangent_embedding._WithTangent

    class Addcmul:
        @staticmethod
        def apply(value, tangent, x):
            return torch.addcmul(value, tangent, x - x.detach())

    def use(variant: str) -> None:
        on = set(VARIANTS[1: VARIANTS.index(variant) + 1])  # this variant's change and all before it
        torch.Tensor.backward = backward if "inputs" in on else whole_graph_backward
        tangent_embedding.embed = embed if "nets" in on else (lambda net, x: None)
        tangent_embedding.embed_groups = embed_groups if "groups" in on else (lambda nets, x, bounds: None)
        pair_contraction.contract = contract if "loops" in on else (lambda *args: None)
        pair_contraction.takes_tangent = takes_tangent if "through" in on else (lambda rows: False)
        tangent_embedding.TANH_IN_LOOP = "tanh" in on
        row_blocks.join_rows = join if "join" in on else (lambda parts: torch.cat(parts, dim=0))
        tangent_embedding.KERNELS.library, pair_contraction.KERNELS.library = libraries["clones" if "clones" in on else "sse2"]
        tangent_embedding._WithTangent = attach if "attach" in on else Addcmul
        env._rows_in_c = env_in_c if "env" in on else (lambda *args: None)
        tangent_embedding.TILE_BYTES = tile_bytes if "tiles" in on else 1 << 50
        TypeFittingNet._type_blocks = type_blocks if "blocks" in on else (lambda self, atype: None)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = example_trainer(args.case, args.precision, Path(tmp))

        def gradients(variant: str, head: str, batch) -> list[torch.Tensor]:
            use(variant)
            runtime = trainer.heads[head]
            params = [p for g in runtime.optimizer.param_groups for p in g["params"] if p.requires_grad]
            trainer.model.zero_grad(set_to_none=True)
            with tangent_embedding.force_training(runtime.loss.needs_force() or runtime.loss.needs_virial()):
                pred = trainer._predict(head, batch, create_graph=True)
            loss, _ = runtime.loss(pred, labels_on(batch, trainer.device), batch.find, batch.atype.to(trainer.device), 1.0)
            loss.backward(inputs=params)
            grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            trainer.model.zero_grad(set_to_none=True)
            return grads

        head = args.head or trainer.draw_head()
        batch = trainer.heads[head].train.sample(trainer.rng)
        reference = gradients(variants[0], head, batch)
        for variant in variants[1:]:
            worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
                        for a, b in zip(reference, gradients(variant, head, batch)))
            print(f"{variant}: parameter gradients of one batch differ from {variants[0]}'s by at most {worst:.1e} (relative)")

        times = alternate(trainer, variants, use, args.rounds, args.head)
        use(VARIANTS[-1])
    print_table(f"{args.case}{' head ' + args.head if args.head else ''} ({args.precision or 'as in the input'}, {torch.get_num_threads()} thread(s), {args.rounds} rounds)", times)


if __name__ == "__main__":
    main()
