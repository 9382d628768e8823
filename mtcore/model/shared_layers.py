"""The shared-layer manager: ``layer_name`` in fitting nets, for any fitting plugin.

``layer_name`` is a list with one entry per hidden layer and one for the output layer. Entries
with the same name, in one head or in several, are the very same :class:`~mtcore.model.mlp.Dense`
module: one tensor, updated once per step by whichever head trains, stored once in a checkpoint.
``null`` keeps a layer private. Sharing is per atom type for per-type networks (the type-0 nets of
two heads share, types never share with each other), as in DeePMD-kit v2.

Layers are stored under a key: ``<name>/type_<t>`` for type t's net of a per-type head, ``<name>``
for the one net of a head whose descriptor provides a type embedding. Fittings do not build keys
themselves: :class:`mtcore.model.fitting_net.TypeFittingNet` applies this rule for every head
(built-in or plugin), so equal names mean the same tensors whoever wrote the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.model.mlp import Block, Dense


@dataclass
class _Owner:
    head: str
    index: int
    shape: tuple[int, int]
    dtype: torch.dtype
    activation: str


@dataclass
class SharedLayerManager:
    """Hands out layers; equal names give the same module, shapes are checked."""

    layers: dict[str, Dense] = field(default_factory=dict)
    owners: dict[str, _Owner] = field(default_factory=dict)
    users: dict[str, list[str]] = field(default_factory=dict)
    #: key -> (first head that set it, its trainable flag)
    trainable: dict[str, tuple[str, bool]] = field(default_factory=dict)

    @staticmethod
    def check_layer_name(layer_name: Optional[list], neuron: list[int], head: str) -> Optional[list]:
        """Validate a head's ``layer_name`` list (length len(neuron)+1, names or nulls)."""
        if layer_name is None:
            return None
        if not isinstance(layer_name, list):
            raise MtcoreError(f"fitting net '{head}': layer_name must be a list of names or nulls")
        if len(layer_name) != len(neuron) + 1:
            raise MtcoreError(
                f"fitting net '{head}': layer_name has {len(layer_name)} entries; expected "
                f"len(neuron)+1 = {len(neuron) + 1} (one per hidden layer, then the output layer)"
            )
        for entry in layer_name:
            if entry is not None and not isinstance(entry, str):
                raise MtcoreError(f"fitting net '{head}': layer_name entries must be strings or null, got {entry!r}")
            if entry is not None and (not entry.strip() or "/" in entry):
                raise MtcoreError(f"fitting net '{head}': layer_name entry {entry!r} must be a non-empty name without '/' (or null)")
        return layer_name

    def dense(
        self,
        head: str,
        index: int,
        name: Optional[str],
        type_suffix: str,
        n_in: int,
        n_out: int,
        activation: str,
        dtype: torch.dtype,
        generator: torch.Generator,
    ) -> Dense:
        """The layer ``index`` of ``head``: new if ``name`` is None, else shared under ``name``."""
        if name is None:
            return Dense(n_in, n_out, activation, dtype, generator)
        key = f"{name}{type_suffix}"
        existing = self.layers.get(key)
        if existing is None:
            layer = Dense(n_in, n_out, activation, dtype, generator)
            self.layers[key] = layer
            self.owners[key] = _Owner(head, index, (n_in, n_out), dtype, activation)
            self.users[key] = [head]
            return layer
        owner = self.owners[key]
        if owner.shape != (n_in, n_out):
            raise MtcoreError(
                f"shared layer '{name}': head '{owner.head}' layer {owner.index} has shape "
                f"{owner.shape[0]}x{owner.shape[1]} but head '{head}' layer {index} has shape {n_in}x{n_out}"
            )
        if owner.dtype != dtype:
            raise MtcoreError(
                f"shared layer '{name}': head '{owner.head}' uses precision {str(owner.dtype).replace('torch.', '')} "
                f"but head '{head}' uses {str(dtype).replace('torch.', '')}"
            )
        if _activation_kind(owner.activation) != _activation_kind(activation):
            raise MtcoreError(
                f"shared layer '{name}': head '{owner.head}' layer {owner.index} uses activation_function "
                f"'{owner.activation}' but head '{head}' layer {index} uses '{activation}'; a shared layer computes "
                "one function (use the same activation_function or different layer names)"
            )
        if head not in self.users[key]:
            self.users[key].append(head)
        return existing

    def set_trainable(self, layer: Dense, head: str, index: int, flag: bool) -> None:
        """Record a head's ``trainable`` flag for a layer; a shared layer trained by one head and
        frozen by another is refused (one tensor cannot be both), naming both heads."""
        key = next((k for k, known in self.layers.items() if known is layer), None)
        if key is None:
            return
        first = self.trainable.setdefault(key, (head, flag))
        if first[1] != flag:
            trains, freezes = (first[0], head) if first[1] else (head, first[0])
            raise MtcoreError(
                f"shared layer '{key.split('/', 1)[0]}': head '{trains}' trains it but head '{freezes}' freezes it "
                f"(trainable, layer {index}); give both heads the same trainable flag or different layer names"
            )

    def check_usage(self, heads: dict[str, nn.Module]) -> None:
        """After every head is built: each shared layer must be applied the same way in every head
        that uses it. The resnet timestep (``resnet_dt``) multiplies a layer's output in some
        positions; a layer scaled by it in one head and not in another would compute two different
        functions with one set of weights, so that is refused naming both heads."""
        keys = {id(layer): key for key, layer in self.layers.items()}
        seen: dict[str, tuple[str, bool]] = {}
        for head, module in heads.items():
            for block in module.modules():
                if not isinstance(block, Block) or id(block.dense) not in keys:
                    continue
                key = keys[id(block.dense)]
                uses = bool(block.use_timestep and block.dense.idt is not None)
                first = seen.setdefault(key, (head, uses))
                if first[1] != uses:
                    name = key.split("/", 1)[0]
                    with_dt, without = (first[0], head) if first[1] else (head, first[0])
                    raise MtcoreError(
                        f"shared layer '{name}': head '{with_dt}' scales it by a resnet timestep (resnet_dt) but head "
                        f"'{without}' does not; give both heads the same resnet_dt (and layer widths) or different layer names"
                    )

    def module_dict(self) -> nn.ModuleDict:
        """The shared layers as one ModuleDict (keys with '/' replaced), for the model to own."""
        return nn.ModuleDict({key.replace("/", "__").replace(".", "_"): layer for key, layer in self.layers.items()})


def _activation_kind(name: str) -> str:
    """Names that mean the same function (none/None/linear; gelu/gelu_tf) compare equal."""
    return {"None": "none", "linear": "none", "gelu_tf": "gelu"}.get(name, name)
