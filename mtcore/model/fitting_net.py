"""The per-type fitting MLP every fitting head uses, built-in or from a plugin.

:class:`TypeFittingNet` maps per-atom inputs x_i [n_in] to outputs [n_out] with one
:class:`~mtcore.model.mlp.FittingMLP` per atom type (or one for all types when the descriptor
provides a type embedding, which the caller appends to x: ``mixed_types=True``). It owns what
makes two heads' layers *the same* layers: ``layer_name`` validation and lookup in the model's
:class:`~mtcore.model.shared_layers.SharedLayerManager` (``ctx.layers``) under the key rule

    per-type nets:  ``<name>/type_<t>``  (type t's net; types never share with each other)
    mixed types:    ``<name>``           (the one net)

so equal ``layer_name`` entries mean the very same tensors whoever wrote the head. It also owns
the per-layer ``trainable`` flags, the seed (one private generator, layers drawn in net order
then layer order) and the precision.

It is an ``nn.ModuleList`` of the nets (one per type that has a net, in type order) so that a
fitting holding it as ``self.nets`` has the state-dict keys built-in heads always had
(``nets.<k>.blocks.<i>.dense.weight``): old checkpoints load unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from dargs import Argument
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.model.mlp import Dense, FittingMLP, dtype_of, new_generator
from mtcore.model.shared_layers import SharedLayerManager


def type_suffix(type_index: Optional[int]) -> str:
    """The shared-layer key suffix of a net: ``/type_<t>`` for type t's net, ``""`` for a mixed-types net."""
    return "" if type_index is None else f"/type_{type_index}"


def trainable_flags(trainable: Union[bool, Sequence[bool]], nlayers: int, head: str) -> List[bool]:
    """``trainable`` as one flag per layer (len(neuron) hidden layers, then the output layer)."""
    if isinstance(trainable, bool):
        return [trainable] * (nlayers + 1)
    if not isinstance(trainable, (list, tuple)):
        raise MtcoreError(f"fitting net '{head}': trainable must be a bool or a list of bools, got {trainable!r}")
    if len(trainable) != nlayers + 1:
        raise MtcoreError(f"fitting net '{head}': trainable has {len(trainable)} entries; expected len(neuron)+1")
    return [bool(v) for v in trainable]


def _check_neuron(neuron, head: str) -> List[int]:
    if not isinstance(neuron, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in neuron):
        raise MtcoreError(f"fitting net '{head}': neuron must be a list of positive integers, got {neuron!r}")
    return [int(v) for v in neuron]


class TypeFittingNet(nn.ModuleList):
    """x [n, n_in], atype [n] → [n, n_out] in ``self.dtype``; one MLP per type (or one for all).

    ``sel_types`` (extension of the agreed interface, default all types): the types that get a net;
    rows of other types are zero. Tensor heads use it so that only the types that carry the
    tensor own parameters (as DeePMD-kit v2).
    """

    def __init__(
        self,
        *,
        head: str,
        layers: Optional[SharedLayerManager],
        ntypes: int,
        n_in: int,
        n_out: int,
        neuron: Sequence[int],
        activation_function: str = "tanh",
        precision: str = "default",
        resnet_dt: bool = True,
        layer_name: Optional[list] = None,
        trainable: Union[bool, Sequence[bool]] = True,
        seed: Optional[int] = None,
        mixed_types: bool = False,
        sel_types: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        neuron = _check_neuron(neuron, head)
        if int(ntypes) < 1:
            raise MtcoreError(f"fitting net '{head}': needs at least one atom type, got ntypes={ntypes}")
        selected = list(range(ntypes)) if sel_types is None else sorted({int(t) for t in sel_types})
        if not selected or not all(0 <= t < ntypes for t in selected):
            raise MtcoreError(f"fitting net '{head}': sel_types {list(sel_types or [])} must be type indices in 0..{ntypes - 1}")
        self.head = head
        self.ntypes = int(ntypes)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.neuron = neuron
        self.dtype = dtype_of(precision)
        self.mixed_types = bool(mixed_types)
        self.sel_types = selected
        self.all_types = len(selected) == self.ntypes
        #: the type each net serves (-1: the one mixed-types net)
        self.net_types = [-1] if self.mixed_types else list(selected)
        names = SharedLayerManager.check_layer_name(layer_name, neuron, head)
        if layers is None:
            # standalone use (a test, a script): private layers only
            if names and any(n is not None for n in names):
                raise MtcoreError(f"fitting net '{head}': layer_name needs the model's shared-layer manager (ctx.layers)")
            layers = SharedLayerManager()
        flags = trainable_flags(trainable, len(neuron), head)
        gen = new_generator(seed)
        for t in self.net_types:
            suffix = type_suffix(None if t < 0 else t)

            def factory(index: int, width: int, n_layer_out: int, activation: Optional[str], suffix: str = suffix) -> Dense:
                # FittingMLP asks with activation None for hidden layers and "none" for the output layer
                name = names[index] if names else None
                return layers.dense(head, index, name, suffix, width, n_layer_out, activation or activation_function,
                                    self.dtype, gen)

            self.append(FittingMLP(self.n_in, neuron, self.n_out, resnet_dt, gen, factory))
        for net in self:
            for index, (block, flag) in enumerate(zip(net.blocks, flags)):
                layers.set_trainable(block.dense, head, index, flag)
                for p in block.parameters():
                    p.requires_grad_(flag)

    def forward(self, x: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.mixed_types and self.all_types:
            return self[0](x)
        sizes = self._type_blocks(atype)
        if sizes is not None:
            return self._by_blocks(x, sizes)
        return self._by_gathers(x, atype)

    def _type_blocks(self, atype: torch.Tensor) -> Optional[List[int]]:
        """The number of atoms of each type where the atoms are sorted by type and every type
        has a net (one frame of a set written that way, as the water data), else None."""
        if self.mixed_types or not self.all_types or atype.numel() == 0 or bool(atype[0] < 0):
            return None
        if not bool((atype[1:] >= atype[:-1]).all()):
            return None
        sizes = torch.bincount(atype, minlength=self.ntypes)
        if sizes.numel() != self.ntypes:
            return None
        rows: List[int] = sizes.tolist()
        return rows

    def _by_blocks(self, x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Each net takes its block of rows as a view and the outputs are joined, so neither the
        forward nor any order of backward copies rows out or scatters them back into zeros
        (:meth:`_by_gathers` does; one training step of water se_e2_a 0.975 in
        benchmarks/ab_step.py ``blocks``)."""
        blocks = x.split(sizes)
        outs: List[torch.Tensor] = []
        for k, net in enumerate(self):
            outs.append(net(blocks[k]))
        return torch.cat(outs)

    def _by_gathers(self, x: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """Atoms in any order: each net on its type's rows, gathered, its outputs put back
        (rows of types without a net stay zero)."""
        out = torch.zeros(x.shape[0], self.n_out, dtype=self.dtype, device=x.device)
        for k, net in enumerate(self):
            t = self.net_types[k]
            if t < 0:
                rows = torch.zeros_like(atype, dtype=torch.bool)
                for s in self.sel_types:
                    rows = rows | (atype == s)
            else:
                rows = atype == t
            idx = torch.nonzero(rows).squeeze(1)
            if idx.numel() > 0:
                out = out.index_put((idx,), net(x.index_select(0, idx)))
        return out

    @staticmethod
    def arguments(neuron_default: Optional[List[int]] = None) -> List[Argument]:
        """The schema keys this helper reads, for a fitting's ``arguments`` hook."""
        return [
            Argument("neuron", list, optional=True, default=list(neuron_default or [120, 120, 120]), alias=["n_neuron"],
                     doc="hidden layer widths; a layer as wide as the one before is residual"),
            Argument("activation_function", str, optional=True, default="tanh", doc="activation of the hidden layers"),
            Argument("precision", str, optional=True, default="default", doc="float64 (default), float32, ..."),
            Argument("resnet_dt", bool, optional=True, default=True, doc="trainable timestep on residual layers"),
            Argument("trainable", [list, bool], optional=True, default=True,
                     doc="bool, or one bool per layer (len(neuron)+1: hidden layers, then the output layer)"),
            Argument("seed", [int, None], optional=True, default=None, doc="seed of the initial weights"),
            Argument(
                "layer_name",
                [list, None],
                optional=True,
                default=None,
                doc="len(neuron)+1 names or nulls; equal names share one layer (the same tensors) across "
                "heads of any fitting type, per atom type without a type embedding",
            ),
        ]
