"""An ASE calculator for mtcore models: ``atoms.calc = MtcoreCalculator("frozen_model.pth")``.

Energy heads give energy, free_energy, forces, stress and per-atom energies; tensor heads give
their frame tensor (``dipole`` [3], ``polarizability`` [3, 3]) and its per-atom form
(``atomic_dipole`` [N, 3], ``atomic_polarizability`` [N, 3, 3]). Units are the model's
(DeePMD-kit data: eV and Å, as ASE expects).

The stress follows ASE's convention, σ = (1/V) ∂E/∂ε: the model's virial is W = −∂E/∂ε
(DeePMD-kit's sign, Σ r⊗F), so σ = −W/V, returned in Voigt order xx, yy, zz, yz, xz, xy.

Ensembles (active learning, as DP-GEN does with LAMMPS): give a list of models; the first one's
energy, forces and stress are the results, and ``calc.results["model_devi"]`` holds
[max, min, avg] of the per-atom force deviation across all of them (DeePMD-kit's definition, see
:mod:`mtcore.model_devi`), also readable as ``atoms.calc.get_property("model_devi")``.

ASE is an optional dependency (``pip install -e ".[ase]"``): importing :mod:`mtcore` never
imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from mtcore.errors import MtcoreError
from mtcore.md.geometry import cell_for, virial_to_stress, wrap_positions
from mtcore.md.parameters import check_parameters

try:
    from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
except ImportError as exc:  # pragma: no cover - exercised only without ase
    raise ImportError("mtcore.calculator needs ASE: pip install 'mtcore[ase]' (or pip install ase)") from exc

ENERGY_PROPERTIES = ["energy", "free_energy", "forces", "stress", "energies"]


class PropertyNotAvailable(MtcoreError, PropertyNotImplementedError):
    """A property this head does not predict: a one-line MtcoreError that ASE code written to
    catch PropertyNotImplementedError still understands."""


def _resolve_device(device: Optional[str]) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class MtcoreCalculator(Calculator):
    """ASE calculator for a frozen mtcore file, a united file (``head=`` required) or a training
    checkpoint; ``model`` may also be an already loaded :class:`mtcore.infer.DeepPotential`, or a
    list of either (an ensemble: the first model's results, plus ``model_devi``).

    fparam ([numb_fparam]) and aparam ([N, numb_aparam]) are passed to heads trained with them;
    change them with ``calc.set(fparam=...)``.
    """

    implemented_properties = list(ENERGY_PROPERTIES)
    default_parameters: dict[str, Any] = {"fparam": None, "aparam": None}

    def __init__(
        self,
        model: Union[str, Path, Any],
        head: Optional[str] = None,
        device: Optional[str] = None,
        fparam: Optional[Any] = None,
        aparam: Optional[Any] = None,
        **kwargs: Any,
    ):
        from mtcore.model_devi import load_models

        members = list(model) if isinstance(model, (list, tuple)) else [model]
        if not members:
            raise MtcoreError("model: an empty list of models")
        self.ensemble = [self._load(m, head, device) for m in members]
        if len(self.ensemble) > 1:
            load_models(self.ensemble)  # energy heads with one type_map, or a one-line error
        self.potential = self.ensemble[0]
        output = self.potential.head_metadata.get("output", {})
        self.conservative = bool(output.get("conservative", True))
        self.output_name = str(output.get("name", "energy"))
        self.global_key = str(output.get("global_key", "energy"))
        self.atomic_key = str(output.get("atomic_key", "atom_energy"))
        self.output_size = int(output.get("size", 1))
        if self.conservative:
            self.implemented_properties = list(ENERGY_PROPERTIES) + (["model_devi"] if len(self.ensemble) > 1 else [])
        else:
            self.implemented_properties = [self.output_name, f"atomic_{self.output_name}"]
            if self.potential.reduction == "none":  # a per-atom-only head has no frame value
                self.implemented_properties = self.implemented_properties[1:]
        self._type_index = {name: i for i, name in enumerate(self.potential.type_map)}
        super().__init__(fparam=fparam, aparam=aparam, **kwargs)

    @staticmethod
    def _load(model, head: Optional[str], device: Optional[str]):
        from mtcore.infer import DeepPotential, load

        if isinstance(model, DeepPotential):
            if head is not None and head != model.head:
                raise MtcoreError(f"head: the loaded model is head '{model.head}'; load it again with head='{head}'")
            return model
        return load(model, head=head, device=_resolve_device(device))

    @property
    def type_map(self) -> list[str]:
        return self.potential.type_map

    def set(self, **kwargs: Any) -> dict:
        if "fparam" in kwargs or "aparam" in kwargs:
            check_parameters(self.potential, kwargs.get("fparam", self.parameters.get("fparam")),
                             kwargs.get("aparam", self.parameters.get("aparam")))
        changed = super().set(**kwargs)
        if changed:
            self.reset()
        return changed

    def get_property(self, name: str, atoms=None, allow_calculation: bool = True):
        if name not in self.implemented_properties:
            what = "an energy head" if self.conservative else f"a {self.output_name} head (no energy, forces or stress)"
            raise PropertyNotAvailable(
                f"{name}: head '{self.potential.head}' is {what}; it provides {', '.join(self.implemented_properties)}"
            )
        return super().get_property(name, atoms, allow_calculation)

    def atom_types(self, symbols: list[str]) -> np.ndarray:
        """Chemical symbols → the model's type indices, naming any element it does not know."""
        try:
            return np.fromiter((self._type_index[s] for s in symbols), dtype=np.int64, count=len(symbols))
        except KeyError as exc:
            raise MtcoreError(
                f"atoms: element {exc.args[0]} is not in the model's type_map {self.potential.type_map}"
            ) from None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, list(properties), system_changes)
        atoms = self.atoms
        types = self.atom_types(atoms.get_chemical_symbols())
        cell = cell_for(atoms.cell.array, atoms.pbc)
        if "stress" in properties and cell is None:
            raise PropertyNotAvailable("stress: the atoms are not periodic (pbc=False); stress needs a cell")
        positions = wrap_positions(atoms.positions.astype(np.float64), cell)
        out = self.potential.evaluate(
            positions, cell, types, virial=self.conservative and cell is not None,
            fparam=self.parameters.get("fparam"), aparam=self.parameters.get("aparam"),
        )
        if self.conservative:
            energy = float(out["energy"][0])
            self.results = {
                "energy": energy,
                "free_energy": energy,
                "forces": out["force"][0].reshape(-1, 3),
                "energies": out["atom_energy"][0].reshape(-1),
            }
            if cell is not None:
                self.results["stress"] = virial_to_stress(out["virial"][0], cell)
            if len(self.ensemble) > 1:
                self.results["model_devi"] = self._force_deviation(positions, cell, types, out["force"][0])
        else:
            shape = (3, 3) if self.output_size == 9 else (self.output_size,)
            self.results = {f"atomic_{self.output_name}": out[self.atomic_key][0].reshape((len(atoms),) + shape)}
            if self.global_key in out:
                self.results[self.output_name] = out[self.global_key][0].reshape(shape)

    def _force_deviation(self, positions: np.ndarray, cell, types: np.ndarray, first_force: np.ndarray) -> np.ndarray:
        """[max, min, avg] over atoms of the ensemble's per-atom force deviation (forces only: the
        other models need no virial)."""
        from mtcore.model_devi import force_deviation

        forces = [first_force.reshape(-1, 3)]
        for member in self.ensemble[1:]:
            out = member.evaluate(positions, cell, types, virial=False,
                                  fparam=self.parameters.get("fparam"), aparam=self.parameters.get("aparam"))
            forces.append(out["force"][0].reshape(-1, 3))
        devi = force_deviation(np.stack(forces)[:, None])[0]
        return np.array([devi.max(), devi.min(), devi.mean()])
