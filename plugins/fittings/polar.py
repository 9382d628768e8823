"""polar: per-atom polarizability tensors that rotate as R·α·Rᵀ.

For an atom i of a selected type t, with the net output f_i and the descriptor's rotation
matrix Q_i ∈ R^{M×3}:

    fit_diag:  B_i = diag(f_i)                    (f_i ∈ R^M)
    otherwise: B_i = K_i + K_iᵀ, K_i = f_i as M×M  (f_i ∈ R^{M²})
    α_i = s_t · Q_iᵀ B_i Q_i + c_t · I_3   (row-major 9 values);  α_i = 0 for other types
    global polarizability = Σ_i α_i

s_t is ``scale`` and c_t the diagonal shift, both indexed by **type index** (spec D9; v2
indexed them by position in ``sel_type`` without a type embedding, which only agrees when
sel_type = [0, 1, …]). With ``shift_diag``, c_t comes from the head's statistics frames, every
frame (D10), by least squares over 9-vectors x_t:

    atomic label, per frame and selected type t:  n_t · x_t = Σ_{i of type t} α*_i
    global label only, per frame:                 Σ_t n_t · x_t = α*
    c_t = mean(diag(x_t as 3×3))          (lstsq with rcond 1e-3, as v2)
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Union

import numpy as np
import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingContext, FittingRegistration, SchemaContext, hookimpl
from mtcore.model.fitting import OutputDef, TestQuantity
from mtcore_builtins.fittings.tensor_common import TensorFitting, check_rot_mat, common_arguments

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Atomic polarizabilities s·QᵀBQ + c·I (B from the net, Q the descriptor's rotation matrix), summed per frame."

#: As for dipole heads: v2 has no usable default loss (spec D6); mtcore weights both labels 1.
DEFAULT_LOSS = {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0}
GLOBAL, ATOMIC = "polarizability", "atomic_polarizability"
TENSOR_COLUMNS = tuple(a + b for a in "xyz" for b in "xyz")


def per_type_scale(scale: Union[float, int, List[float]], sel_types: List[int], ntypes: int, head: str) -> List[float]:
    """``scale`` as one value per type index.

    A number applies to every type; a list of ``ntypes`` values is read by type index; a shorter
    list of ``len(sel_type)`` values is read in sel_type order (what v2 did)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return [float(scale)] * ntypes
    values = [float(v) for v in scale]
    if len(values) == ntypes:
        return values
    if len(values) == len(sel_types):
        out = [1.0] * ntypes
        for t, v in zip(sel_types, values):
            out[t] = v
        return out
    raise MtcoreError(
        f"fitting net '{head}': scale has {len(values)} values; give one number, {ntypes} (one per type "
        f"index) or {len(sel_types)} (one per sel_type entry)"
    )


class PolarFitting(TensorFitting):
    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        dim_rot: int,
        dim_type_embedding: int,
        head: str,
        layers,
        fit_diag: bool = True,
        scale: Union[float, List[float]] = 1.0,
        shift_diag: bool = True,
        **kwargs,
    ):
        n_out = dim_rot if fit_diag else dim_rot * dim_rot
        super().__init__(ntypes, dim_descrpt, dim_type_embedding, n_out, head, layers, **kwargs)
        self.dim_rot = dim_rot
        self.fit_diag = bool(fit_diag)
        self.shift_diag = bool(shift_diag)
        scales = per_type_scale(scale, self.sel_types, ntypes, head)
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float64))
        self.register_buffer("constant_matrix", torch.zeros(ntypes, dtype=torch.float64))

    def output_def(self) -> OutputDef:
        return OutputDef("polarizability", 9, GLOBAL, ATOMIC, sel_types=tuple(self.sel_types))

    def stat_requirements(self) -> list[DataRequirement]:
        if not self.shift_diag:
            return []
        return [DataRequirement(GLOBAL, 9), DataRequirement(ATOMIC, 9, atomic=True, sel_types=tuple(self.sel_types))]

    def test_quantities(self) -> list[TestQuantity]:
        return [
            TestQuantity("Polarizability", GLOBAL, per_atom=True, detail="", columns=TENSOR_COLUMNS),
            TestQuantity("Atomic polarizability", ATOMIC, atomic=True, detail="atomic", columns=TENSOR_COLUMNS),
        ]

    def shift_equations(self, samples: list) -> tuple[np.ndarray, np.ndarray]:
        """The least-squares rows (counts per type index) and right-hand sides (9-vectors)."""
        rows, rhs = [], []
        for s in samples:
            atype = s.atype.reshape(s.nframes, s.natoms).numpy()
            if s.find.get(ATOMIC, 0.0) > 0.5:
                label = s.labels[ATOMIC].reshape(s.nframes, s.natoms, 9).numpy()
                for b in range(s.nframes):
                    for t in self.sel_types:
                        mask = atype[b] == t
                        if mask.any():
                            row = np.zeros(self.ntypes)
                            row[t] = mask.sum()
                            rows.append(row)
                            rhs.append(label[b, mask].sum(0))
            elif s.find.get(GLOBAL, 0.0) > 0.5:
                label = s.labels[GLOBAL].reshape(s.nframes, 9).numpy()
                for b in range(s.nframes):
                    row = np.zeros(self.ntypes)
                    for t in self.sel_types:
                        row[t] = np.sum(atype[b] == t)
                    rows.append(row)
                    rhs.append(label[b])
        if not rows:
            return np.zeros((0, self.ntypes)), np.zeros((0, 9))
        return np.stack(rows), np.stack(rhs)

    @torch.jit.unused
    def compute_output_stats(self, samples: list) -> None:
        if not self.shift_diag:
            return
        matrix, bias = self.shift_equations(samples)
        if matrix.shape[0] == 0:
            warnings.warn("no polarizability data in the statistics frames: the diagonal shift stays 0", stacklevel=2)
            return
        solution = np.linalg.lstsq(matrix, bias, rcond=1e-3)[0]  # [ntypes, 9]
        shift = np.zeros(self.ntypes)
        for t in self.sel_types:
            shift[t] = np.mean(np.diagonal(solution[t].reshape(3, 3)))
        self.constant_matrix.copy_(torch.as_tensor(shift, dtype=torch.float64))

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        f = self._fit(descriptor, atype)
        rot = self._rot_mat(descriptor)  # [n, M, 3]
        n = rot.shape[0]
        if self.fit_diag:
            inner = rot * f.unsqueeze(2)  # diag(f) Q
        else:
            k = f.reshape(n, self.dim_rot, self.dim_rot)
            inner = torch.bmm(k + k.transpose(1, 2), rot)
        alpha = torch.bmm(rot.transpose(1, 2), inner).to(torch.float64)  # Qᵀ B Q, [n, 3, 3]
        selected = self.sel_mask.index_select(0, atype).to(torch.float64)
        shift = (self.constant_matrix.index_select(0, atype) * selected).view(n, 1, 1)
        eye = torch.eye(3, dtype=torch.float64, device=alpha.device).unsqueeze(0)
        alpha = alpha * self.scale.index_select(0, atype).view(n, 1, 1) + shift * eye
        return alpha.reshape(n, 9)


def arguments(ctx: SchemaContext) -> list[Argument]:
    return common_arguments("pol_type") + [
        Argument("fit_diag", bool, optional=True, default=True, doc="the net gives only the diagonal of B"),
        Argument(
            "scale",
            [list, float, int],
            optional=True,
            default=1.0,
            doc="output multiplier: one number, or one per type index (or per sel_type entry, v2 style)",
        ),
        Argument("shift_diag", bool, optional=True, default=True, doc="add a per-type diagonal shift fitted to the data"),
    ]


def build(params: dict, ctx: FittingContext) -> PolarFitting:
    dim_rot = check_rot_mat(ctx, "polar")
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return PolarFitting(
        ntypes=ctx.ntypes,
        dim_descrpt=ctx.descriptor.get_dim_out(),
        dim_rot=dim_rot,
        dim_type_embedding=ctx.descriptor.get_dim_type_embedding(),
        head=ctx.head,
        layers=ctx.layers,
        **kwargs,
    )


@hookimpl
def mtcore_fittings() -> list[FittingRegistration]:
    return [FittingRegistration(name="polar", arguments=arguments, build=build, default_loss=dict(DEFAULT_LOSS), doc=DOC)]
