"""property: a per-frame property (a band gap, a formation energy per atom, any task_dim-vector).

For atom i of type t_i the net gives p_i = F_{t_i}(x_i) + b[t_i] ∈ R^{task_dim} (x_i the
descriptor, with the type embedding appended when the descriptor has one: then one net for all
types). The frame value is declared through ``OutputDef.reduction``, so training, statistics,
freeze, ``infer``, ``mtcore test`` and ``mtcore show`` all treat it alike:

    extensive (``intensive: false``):  P = Σ_i p_i               (reduction "sum")
    intensive (``intensive: true``):   P = (1/N) Σ_i p_i         (reduction "mean")

Labels: ``<property_name>.npy`` [nframes, task_dim] in the set folders (DeePMD-kit v3's property
fitting; ``property_name`` is the file stem and the prediction key, ``atom_<property_name>`` the
atomic one). The bias b starts from a least-squares fit of this head's own frame values: on the
per-type atom counts (extensive) or atom fractions (intensive), one row per frame, min-norm, so a
property that is linear in the composition is reproduced exactly before any training.
"""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingContext, FittingRegistration, SchemaContext, hookimpl
from mtcore.model.fitting import Fitting, OutputDef, TestQuantity
from mtcore.model.fitting_net import TypeFittingNet

#: the plugin API this module was written for (mtcore.hookspecs: versions); reductions are v2
MTCORE_PLUGIN_API = 2

DOC = ("A per-frame property of task_dim values: atomic contributions summed (extensive) or averaged "
       "over the atoms (intensive); labels in `property_name`.npy, as DeePMD-kit v3's property fitting.")

#: file stems the loaders read for other purposes: a property must not shadow them
RESERVED_NAMES = ("coord", "box", "type", "fparam", "aparam", "force", "virial")


def check_property_name(name: str, head: str) -> str:
    """A label file stem: letters, digits, ``_``, ``-``, ``.``; not a file the loader reads anyway."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
        raise MtcoreError(f"fitting net '{head}': property_name {name!r} must be a label file stem "
                          "(letters, digits, _ . -)")
    if name in RESERVED_NAMES:
        raise MtcoreError(f"fitting net '{head}': property_name '{name}' is a file the loader reads as "
                          f"{name}.npy already; choose another name")
    return name


def frame_design(samples: list, key: str, ntypes: int, intensive: bool) -> tuple[np.ndarray, np.ndarray]:
    """One row per labelled statistics frame: atom counts per type (or fractions, for an intensive
    property) and the frame's label. Vectorised over the frames of a batch."""
    rows, values = [], []
    for s in samples:
        if s.find.get(key, 0.0) < 0.5 or key not in s.labels:
            continue
        types = s.atype.reshape(s.nframes, s.natoms).to(torch.long)
        counts = torch.zeros(s.nframes, ntypes, dtype=torch.float64).scatter_add_(
            1, types, torch.ones(types.shape, dtype=torch.float64))
        rows.append((counts / s.natoms if intensive else counts).numpy())
        values.append(s.labels[key].reshape(s.nframes, -1).to(torch.float64).numpy())
    if not rows:
        return np.zeros((0, ntypes)), np.zeros((0, 1))
    return np.concatenate(rows), np.concatenate(values)


class PropertyFitting(Fitting):
    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        dim_type_embedding: int,
        head: str,
        layers,
        task_dim: int = 1,
        intensive: bool = False,
        property_name: str = "property",
        neuron: Optional[List[int]] = None,
        activation_function: str = "tanh",
        precision: str = "default",
        resnet_dt: bool = True,
        trainable=True,
        rcond: Optional[float] = None,
        seed: Optional[int] = None,
        layer_name: Optional[list] = None,
    ):
        super().__init__()
        if isinstance(task_dim, bool) or not isinstance(task_dim, int) or task_dim < 1:
            raise MtcoreError(f"fitting net '{head}': task_dim must be a positive integer, got {task_dim!r}")
        self.ntypes = ntypes
        self.task_dim = int(task_dim)
        self.intensive = bool(intensive)
        self.property_name = check_property_name(property_name, head)
        self.rcond = rcond
        self.dim_type_embedding = dim_type_embedding
        self.net = TypeFittingNet(
            head=head, layers=layers, ntypes=ntypes, n_in=dim_descrpt + dim_type_embedding, n_out=self.task_dim,
            neuron=list(neuron or [120, 120, 120]), activation_function=activation_function, precision=precision,
            resnet_dt=resnet_dt, layer_name=layer_name, trainable=trainable, seed=seed,
            mixed_types=dim_type_embedding > 0,
        )
        self.register_buffer("bias", torch.zeros(ntypes, self.task_dim, dtype=torch.float64))

    def output_def(self) -> OutputDef:
        return OutputDef("property", self.task_dim, self.property_name, "atom_" + self.property_name,
                         reduction="mean" if self.intensive else "sum")

    def stat_requirements(self) -> list[DataRequirement]:
        return [DataRequirement(self.property_name, self.task_dim)]

    def test_quantities(self) -> list[TestQuantity]:
        columns = tuple(str(k) for k in range(self.task_dim)) if self.task_dim > 1 else ("p",)
        # extensive: also per atom (as the energy); intensive: the core leaves out the /atom row
        return [TestQuantity(self.property_name.replace("_", " ").capitalize(), self.property_name,
                             per_atom=not self.intensive, detail="property", columns=columns)]

    @torch.jit.unused
    def output_bias(self) -> Optional[torch.Tensor]:
        return self.bias  # [ntypes, task_dim], the buffer the forward pass reads

    @torch.jit.unused
    def compute_output_stats(self, samples: list) -> None:
        design, values = frame_design(samples, self.property_name, self.ntypes, self.intensive)
        if design.shape[0] == 0:
            warnings.warn(f"no {self.property_name} labels in the statistics frames: the property bias stays 0",
                          stacklevel=2)
            return
        if values.shape[1] != self.task_dim:
            raise MtcoreError(f"{self.property_name}.npy: {values.shape[1]} values per frame, task_dim is {self.task_dim}")
        kwargs = {} if self.rcond is None else {"rcond": self.rcond}
        solution = np.linalg.lstsq(design, values, **kwargs)[0]  # min-norm: absent types get 0
        self.bias.copy_(torch.as_tensor(solution, dtype=torch.float64))

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        x = descriptor["descriptor"]
        if self.dim_type_embedding > 0:
            x = torch.cat([x, descriptor["type_embedding"].to(x.dtype)], dim=1)
        out = self.net(x.to(self.net.dtype), atype)
        return out.to(torch.float64) + self.bias.index_select(0, atype)


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("task_dim", int, optional=True, default=1, doc="values per frame (columns of the label file)"),
        Argument("intensive", bool, optional=True, default=False,
                 doc="true: the frame value is the mean of the atomic contributions (a band gap, a per-atom "
                     "quantity); false: their sum (extensive)"),
        Argument("property_name", str, optional=True, default="property",
                 doc="the label file's stem (property.npy in the set folders by default) and the prediction key"),
        Argument("rcond", [float, None], optional=True, default=None, doc="rcond of the bias least squares"),
        *TypeFittingNet.arguments(),
    ]


def build(params: dict, ctx: FittingContext) -> PropertyFitting:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return PropertyFitting(
        ntypes=ctx.ntypes,
        dim_descrpt=ctx.descriptor.get_dim_out(),
        dim_type_embedding=ctx.descriptor.get_dim_type_embedding(),
        head=ctx.head,
        layers=ctx.layers,
        **kwargs,
    )


@hookimpl
def mtcore_fittings() -> list[FittingRegistration]:
    return [FittingRegistration(name="property", arguments=arguments, build=build, default_loss={"type": "property"},
                                doc=DOC)]
