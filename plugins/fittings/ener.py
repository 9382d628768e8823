"""ener: per-atom energy head. E = Σ_i [F_{t_i}(D_i) + bias_atom_e[t_i]]; forces and virials by autograd.

One MLP per atom type (or one for all types with the type embedding appended, when the
descriptor provides one). ``bias_atom_e`` starts from a least-squares fit of the head's own
training energies against the atom counts per type (min-norm, as DeePMD-kit's ``lstsq``).
"""

from __future__ import annotations

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
from mtcore.model.mlp import dtype_of
from mtcore.model.shared_layers import SharedLayerManager

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Atomic energies summed to the frame energy; forces and virials by differentiation."


def least_squares_bias(
    counts: np.ndarray, values: np.ndarray, rcond: Optional[float], fixed: List[Optional[float]]
) -> np.ndarray:
    """Per-type bias b minimising ||counts·b - values|| (min-norm), with some entries fixed.

    counts [nsys, ntypes], values [nsys, k]; fixed[t] not None pins b[t] to that value."""
    counts = counts.astype(np.float64)
    values = values.astype(np.float64).copy()
    free = np.ones(counts.shape[1], dtype=bool)
    for t, value in enumerate(fixed):
        if value is not None:
            values -= counts[:, t : t + 1] * value
            free[t] = False
    design = counts.copy()
    design[:, ~free] = 0.0
    kwargs = {} if rcond is None else {"rcond": rcond}
    solution = np.linalg.lstsq(design, values, **kwargs)[0]
    for t, value in enumerate(fixed):
        if value is not None:
            solution[t] = value
    return solution


def system_means(samples: list, key: str, ntypes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per system: atom counts per type and the mean label over its statistics frames."""
    by_system: Dict[str, list] = {}
    for s in samples:
        if s.find.get(key, 0.0) < 0.5:
            continue
        counts = torch.bincount(s.atype[: s.natoms], minlength=ntypes).numpy()
        entry = by_system.setdefault(s.system, [counts, []])
        entry[1].append(s.labels[key].reshape(s.nframes, -1).numpy())
    if not by_system:
        return np.zeros((0, ntypes)), np.zeros((0, 1))
    counts = np.stack([v[0] for v in by_system.values()])
    means = np.stack([np.concatenate(v[1]).mean(0) for v in by_system.values()])
    return counts, means


class EnerFitting(Fitting):
    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        dim_type_embedding: int,
        head: str,
        layers: SharedLayerManager,
        neuron: Optional[List[int]] = None,
        activation_function: str = "tanh",
        precision: str = "default",
        resnet_dt: bool = True,
        trainable=True,
        rcond: Optional[float] = None,
        seed: Optional[int] = None,
        atom_ener: Optional[list] = None,
        layer_name: Optional[list] = None,
        numb_fparam: int = 0,
        numb_aparam: int = 0,
        use_aparam_as_mask: bool = False,
    ):
        super().__init__()
        neuron = list(neuron or [120, 120, 120])
        if numb_fparam < 0 or numb_aparam < 0:
            raise MtcoreError(f"fitting net '{head}': numb_fparam and numb_aparam must be non-negative")
        if use_aparam_as_mask:
            raise MtcoreError(f"fitting net '{head}': use_aparam_as_mask is not supported yet")
        self.numb_fparam = int(numb_fparam)
        self.numb_aparam = int(numb_aparam)
        self.dim_descrpt = int(dim_descrpt)
        # inputs are normalised by the training data's mean and 1/std (set by compute_output_stats)
        self.register_buffer("fparam_avg", torch.zeros(self.numb_fparam, dtype=torch.float64))
        self.register_buffer("fparam_inv_std", torch.ones(self.numb_fparam, dtype=torch.float64))
        self.register_buffer("aparam_avg", torch.zeros(self.numb_aparam, dtype=torch.float64))
        self.register_buffer("aparam_inv_std", torch.ones(self.numb_aparam, dtype=torch.float64))
        self.ntypes = ntypes
        self.rcond = rcond
        self.dtype = dtype_of(precision)
        self.dim_type_embedding = dim_type_embedding
        n_in = dim_descrpt + self.numb_fparam + self.numb_aparam + dim_type_embedding
        self.nets = TypeFittingNet(
            head=head, layers=layers, ntypes=ntypes, n_in=n_in, n_out=1, neuron=neuron,
            activation_function=activation_function, precision=precision, resnet_dt=resnet_dt,
            layer_name=layer_name, trainable=trainable, seed=seed, mixed_types=dim_type_embedding > 0,
        )
        fixed = list(atom_ener or [])
        if len(fixed) > ntypes:
            raise MtcoreError(f"fitting net '{head}': atom_ener has {len(fixed)} entries for {ntypes} types")
        self.atom_ener: List[Optional[float]] = [None if v is None else float(v) for v in fixed] + [None] * (
            ntypes - len(fixed)
        )
        self.has_atom_ener = any(v is not None for v in self.atom_ener)
        self.register_buffer("atom_ener_mask", torch.tensor([v is not None for v in self.atom_ener]))
        self.register_buffer("bias_atom_e", torch.zeros(ntypes, dtype=torch.float64))

    def output_def(self) -> OutputDef:
        return OutputDef("energy", 1, "energy", "atom_ener", conservative=True)

    def stat_requirements(self) -> list[DataRequirement]:
        return [DataRequirement("energy", 1)]

    def input_requirements(self) -> list[DataRequirement]:
        reqs = []
        if self.numb_fparam > 0:
            reqs.append(DataRequirement("fparam", self.numb_fparam, must=True))
        if self.numb_aparam > 0:
            reqs.append(DataRequirement("aparam", self.numb_aparam, atomic=True, must=True))
        return reqs

    def test_quantities(self) -> list[TestQuantity]:
        return [
            TestQuantity("Energy", "energy", per_atom=True, detail="e", columns=("e",)),
            TestQuantity("Force", "force", atomic=True, detail="f", columns=("fx", "fy", "fz")),
            TestQuantity("Virial", "virial", per_atom=True, periodic_only=True, detail="v",
                         columns=tuple("v" + a + b for a in "xyz" for b in "xyz")),
        ]

    @torch.jit.unused
    def output_bias(self) -> Optional[torch.Tensor]:
        return self.bias_atom_e.view(self.ntypes, 1)  # a view: mtcore change-bias edits it in place

    @torch.jit.unused
    def compute_output_stats(self, samples: list) -> None:
        for key, size, avg, inv_std in (
            ("fparam", self.numb_fparam, self.fparam_avg, self.fparam_inv_std),
            ("aparam", self.numb_aparam, self.aparam_avg, self.aparam_inv_std),
        ):
            if size > 0:
                values = torch.cat([s.labels[key].reshape(-1, size).to(torch.float64) for s in samples])
                std = values.std(0, unbiased=False)
                avg.copy_(values.mean(0))
                # DeePMD-kit's rule: a (nearly) constant parameter is only shifted, not scaled
                inv_std.copy_(torch.where(std < 1e-2, torch.ones_like(std), 1.0 / std))
        counts, means = system_means(samples, "energy", self.ntypes)
        if counts.shape[0] == 0:
            warnings.warn("no energy labels in the statistics frames: bias_atom_e stays 0", stacklevel=2)
            bias = np.array([v if v is not None else 0.0 for v in self.atom_ener])
        else:
            bias = least_squares_bias(counts, means, self.rcond, self.atom_ener)[:, 0]
        self.bias_atom_e.copy_(torch.as_tensor(bias, dtype=torch.float64))

    def _net_input(self, descriptor: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[descriptor, normalised fparam, normalised aparam, type embedding] per atom."""
        parts = [descriptor["descriptor"].to(self.dtype)]
        if self.numb_fparam > 0:
            if "fparam" not in descriptor:
                raise RuntimeError("this model needs frame parameters (fparam, " + str(self.numb_fparam) + " per frame)")
            parts.append(((descriptor["fparam"] - self.fparam_avg) * self.fparam_inv_std).to(self.dtype))
        if self.numb_aparam > 0:
            if "aparam" not in descriptor:
                raise RuntimeError("this model needs atomic parameters (aparam, " + str(self.numb_aparam) + " per atom)")
            parts.append(((descriptor["aparam"] - self.aparam_avg) * self.aparam_inv_std).to(self.dtype))
        if self.dim_type_embedding > 0:
            parts.append(descriptor["type_embedding"].to(self.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _isolated(self, x: torch.Tensor) -> torch.Tensor:
        """The input of an isolated atom: descriptor part zero, parameters and type embedding kept."""
        return torch.cat([torch.zeros_like(x[:, : self.dim_descrpt]), x[:, self.dim_descrpt :]], dim=1)

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        x = self._net_input(descriptor)
        out = self.nets(x, atype)
        if self.has_atom_ener:
            # a type with a fixed vacuum energy: F_t(x) - F_t(isolated x), zero for an isolated atom
            if self.dim_type_embedding > 0:
                mask = self.atom_ener_mask.index_select(0, atype).to(self.dtype).unsqueeze(1)
                out = out - self.nets(self._isolated(x), atype) * mask
            else:
                idx = torch.nonzero(self.atom_ener_mask.index_select(0, atype)).squeeze(1)
                if idx.numel() > 0:
                    vacuum = self.nets(self._isolated(x.index_select(0, idx)), atype.index_select(0, idx))
                    out = out.index_put((idx,), out.index_select(0, idx) - vacuum)
        return out.to(torch.float64) + self.bias_atom_e.index_select(0, atype).unsqueeze(1)


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("numb_fparam", int, optional=True, default=0, doc="frame parameters per frame (fparam.npy), fitting input"),
        Argument("numb_aparam", int, optional=True, default=0, doc="atomic parameters per atom (aparam.npy), fitting input"),
        *TypeFittingNet.arguments(),
        Argument("rcond", [float, None], optional=True, default=None, doc="rcond of the energy-bias least squares"),
        Argument("atom_ener", list, optional=True, default=[], doc="fixed vacuum energy per type (null: free)"),
        Argument("use_aparam_as_mask", bool, optional=True, default=False),
    ]


def build(params: dict, ctx: FittingContext) -> EnerFitting:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return EnerFitting(
        ntypes=ctx.ntypes,
        dim_descrpt=ctx.descriptor.get_dim_out(),
        dim_type_embedding=ctx.descriptor.get_dim_type_embedding(),
        head=ctx.head,
        layers=ctx.layers,
        **kwargs,
    )


@hookimpl
def mtcore_fittings() -> list[FittingRegistration]:
    return [FittingRegistration(name="ener", arguments=arguments, build=build, default_loss={"type": "ener"}, doc=DOC)]
