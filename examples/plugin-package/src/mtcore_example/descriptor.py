"""gauss_radial: a smooth radial-basis descriptor, the simplest useful mtcore descriptor.

For a centre atom i and each neighbour type t, the environment is expanded in K Gaussians of the
distance, each multiplied by mtcore's C² switch sw(r) (1 below ``rcut_smth``, 0 at ``rcut``):

    D_i[t, k] = Σ_{j of type t, r_ij < rcut} exp(-((r_ij - μ_k) / w)²) · sw(r_ij)

with centres μ_k evenly spaced on [``r_min``, ``rcut``] and width w (``width``, or the spacing of
the centres when null). D_i has ntypes·K features and no trainable weights: the fitting nets
learn everything. It is invariant to rotation, translation and permutation by construction, and
smooth at rcut because sw and its first two derivatives vanish there.

With ``normalize`` (default) the features are shifted and scaled per centre type by their mean
and standard deviation over the training frames of every head (``compute_input_stats``); the
statistics are buffers, so checkpoints and frozen models keep them.

Cost: one pass over the neighbour pairs (index_add into [atoms·ntypes, K]), linear in atoms.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from dargs import Argument

from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorContext, DescriptorRegistration, SchemaContext, hookimpl
from mtcore.model.descriptor import Descriptor, StatSample
from mtcore.model.env import smooth_weight
from mtcore.model.mlp import dtype_of

#: The plugin API this module was written for (see docs/plugins.md, "Publishing").
MTCORE_PLUGIN_API = 2

NAME = "gauss_radial"
DOC = "Gaussian radial basis per neighbour type times a smooth cut-off, summed per centre atom (no weights)."
#: a feature whose spread over the training frames is below this is only shifted, not scaled
MIN_STD = 1e-2


class GaussRadial(Descriptor):
    def __init__(
        self,
        ntypes: int,
        rcut: float = 5.0,
        rcut_smth: float = 0.5,
        n_basis: int = 8,
        r_min: float = 0.5,
        width: Optional[float] = None,
        normalize: bool = True,
        precision: str = "default",
    ):
        super().__init__()
        where = f"model/descriptor[{NAME}]"
        if not 0.0 <= rcut_smth < rcut:
            raise MtcoreError(f"{where}/rcut_smth: must be in [0, rcut), got {rcut_smth} with rcut {rcut}")
        if n_basis < 1:
            raise MtcoreError(f"{where}/n_basis: must be at least 1, got {n_basis}")
        if not 0.0 <= r_min < rcut:
            raise MtcoreError(f"{where}/r_min: must be in [0, rcut), got {r_min}")
        spacing = (rcut - r_min) / max(n_basis - 1, 1)
        width = spacing if width is None else float(width)
        if width <= 0.0:
            raise MtcoreError(f"{where}/width: must be positive, got {width}")
        self.ntypes = int(ntypes)
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        self.n_basis = int(n_basis)
        self.inv_width = 1.0 / width
        self.normalize = bool(normalize)
        self.dtype = dtype_of(precision)
        dim = self.ntypes * self.n_basis
        self.register_buffer("centers", torch.linspace(r_min, rcut, n_basis, dtype=torch.float64).to(self.dtype))
        self.register_buffer("davg", torch.zeros(self.ntypes, dim, dtype=self.dtype))
        self.register_buffer("dstd", torch.ones(self.ntypes, dim, dtype=self.dtype))

    def get_rcut(self) -> float:
        return self.rcut

    def get_ntypes(self) -> int:
        return self.ntypes

    def get_dim_out(self) -> int:
        return self.ntypes * self.n_basis

    def get_dim_rot(self) -> int:
        return 0

    def _raw(
        self, coord: torch.Tensor, atype: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, shift: torch.Tensor
    ) -> torch.Tensor:
        """Un-normalised features [n, ntypes·K]; pairs beyond rcut or with a virtual atom drop out."""
        natoms = coord.shape[0]
        rij = coord.index_select(0, neighbor) - coord.index_select(0, center) + shift
        r = torch.linalg.vector_norm(rij, dim=1)
        tj = atype.index_select(0, neighbor)
        ti = atype.index_select(0, center)
        keep = torch.nonzero((r < self.rcut) & (tj >= 0) & (ti >= 0)).squeeze(1)
        r = r.index_select(0, keep).to(self.dtype)
        c = center.index_select(0, keep)
        t = tj.index_select(0, keep)
        sw = smooth_weight(r, self.rcut_smth, self.rcut)
        x = (r.unsqueeze(1) - self.centers.unsqueeze(0)) * self.inv_width
        values = torch.exp(-x * x) * sw.unsqueeze(1)  # [P, K]
        out = torch.zeros(natoms * self.ntypes, self.n_basis, dtype=self.dtype, device=coord.device)
        out = out.index_add(0, c * self.ntypes + t, values)
        return out.view(natoms, self.ntypes * self.n_basis)

    @torch.jit.unused
    def compute_input_stats(self, samples: List[StatSample]) -> None:
        """Mean and std of every feature per centre type, over the atoms of all samples."""
        if not self.normalize:
            return
        dim = self.get_dim_out()
        count = torch.zeros(self.ntypes, dtype=torch.float64)
        total = torch.zeros(self.ntypes, dim, dtype=torch.float64)
        square = torch.zeros(self.ntypes, dim, dtype=torch.float64)
        with torch.no_grad():
            for s in samples:
                raw = self._raw(s.coord, s.atype, s.center, s.neighbor, s.shift).to(torch.float64)
                real = (s.atype >= 0) & (s.atype < self.ntypes)
                types, raw = s.atype[real], raw[real]
                count += torch.bincount(types, minlength=self.ntypes).to(torch.float64)
                total.index_add_(0, types, raw)
                square.index_add_(0, types, raw * raw)
        seen = count > 0
        safe = torch.where(seen, count, torch.ones_like(count)).unsqueeze(1)
        mean = total / safe
        std = torch.sqrt((square / safe - mean * mean).clamp_min(0.0))
        std = torch.where(std < MIN_STD, torch.ones_like(std), std)
        mean = torch.where(seen.unsqueeze(1), mean, torch.zeros_like(mean))
        std = torch.where(seen.unsqueeze(1), std, torch.ones_like(std))
        self.davg.copy_(mean.to(self.dtype))
        self.dstd.copy_(std.to(self.dtype))

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        shift: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        raw = self._raw(coord, atype, center, neighbor, shift)
        if self.normalize:
            ti = atype.clamp_min(0)
            raw = (raw - self.davg.index_select(0, ti)) / self.dstd.index_select(0, ti)
        return {"descriptor": raw}


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("rcut", float, optional=True, default=5.0, doc="cut-off radius (Å)"),
        Argument("rcut_smth", float, optional=True, default=0.5, doc="where the smooth switch to 0 at rcut starts (Å)"),
        Argument("n_basis", int, optional=True, default=8, doc="Gaussians per neighbour type"),
        Argument("r_min", float, optional=True, default=0.5, doc="first Gaussian centre (Å); the last is at rcut"),
        Argument("width", [float, None], optional=True, default=None,
                 doc="Gaussian width (Å); null: the spacing of the centres"),
        Argument("normalize", bool, optional=True, default=True,
                 doc="shift and scale features per centre type by their training-frame mean and std"),
        Argument("precision", str, optional=True, default="default", doc="float64 (default), float32"),
    ]


def build(params: dict, ctx: DescriptorContext) -> GaussRadial:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return GaussRadial(ntypes=ctx.ntypes, **kwargs)


REGISTRATION = DescriptorRegistration(name=NAME, arguments=arguments, build=build, doc=DOC)


@hookimpl
def mtcore_descriptors() -> list[DescriptorRegistration]:
    return [REGISTRATION]
