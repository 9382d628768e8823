"""The plugin test kit: the properties every descriptor, fitting net and data loader must have.

A plugin author runs it in their own test suite with one line (like scikit-learn's
``check_estimator``)::

    from mtcore.testing import check_descriptor
    def test_my_descriptor():
        check_descriptor(my_plugin.REGISTRATION, {"rcut": 4.0, "neuron": [4, 8]})

Each ``check_*`` runs every property on small synthetic frames it makes itself (a periodic
triclinic frame of 27 atoms and an open cluster of 12, float64) so no data files are needed and
a check takes seconds. It does not stop at the first problem: every failed property is listed in
one :class:`PluginCheckError` (an ``AssertionError``), one line per property with the reason.
Pass ``raise_on_failure=False`` to get the :class:`CheckReport` instead, and ``skip`` to leave
out a property you know your plugin does not have (it is reported as skipped, with your reason).

Why these properties: forces and virials come from autograd through the descriptor, so a
``.detach()`` anywhere gives wrong forces silently; ``mtcore freeze`` scripts the model, so a
module that does not script cannot be frozen; statistics live in buffers, or a checkpoint loses
them; and a model that is not invariant, or jumps at rcut, makes molecular dynamics drift.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from mtcore.data.requirements import DataRequirement
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError
from mtcore.hookspecs import (
    DataLoaderRegistration,
    DescriptorContext,
    DescriptorRegistration,
    FittingContext,
    FittingRegistration,
)
from mtcore.model.descriptor import Descriptor, StatSample
from mtcore.model.fitting import REDUCTIONS, Fitting, reduction_of
from mtcore.model.frozen import FrozenModel, batch_neighbor_list
from mtcore.model.geometry import prepare_geometry
from mtcore.model.model import MultiHeadModel
from mtcore.model.shared_layers import SharedLayerManager

__all__ = [
    "PluginCheckError",
    "CheckReport",
    "Frame",
    "synthetic_frames",
    "check_descriptor",
    "check_fitting",
    "check_loader",
    "SMALL_DESCRIPTOR",
]

#: The descriptor a fitting is checked with unless the author passes one (small and fast).
SMALL_DESCRIPTOR = {"type": "se_e2_a", "sel": "auto", "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                    "axis_neuron": 4, "seed": 1, "precision": "float64"}
#: The head a descriptor is frozen with (a frozen model needs one).
_SMALL_ENER = {"type": "ener", "neuron": [8, 8], "seed": 3, "precision": "float64"}

#: Identity checks (frozen vs eager, checkpoint reload, pooled statistics order): float64 round-off.
IDENTITY_RTOL = 1e-10
#: Symmetry checks: the same function of moved atoms, different round-off in every pair.
SYMMETRY_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


class PluginCheckError(AssertionError):
    """Some properties failed; the message lists each with a one-line reason."""

    def __init__(self, subject: str, failures: List[tuple]):
        self.subject = subject
        self.failures = list(failures)
        count = len(self.failures)
        lines = [f"{subject}: {count} propert{'y' if count == 1 else 'ies'} failed"]
        lines += [f"  - {prop}: {reason}" for prop, reason in self.failures]
        super().__init__("\n".join(lines))


@dataclass
class CheckReport:
    """What a check found: properties passed, failed (with reasons) and skipped (with reasons)."""

    subject: str
    passed: List[str] = field(default_factory=list)
    failed: List[tuple] = field(default_factory=list)
    skipped: List[tuple] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def failed_properties(self) -> List[str]:
        return [prop for prop, _ in self.failed]

    def raise_for_failures(self) -> "CheckReport":
        if self.failed:
            raise PluginCheckError(self.subject, self.failed)
        return self

    def __str__(self) -> str:
        lines = [f"{self.subject}: {len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped"]
        lines += [f"  FAIL {p}: {r}" for p, r in self.failed]
        lines += [f"  skip {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)


class _Checker:
    """Runs properties one by one; an exception in one becomes its one-line reason."""

    def __init__(self, subject: str, skip: Union[Sequence[str], Dict[str, str], None]):
        self.report = CheckReport(subject)
        self.skip = dict(skip) if isinstance(skip, dict) else {name: "skipped by the caller" for name in (skip or ())}

    def run(self, prop: str, fn: Callable[[], Any], needs: Sequence[Any] = ()) -> Any:
        if prop in self.skip:
            self.report.skipped.append((prop, self.skip[prop]))
            return None
        if any(n is None for n in needs):
            self.report.skipped.append((prop, "not run: an earlier property it needs failed"))
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fn()
        except _Skip as exc:
            self.report.skipped.append((prop, str(exc)))
            return None
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin is a finding, not a crash of the kit
            self.report.failed.append((prop, _one_line(exc)))
            return None
        self.report.passed.append(prop)
        return True if result is None else result


@contextmanager
def _single_thread() -> Iterator[None]:
    """The kit's frames are tiny: torch's intra-op threads only add overhead (on a busy 2-core
    machine a check ran 6x slower with 2 threads than with 1), so checks run on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _on_one_thread(fn: Callable) -> Callable:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _single_thread():
            return fn(*args, **kwargs)

    return wrapper


class _Skip(Exception):
    """A property that does not apply to this plugin (e.g. no ``layer_name`` argument)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, AssertionError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    """max |a - b| ≤ rtol · max(1, max |a|), or an AssertionError saying by how much."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise AssertionError(f"{what}: non-finite values")
    scale = max(1.0, float(a.abs().max()) if a.numel() else 1.0)
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if diff > rtol * scale:
        raise AssertionError(f"{what}: differ by {diff:.3g} (allowed {rtol * scale:.3g})")


# --------------------------------------------------------------------------------------------
# Synthetic frames
# --------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One frame: coord [N, 3] float64, atype [N] long, box [3, 3] (rows are cell vectors) or None."""

    coord: torch.Tensor
    atype: torch.Tensor
    box: Optional[torch.Tensor]
    name: str = "frame"


def synthetic_frames(ntypes: int = 2, seed: int = 0) -> List[Frame]:
    """A periodic triclinic frame of 27 atoms (jittered grid, nearest neighbours ≥ 1.4 Å) and an
    open cluster of 12 atoms; every type occurs in both. Small on purpose: checks take seconds."""
    rng = np.random.default_rng(seed)
    cell = np.array([[6.6, 0.0, 0.0], [0.5, 6.4, 0.0], [-0.3, 0.4, 6.8]])
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3), np.arange(3), indexing="ij"), -1).reshape(-1, 3)
    frac = (grid + 0.5 + rng.uniform(-0.12, 0.12, grid.shape)) / 3.0
    types = np.arange(len(frac)) % ntypes
    periodic = Frame(torch.tensor(frac @ cell), torch.tensor(rng.permutation(types)), torch.tensor(cell), "periodic")
    grid = np.stack(np.meshgrid(np.arange(2), np.arange(2), np.arange(3), indexing="ij"), -1).reshape(-1, 3)
    cluster = (grid + rng.uniform(-0.1, 0.1, grid.shape)) * 1.9
    cluster = cluster - cluster.mean(0)
    types = np.arange(len(cluster)) % ntypes
    return [periodic, Frame(torch.tensor(cluster), torch.tensor(rng.permutation(types)), None, "cluster")]


def _moved(frame: Frame, seed: int, amount: float = 0.05) -> Frame:
    """A slightly displaced copy (a second statistics frame)."""
    noise = torch.tensor(np.random.default_rng(seed).uniform(-amount, amount, tuple(frame.coord.shape)))
    return Frame(frame.coord + noise, frame.atype, frame.box, frame.name + "-moved")


def _rotation(seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q)


def _neighbors(frame: Frame, rcut: float, ntypes: int):
    box = None if frame.box is None else frame.box.reshape(1, 3, 3)
    return batch_neighbor_list(frame.coord.reshape(1, -1, 3), frame.atype.reshape(1, -1), box, rcut, ntypes)


def _stat_samples(frames: List[Frame], rcut: float, ntypes: int, labels: Optional[Callable[[Frame], dict]] = None,
                  system: str = "kit") -> List[StatSample]:
    samples = []
    for k, frame in enumerate(frames):
        center, neighbor, image = _neighbors(frame, rcut, ntypes)
        shift = torch.zeros(center.shape[0], 3, dtype=torch.float64) if frame.box is None else image.to(torch.float64) @ frame.box
        found = labels(frame) if labels is not None else {}
        samples.append(StatSample(
            coord=frame.coord.clone(), atype=frame.atype.clone(), center=center, neighbor=neighbor, shift=shift,
            nframes=1, natoms=frame.coord.shape[0], labels=found, find={key: 1.0 for key in found},
            system=f"{system}/{frame.name}",
        ))
    return samples


def _neighbor_stat(frames: List[Frame], ntypes: int):
    from mtcore.data.loading import pooled_neighbor_stat

    systems = [SystemData(path=f.name, atypes=f.atype.numpy()[None], coords=f.coord.numpy()[None],
                          boxes=None if f.box is None else f.box.numpy()[None]) for f in frames]
    return pooled_neighbor_stat(systems, ntypes)


# --------------------------------------------------------------------------------------------
# Normalising and building
# --------------------------------------------------------------------------------------------


def _registry():
    from mtcore.plugins import get_registry

    return get_registry()


def _registration(kind: str, value: Any, cls: type) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        return _registry().get(kind, value)
    raise TypeError(f"expected a {cls.__name__} or a registered {kind} name, got {type(value).__name__}")


def _normalize(registration: Any, params: Optional[dict], where: str) -> dict:
    """The section as the core would hand it to the builder: aliases resolved, defaults filled."""
    from dargs import Argument

    from mtcore.schema import check, schema_context

    args = registration.arguments(schema_context(_registry()))
    section = {k: v for k, v in (params or {}).items() if k != "type"}
    normalized = check(Argument(registration.name, dict, args), section, where)
    normalized["type"] = registration.name
    return normalized


def _build_descriptor(registration: DescriptorRegistration, params: dict, type_map: List[str],
                      frames: List[Frame]) -> tuple:
    from mtcore.model.build import build_descriptor

    registry = _registry()
    if registration.update_sel is not None:
        params = registration.update_sel(params, _neighbor_stat(frames, len(type_map)))
    ctx = DescriptorContext(type_map=list(type_map),
                            build_descriptor=lambda p: build_descriptor(p, list(type_map), registry))
    descriptor = registration.build(params, ctx)
    if not isinstance(descriptor, Descriptor):
        raise AssertionError(f"build returned {type(descriptor).__name__}, not a mtcore.model.descriptor.Descriptor")
    return descriptor, params


def _build_from_defaults(registration: Any, where: str, build: Callable[[dict], Any]) -> None:
    """Build from ``{}``: every default in the schema must make a working component."""
    from mtcore.schema import schema_context

    required = [a.name for a in registration.arguments(schema_context(_registry())) if not a.optional]
    if required:
        raise _Skip(f"the schema has required keys ({', '.join(required)}); built from the given parameters only")
    build(_normalize(registration, {}, where))


def _script(module: torch.nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def _check_scriptable(module: torch.nn.Module) -> None:
    """Script the module; a failure names TorchScript's complaint and the plugin's source line."""
    import re

    try:
        _script(module)
    except Exception as exc:  # noqa: BLE001 - TorchScript raises RuntimeError, NotSupportedError, ...
        lines = [line for line in str(exc).splitlines() if line.strip()]
        what = lines[0].strip().rstrip(":") if lines else type(exc).__name__
        where = ""
        for k, line in enumerate(lines):
            found = re.search(r'File "([^"]+)", line (\d+)', line)
            if found:
                code = ""
                for nxt in lines[k + 1:]:
                    if "<--- HERE" in nxt:
                        break
                    code = nxt.strip()
                where = f" at {Path(found.group(1)).name}:{found.group(2)}" + (f" `{code}`" if code else "")
        raise AssertionError(f"torch.jit.script fails: {what}{where}") from None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _readout_weights(descriptor: Descriptor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(int(descriptor.get_dim_out()), generator=gen, dtype=torch.float64)


def _descriptor_pass(descriptor: Descriptor, frame: Frame, weights: torch.Tensor, want_grad: bool = True) -> dict:
    """The descriptor's outputs and a scalar test energy E = Σ_i c·D_i + 0.01 Σ_i |rot_mat_i|²
    with its gradients, so forces/virials of the descriptor alone can be checked."""
    rcut, ntypes = float(descriptor.get_rcut()), int(descriptor.get_ntypes())
    center, neighbor, image = _neighbors(frame, rcut, ntypes)
    periodic = frame.box is not None
    box = None if frame.box is None else frame.box.reshape(1, 3, 3)
    flat, shift, leaf, strain = prepare_geometry(frame.coord.reshape(1, -1, 3), box, center, image, want_grad,
                                                 want_grad and periodic)
    out = descriptor(flat, frame.atype, center, neighbor, shift)
    if "descriptor" not in out:
        raise AssertionError(f"forward returned keys {sorted(out)}; 'descriptor' is missing")
    energy = (out["descriptor"].to(torch.float64) @ weights).sum()
    if "rot_mat" in out:
        energy = energy + 0.01 * out["rot_mat"].to(torch.float64).pow(2).sum()
    result = {key: value.detach() for key, value in out.items()}
    result["E"] = energy.detach()
    if want_grad:
        inputs = [leaf] + ([strain] if periodic else [])
        if energy.requires_grad:
            grads = torch.autograd.grad(energy, inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
        result["force"] = -(grads[0] if grads[0] is not None else torch.zeros_like(leaf))[0]
        if periodic:
            g = grads[1] if grads[1] is not None else torch.zeros_like(strain)
            result["virial"] = -g[0].transpose(0, 1)
    return result


# --------------------------------------------------------------------------------------------
# Shared property checks (work on any "evaluate(frame) -> dict" function)
# --------------------------------------------------------------------------------------------


def _transform_frame(frame: Frame, rot: torch.Tensor, shift: torch.Tensor) -> Frame:
    return Frame(frame.coord @ rot + shift, frame.atype, None if frame.box is None else frame.box @ rot, frame.name)


def _check_forces_fd(evaluate: Callable[[Frame], dict], energy_key: str, frame: Frame) -> None:
    """Central differences of the energy against the autograd force at a few coordinates."""
    ref = evaluate(frame)
    force = ref["force"].reshape(-1, 3)
    natoms = force.shape[0]
    scale = max(1.0, float(force.abs().max()))
    h = 1e-5
    for atom, axis in [(0, 0), (natoms // 3, 1), (natoms // 2, 2), (natoms - 1, 0)]:
        values = []
        for sign in (1.0, -1.0):
            coord = frame.coord.clone()
            coord[atom, axis] += sign * h
            values.append(float(evaluate(Frame(coord, frame.atype, frame.box))[energy_key].sum()))
        fd = -(values[0] - values[1]) / (2 * h)
        if abs(fd - float(force[atom, axis])) > 1e-6 * scale:
            raise AssertionError(
                f"force on atom {atom} axis {'xyz'[axis]} is {float(force[atom, axis]):.8g} but -dE/dx by finite "
                f"differences is {fd:.8g} (a .detach() or a non-differentiable step?)")


def _check_virial_fd(evaluate: Callable[[Frame], dict], energy_key: str, frame: Frame) -> None:
    virial = evaluate(frame)["virial"].reshape(3, 3)
    scale = max(1.0, float(virial.abs().max()))
    h = 1e-6
    eye = torch.eye(3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = h
            up = float(evaluate(Frame(frame.coord @ (eye + eps), frame.atype, frame.box @ (eye + eps)))[energy_key].sum())
            down = float(evaluate(Frame(frame.coord @ (eye - eps), frame.atype, frame.box @ (eye - eps)))[energy_key].sum())
            fd = -(up - down) / (2 * h)
            if abs(fd - float(virial[b, a])) > 1e-5 * scale:
                raise AssertionError(
                    f"virial[{b},{a}] is {float(virial[b, a]):.8g} but -dE/dstrain by finite differences is {fd:.8g} "
                    "(periodic shifts detached or not differentiable?)")


def _covariant(kind: str, value: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """How ``value`` (per atom or per frame, last dim 1/3/9 or anything invariant) transforms
    when coordinates go x → x R (rows are vectors)."""
    if kind == "vector":
        return value.reshape(-1, 3) @ rot
    if kind == "matrix":
        m = value.reshape(-1, 3, 3)
        return (rot.T.unsqueeze(0) @ m @ rot.unsqueeze(0)).reshape(-1, 9)
    return value


def _check_smooth(evaluate: Callable[[Frame], dict], rcut: float, types: List[int], key: str, has_force: bool) -> None:
    """Atom 2 crosses atom 0's cut-off (atom 1 stays inside everyone's): the output (and force)
    must change in proportion to the step, not jump; far beyond every cut-off it must not matter."""

    def frame(x: float) -> Frame:
        coord = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [x, 0.3, 0.0]], dtype=torch.float64)
        return Frame(coord, torch.tensor(types), None)

    def at(x: float) -> tuple:
        out = evaluate(frame(x))
        force = float(out["force"].reshape(-1, 3)[2, 0]) if has_force else 0.0
        return float(out[key].sum()), force

    cross = (rcut**2 - 0.3**2) ** 0.5

    def jumps(delta: float) -> tuple:
        (e_in, f_in), (e_out, f_out) = at(cross - delta), at(cross + delta)
        return abs(e_out - e_in), abs(f_out - f_in), max(1.0, abs(e_in))

    e_big, f_big, scale = jumps(1e-4)
    e_small, f_small, _ = jumps(1e-7)
    # continuous: the change shrinks with the step (about 1000x here); a jump stays the same size
    if e_small > 1e-2 * e_big + 1e-11 * scale:
        raise AssertionError(f"output jumps by {e_small:.3g} as an atom crosses rcut={rcut:g} (step 2e-7; "
                             f"{e_big:.3g} for step 2e-4): not continuous at rcut")
    if has_force and f_small > 1e-2 * f_big + 1e-11 * scale:
        raise AssertionError(f"force jumps by {f_small:.3g} as an atom crosses rcut={rcut:g}: not smooth at rcut")
    far_a, far_b = at(rcut + 0.96 + 1.0)[0], at(rcut + 0.96 + 2.0)[0]
    if abs(far_a - far_b) > 1e-12 * max(1.0, abs(far_a)):
        raise AssertionError(f"an atom beyond every cut-off still changes the output ({far_a!r} vs {far_b!r})")


# --------------------------------------------------------------------------------------------
# Descriptors
# --------------------------------------------------------------------------------------------


@_on_one_thread
def check_descriptor(
    registration: Union[DescriptorRegistration, str],
    params: Optional[dict] = None,
    *,
    type_map: Sequence[str] = ("A", "B"),
    skip: Union[Sequence[str], Dict[str, str], None] = None,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Check a descriptor plugin; ``params`` is its section (without ``type``; schema defaults
    fill the rest, ``sel: "auto"`` is resolved from the synthetic frames through ``update_sel``).

    Properties: builds from its schema defaults; output shapes; TorchScript-scriptable; forces
    and virials of a test energy E = Σ c·D equal -∇E (finite differences); rotation, translation
    and permutation invariance of ``descriptor`` and ``type_embedding`` (``rot_mat`` rotates:
    rot_mat(xR) = rot_mat(x) R); periodic images; smooth at rcut; statistics pooled from two
    heads' frames (any order gives the same model, to 1e-10); checkpoint round trip (statistics
    are in the state_dict); freeze round trip with a small ``ener`` head (TorchScript file vs
    eager, 1e-10).
    """
    registration = _registration("descriptor", registration, DescriptorRegistration)
    type_map = list(type_map)
    ntypes = len(type_map)
    check = _Checker(f"descriptor '{registration.name}'", skip)
    frames = synthetic_frames(ntypes)
    periodic, cluster = frames

    def build():
        normalized = _normalize(registration, params, "model/descriptor")
        descriptor, resolved = _build_descriptor(registration, normalized, type_map, frames)
        rcut = float(descriptor.get_rcut())
        if not rcut > 0:
            raise AssertionError(f"get_rcut() returned {rcut}; expected a positive distance")
        if int(descriptor.get_ntypes()) != ntypes:
            raise AssertionError(f"get_ntypes() returned {descriptor.get_ntypes()} for a type_map of {ntypes}")
        if int(descriptor.get_dim_out()) <= 0:
            raise AssertionError(f"get_dim_out() returned {descriptor.get_dim_out()}")
        return descriptor, resolved

    check.run("builds from its schema defaults", lambda: _build_from_defaults(
        registration, "model/descriptor", lambda p: _build_descriptor(registration, p, type_map, frames)))
    built = check.run("builds from the given parameters", build)
    descriptor, resolved = built if built else (None, None)
    weights = _readout_weights(descriptor) if descriptor is not None else None
    def pooled_stats():
        # two heads' statistics frames, pooled as the trainer pools them: a periodic and an open system
        rcut = float(descriptor.get_rcut())
        samples = _stat_samples([periodic, _moved(periodic, 1)], rcut, ntypes, system="head_a")
        samples += _stat_samples([cluster, _moved(cluster, 2)], rcut, ntypes, system="head_b")
        # a third head whose data has one element only: the other types have no statistics there
        samples += _stat_samples([Frame(cluster.coord, torch.zeros_like(cluster.atype), None, "one-type")], rcut,
                                 ntypes, system="head_c")
        twin, _ = _build_descriptor(registration, dict(resolved), type_map, frames)
        twin.load_state_dict(descriptor.state_dict())  # same weights also when the seed is not fixed
        descriptor.compute_input_stats(samples)
        ref = _descriptor_pass(descriptor, periodic, weights, want_grad=False)
        twin.compute_input_stats(list(reversed(samples)))
        other = _descriptor_pass(twin, periodic, weights, want_grad=False)
        for key in ref:
            _close(ref[key], other[key], IDENTITY_RTOL, f"'{key}' after statistics in reversed head order")
        for key, value in descriptor.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise AssertionError(f"statistics left '{key}' non-finite")

    stats_ok = check.run("statistics from pooled heads", pooled_stats, [descriptor])

    def shapes():
        for frame in frames:
            out = _descriptor_pass(descriptor, frame, weights, want_grad=False)
            n = frame.coord.shape[0]
            expect = {"descriptor": (n, int(descriptor.get_dim_out()))}
            if descriptor.get_dim_rot() > 0:
                expect["rot_mat"] = (n, int(descriptor.get_dim_rot()), 3)
            if descriptor.get_dim_type_embedding() > 0:
                expect["type_embedding"] = (n, int(descriptor.get_dim_type_embedding()))
            for key, shape in expect.items():
                if key not in out:
                    raise AssertionError(f"'{key}' missing from the output (get_dim_* says it is there)")
                if tuple(out[key].shape) != shape:
                    raise AssertionError(f"'{key}' has shape {tuple(out[key].shape)}, expected {shape}")
                if not bool(torch.isfinite(out[key]).all()):
                    raise AssertionError(f"'{key}' has non-finite values on the {frame.name} frame")

    check.run("output shapes", shapes, [descriptor])
    scripts = check.run("TorchScript-scriptable", lambda: _check_scriptable(descriptor), [descriptor])

    evaluate = (lambda frame: _descriptor_pass(descriptor, frame, weights)) if descriptor is not None else None
    check.run("forces = -dE/dx (finite differences)", lambda: (_check_forces_fd(evaluate, "E", periodic),
                                                              _check_forces_fd(evaluate, "E", cluster)), [descriptor])
    check.run("virial = -dE/dstrain (finite differences)", lambda: _check_virial_fd(evaluate, "E", periodic), [descriptor])

    def invariance():
        rot = _rotation(1)
        for frame in frames:
            ref = _descriptor_pass(descriptor, frame, weights, want_grad=False)
            moved = _descriptor_pass(descriptor, _transform_frame(frame, rot, torch.tensor([1.3, -7.2, 0.4], dtype=torch.float64)),
                                     weights, want_grad=False)
            for key in ("descriptor", "type_embedding"):
                if key in ref:
                    _close(ref[key], moved[key], SYMMETRY_RTOL, f"'{key}' of the rotated and translated {frame.name} frame")
            if "rot_mat" in ref:
                _close(ref["rot_mat"] @ rot, moved["rot_mat"], SYMMETRY_RTOL,
                       f"'rot_mat' of the rotated {frame.name} frame vs rot_mat·R")

    check.run("rotation/translation invariance", invariance, [descriptor])

    def permutation():
        perm = torch.randperm(periodic.coord.shape[0], generator=torch.Generator().manual_seed(0))
        ref = _descriptor_pass(descriptor, periodic, weights, want_grad=False)
        out = _descriptor_pass(descriptor, Frame(periodic.coord[perm], periodic.atype[perm], periodic.box), weights,
                               want_grad=False)
        for key in ("descriptor", "type_embedding", "rot_mat"):
            if key in ref:
                _close(ref[key][perm], out[key], SYMMETRY_RTOL, f"'{key}' of permuted atoms")

    check.run("permutation invariance", permutation, [descriptor])

    def images():
        ref = _descriptor_pass(descriptor, periodic, weights, want_grad=False)
        shifted = periodic.coord.clone()
        shifted[::3] += periodic.box[0] * 2 - periodic.box[2]
        out = _descriptor_pass(descriptor, Frame(shifted, periodic.atype, periodic.box), weights, want_grad=False)
        _close(ref["descriptor"], out["descriptor"], SYMMETRY_RTOL, "'descriptor' with atoms moved to other periodic images")
        big = _descriptor_pass(descriptor, Frame(cluster.coord, cluster.atype, torch.eye(3, dtype=torch.float64) * 60.0),
                               weights, want_grad=False)
        open_ = _descriptor_pass(descriptor, cluster, weights, want_grad=False)
        _close(open_["descriptor"], big["descriptor"], IDENTITY_RTOL, "'descriptor' of a cluster, open vs in a 60 Å box")

    check.run("periodic images", images, [descriptor])
    smooth_types = [0, min(1, ntypes - 1), min(1, ntypes - 1)]
    check.run("smooth at rcut", lambda: _check_smooth(evaluate, float(descriptor.get_rcut()), smooth_types, "E", True),
              [descriptor])

    def checkpoint():
        twin, _ = _build_descriptor(registration, dict(resolved), type_map, frames)
        twin.load_state_dict(descriptor.state_dict())
        ref = _descriptor_pass(descriptor, periodic, weights, want_grad=False)
        out = _descriptor_pass(twin, periodic, weights, want_grad=False)
        _close(ref["descriptor"], out["descriptor"], IDENTITY_RTOL,
               "'descriptor' of a fresh build loaded from the state_dict (statistics kept outside buffers?)")

    check.run("checkpoint round trip (state_dict)", checkpoint, [descriptor, stats_ok])

    def freeze():
        ener = _registry().get("fitting_net", "ener")
        manager = SharedLayerManager()
        fitting = ener.build(_normalize(ener, _SMALL_ENER, "fitting_net"), FittingContext("kit", type_map, descriptor, manager))
        _freeze_round_trip(descriptor, fitting, type_map, frames)

    check.run("freeze round trip (TorchScript file = eager, 1e-10)", freeze, [descriptor, scripts])
    if raise_on_failure:
        check.report.raise_for_failures()
    return check.report


def _freeze_round_trip(descriptor: Descriptor, fitting: Fitting, type_map: List[str], frames: List[Frame],
                       inputs: "Optional[_Inputs]" = None) -> None:
    """FrozenModel scripted, saved, loaded with torch.jit.load, compared with the eager model."""
    from mtcore.freeze import frozen_execution

    model = MultiHeadModel(descriptor, {"kit": fitting}, type_map)
    odef = fitting.output_def()
    scripted = _script(FrozenModel(descriptor, fitting, type_map, "kit", "{}"))
    fd, name = tempfile.mkstemp(suffix=".pth", prefix="mtcore-kit-")
    os.close(fd)
    try:
        torch.jit.save(scripted, name)
        loaded = torch.jit.load(name)
    finally:
        Path(name).unlink(missing_ok=True)
    for frame in frames:
        inputs = inputs or _Inputs(fitting, len(type_map))
        eager = _head_pass(model, "kit", frame, inputs)
        with frozen_execution("cpu"):  # as mtcore.infer calls frozen files
            frozen = loaded(frame.coord, frame.atype, frame.box, True, inputs.fparam(frame), inputs.aparam(frame))
        pairs = [(odef.atomic_key, odef.atomic_key)]
        if reduction_of(odef) == "none":
            if odef.global_key in frozen:
                raise AssertionError(f"the frozen model answers '{odef.global_key}' for a head whose reduction is 'none'")
        else:
            pairs.insert(0, (odef.global_key, odef.global_key))
        if odef.conservative:
            pairs.append(("force", "force"))
            if frame.box is not None:
                pairs.append(("virial", "virial"))
        for e_key, f_key in pairs:
            if f_key not in frozen:
                raise AssertionError(f"the frozen model's output has no '{f_key}'")
            _close(eager[e_key].reshape(-1), frozen[f_key].reshape(-1), IDENTITY_RTOL,
                   f"'{f_key}' of the loaded TorchScript file vs eager on the {frame.name} frame")


# --------------------------------------------------------------------------------------------
# Fitting nets
# --------------------------------------------------------------------------------------------


def _transform_kind(transform: str, fitting: Fitting) -> str:
    if transform != "auto":
        if transform not in ("invariant", "vector", "matrix"):
            raise ValueError(f"transform must be 'auto', 'invariant', 'vector' or 'matrix', got {transform!r}")
        return transform
    odef = fitting.output_def()
    if odef.conservative:
        return "invariant"
    return {3: "vector", 9: "matrix"}.get(int(odef.size), "invariant")


class _Inputs:
    """Frame and atomic parameters for a head that declares ``input_requirements``: fparam one
    fixed vector, aparam a fixed value per atom type (so it moves with permuted atoms)."""

    def __init__(self, fitting: Fitting, ntypes: int):
        self.nf = self.na = 0
        for req in fitting.input_requirements():
            if req.key == "fparam":
                self.nf = int(req.ndof)
            elif req.key == "aparam":
                self.na = int(req.ndof)
        gen = torch.Generator().manual_seed(7)
        self.fvalue = torch.rand(1, self.nf, generator=gen, dtype=torch.float64) + 0.5
        self.atable = torch.rand(ntypes, self.na, generator=gen, dtype=torch.float64) + 0.5

    def fparam(self, frame: Frame) -> Optional[torch.Tensor]:
        return self.fvalue.clone() if self.nf else None

    def aparam(self, frame: Frame) -> Optional[torch.Tensor]:
        return self.atable.index_select(0, frame.atype).unsqueeze(0) if self.na else None


def _head_pass(model: MultiHeadModel, head: str, frame: Frame, inputs: _Inputs) -> dict:
    center, neighbor, image = _neighbors(frame, model.rcut, model.ntypes)
    conservative = model.heads[head].output_def().conservative
    box = None if frame.box is None else frame.box.reshape(1, 3, 3)
    out = model(head, frame.coord.reshape(1, -1, 3), frame.atype.reshape(1, -1), box, center, neighbor, image,
                want_force=conservative, want_virial=conservative and frame.box is not None,
                fparam=inputs.fparam(frame), aparam=inputs.aparam(frame))
    return {key: value.detach() for key, value in out.items()}


def _synthetic_labels(fitting: Fitting, inputs: _Inputs, seed: int) -> Callable[[Frame], dict]:
    """Random labels for every key the head's statistics read (zero on unselected atoms)."""
    gen = torch.Generator().manual_seed(seed)

    def labels(frame: Frame) -> dict:
        n = frame.coord.shape[0]
        out = {}
        for req in fitting.stat_requirements():
            if req.atomic:
                value = torch.randn(1, n, req.ndof, generator=gen, dtype=torch.float64)
                if req.sel_types is not None:
                    keep = torch.isin(frame.atype, torch.tensor(list(req.sel_types))).to(torch.float64)
                    value = value * keep.view(1, n, 1)
                out[req.key] = value
            else:
                out[req.key] = torch.randn(1, req.ndof, generator=gen, dtype=torch.float64) - 3.0 * n
        if inputs.nf:
            out["fparam"] = inputs.fparam(frame) + 0.1 * torch.randn(1, inputs.nf, generator=gen, dtype=torch.float64)
        if inputs.na:
            out["aparam"] = inputs.aparam(frame) + 0.1 * torch.randn(1, n, inputs.na, generator=gen, dtype=torch.float64)
        return out

    return labels


def _build_fitting(registration: FittingRegistration, params: dict, head: str, type_map: List[str],
                   descriptor: Descriptor, manager: SharedLayerManager) -> Fitting:
    fitting = registration.build(dict(params), FittingContext(head, list(type_map), descriptor, manager))
    if not isinstance(fitting, Fitting):
        raise AssertionError(f"build returned {type(fitting).__name__}, not a mtcore.model.fitting.Fitting")
    odef = fitting.output_def()
    if int(odef.size) <= 0 or not odef.global_key or not odef.atomic_key:
        raise AssertionError(f"output_def() is incomplete: {odef}")
    if reduction_of(odef) not in REDUCTIONS:
        raise AssertionError(f"output_def().reduction {reduction_of(odef)!r} is not one of {', '.join(REDUCTIONS)}")
    if odef.conservative and reduction_of(odef) != "sum":
        raise AssertionError(f"output_def() is conservative but its reduction is {reduction_of(odef)!r}; energies sum")
    if fitting.needs_rot_mat() and descriptor.get_dim_rot() == 0:
        raise AssertionError("the head needs a rotation matrix but the descriptor has none: pass descriptor=")
    return fitting


@_on_one_thread
def check_fitting(
    registration: Union[FittingRegistration, str],
    params: Optional[dict] = None,
    *,
    descriptor: Union[dict, tuple, None] = None,
    type_map: Sequence[str] = ("A", "B"),
    transform: str = "auto",
    skip: Union[Sequence[str], Dict[str, str], None] = None,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Check a fitting-net plugin (one head) on a registered descriptor (``descriptor``: its
    section with ``type``, or ``(registration, params)`` for one not installed yet; default
    :data:`SMALL_DESCRIPTOR`, a small se_e2_a).

    ``transform`` says how the output rotates: ``auto`` (energies and other sizes invariant, size
    3 a vector, size 9 a 3x3 tensor R^T T R), or one of ``invariant``, ``vector``, ``matrix``.

    Properties: builds from its schema defaults; output shapes (zero on atoms outside
    ``sel_types``; no frame value for reduction ``none``); the frame value is the declared
    reduction of the atomic output (the sum, or the mean over the atoms of ``sel_types``, 1e-10); TorchScript-scriptable; for conservative (energy) heads forces = -∇E and
    virial = -∂E/∂ε by finite differences; rotation/translation invariance or covariance;
    permutation; periodic images; smooth at rcut; statistics from its own head's frames (finite,
    independent of order to 1e-10); checkpoint round trip; layer sharing by ``layer_name`` (two
    heads hold the same tensors and both change when they change, a private head does not);
    freeze round trip (TorchScript file vs eager, 1e-10).
    """
    registration = _registration("fitting_net", registration, FittingRegistration)
    type_map = list(type_map)
    ntypes = len(type_map)
    check = _Checker(f"fitting net '{registration.name}'", skip)
    frames = synthetic_frames(ntypes)
    periodic, cluster = frames
    # the descriptor is the author's choice, not under test: its errors are raised as they are
    if isinstance(descriptor, tuple):
        d_registration = _registration("descriptor", descriptor[0], DescriptorRegistration)
        d_params = _normalize(d_registration, descriptor[1], "model/descriptor")
    else:
        d_registration = _registry().get("descriptor", (descriptor or SMALL_DESCRIPTOR)["type"])
        d_params = _normalize(d_registration, descriptor or SMALL_DESCRIPTOR, "model/descriptor")
    desc, _ = _build_descriptor(d_registration, d_params, type_map, frames)
    rcut = float(desc.get_rcut())
    desc.compute_input_stats(_stat_samples([periodic, _moved(periodic, 1)], rcut, ntypes, system="head_a")
                             + _stat_samples([cluster, _moved(cluster, 2)], rcut, ntypes, system="head_b"))

    check.run("builds from its schema defaults", lambda: _build_from_defaults(
        registration, "model/fitting_net", lambda p: _build_fitting(registration, p, "kit", type_map, desc,
                                                                    SharedLayerManager())))
    def build() -> tuple:
        section = _normalize(registration, params, "model/fitting_net")
        return section, _build_fitting(registration, section, "kit", type_map, desc, SharedLayerManager())

    built = check.run("builds from the given parameters", build)
    normalized, fitting = built if built else (None, None)
    model = MultiHeadModel(desc, {"kit": fitting}, type_map) if fitting is not None else None
    inputs = _Inputs(fitting, ntypes) if fitting is not None else None
    odef = fitting.output_def() if fitting is not None else None
    kind = _transform_kind(transform, fitting) if fitting is not None else "invariant"
    reduction = reduction_of(odef) if odef is not None else "sum"
    global_keys = [] if reduction == "none" else [odef.global_key] if odef is not None else []

    def evaluate(frame: Frame) -> dict:
        return _head_pass(model, "kit", frame, inputs)

    def statistics():
        labels = _synthetic_labels(fitting, inputs, 11)
        samples = _stat_samples([periodic, _moved(periodic, 3), cluster], rcut, ntypes, labels, system="kit")
        twin = _build_fitting(registration, normalized, "kit", type_map, desc, SharedLayerManager())
        twin.load_state_dict(fitting.state_dict())  # same weights also when the seed is not fixed
        fitting.compute_output_stats(samples)
        for key, value in fitting.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise AssertionError(f"statistics left '{key}' non-finite")
        twin.compute_output_stats(list(reversed(samples)))
        twin_model = MultiHeadModel(desc, {"kit": twin}, type_map)
        ref, out = evaluate(periodic), _head_pass(twin_model, "kit", periodic, inputs)
        _close(ref[odef.atomic_key], out[odef.atomic_key], IDENTITY_RTOL, "output after statistics in reversed frame order")

    stats_ok = check.run("statistics from its head's frames", statistics, [fitting])

    def shapes():
        for frame in frames:
            out = evaluate(frame)
            n = frame.coord.shape[0]
            expected = [(odef.atomic_key, (1, n, odef.size))]
            if reduction == "none":
                if odef.global_key in out:
                    raise AssertionError(f"'{odef.global_key}' is predicted although the reduction is 'none'")
            else:
                expected.insert(0, (odef.global_key, (1, odef.size)))
            for key, shape in expected:
                if tuple(out[key].shape) != shape:
                    raise AssertionError(f"'{key}' has shape {tuple(out[key].shape)}, expected {shape} (size={odef.size})")
                if not bool(torch.isfinite(out[key]).all()):
                    raise AssertionError(f"'{key}' has non-finite values on the {frame.name} frame")
            if odef.sel_types is not None:
                off = ~torch.isin(frame.atype, torch.tensor(list(odef.sel_types)))
                if bool(off.any()) and float(out[odef.atomic_key][0][off].abs().max()) != 0.0:
                    raise AssertionError(f"'{odef.atomic_key}' is not zero on atoms outside sel_types {list(odef.sel_types)}")

    check.run("output shapes", shapes, [fitting])

    def reduced():
        for frame in frames:
            out = evaluate(frame)
            atype = frame.atype.reshape(1, -1)
            # recomputed here from the atomic output by the declared rule, not read from the core
            atomic = out[odef.atomic_key].reshape(1, atype.shape[1], -1)
            if reduction == "mean":
                keep = torch.ones_like(atype, dtype=torch.bool) if odef.sel_types is None else torch.isin(
                    atype, torch.tensor(list(odef.sel_types)))
                want = atomic[keep.unsqueeze(-1).expand_as(atomic)].reshape(-1, atomic.shape[-1]).mean(0, keepdim=True)
            else:
                want = atomic.sum(1)
            _close(want, out[odef.global_key].reshape(1, -1), IDENTITY_RTOL,
                   f"'{odef.global_key}' vs the {reduction} of '{odef.atomic_key}' on the {frame.name} frame")

    if reduction != "none":
        check.run(f"frame value = {reduction} of the atomic output", reduced, [fitting])
    scripts = check.run("TorchScript-scriptable", lambda: _check_scriptable(fitting), [fitting])
    if odef is not None and odef.conservative:
        check.run("forces = -dE/dx (finite differences)", lambda: (
            _check_forces_fd(evaluate, odef.global_key, periodic), _check_forces_fd(evaluate, odef.global_key, cluster)),
            [fitting])
        check.run("virial = -dE/dstrain (finite differences)",
                  lambda: _check_virial_fd(evaluate, odef.global_key, periodic), [fitting])

    def rotation():
        rot = _rotation(2)
        for frame in frames:
            ref = evaluate(frame)
            out = evaluate(_transform_frame(frame, rot, torch.tensor([-2.1, 0.7, 5.3], dtype=torch.float64)))
            for key in global_keys + [odef.atomic_key]:
                size = ref[key].shape[-1]
                _close(_covariant(kind, ref[key], rot).reshape(-1, size), out[key].reshape(-1, size), SYMMETRY_RTOL,
                       f"'{key}' of the rotated and translated {frame.name} frame vs the {kind} rule")
            if odef.conservative:
                _close(ref["force"].reshape(-1, 3) @ rot, out["force"].reshape(-1, 3), SYMMETRY_RTOL,
                       f"force of the rotated {frame.name} frame vs F·R")
                if "virial" in ref:
                    _close(rot.T @ ref["virial"].reshape(3, 3) @ rot, out["virial"].reshape(3, 3), SYMMETRY_RTOL,
                           "virial of the rotated frame vs Rᵀ·V·R")

    check.run("rotation/translation " + ("invariance" if kind == "invariant" else f"covariance ({kind})"), rotation,
              [fitting])

    def permutation():
        perm = torch.randperm(periodic.coord.shape[0], generator=torch.Generator().manual_seed(0))
        ref = evaluate(periodic)
        out = evaluate(Frame(periodic.coord[perm], periodic.atype[perm], periodic.box))
        for key in global_keys:
            _close(ref[key], out[key], SYMMETRY_RTOL, f"'{key}' of permuted atoms")
        _close(ref[odef.atomic_key][0][perm], out[odef.atomic_key][0], SYMMETRY_RTOL, f"'{odef.atomic_key}' of permuted atoms")
        if odef.conservative:
            _close(ref["force"][0][perm], out["force"][0], SYMMETRY_RTOL, "force of permuted atoms")

    check.run("permutation invariance", permutation, [fitting])

    def images():
        ref = evaluate(periodic)
        shifted = periodic.coord.clone()
        shifted[::3] += periodic.box[0] * 2 - periodic.box[2]
        out = evaluate(Frame(shifted, periodic.atype, periodic.box))
        for key in [odef.atomic_key] + (["force", "virial"] if odef.conservative else []):
            _close(ref[key], out[key], SYMMETRY_RTOL, f"'{key}' with atoms moved to other periodic images")

    check.run("periodic images", images, [fitting])
    smooth_types = [0, min(1, ntypes - 1), min(1, ntypes - 1)]
    check.run("smooth at rcut", lambda: _check_smooth(evaluate, rcut, smooth_types, (global_keys or [odef.atomic_key])[0],
                                                      odef.conservative), [fitting])

    def checkpoint():
        twin = _build_fitting(registration, normalized, "kit", type_map, desc, SharedLayerManager())
        twin.load_state_dict(fitting.state_dict())
        out = _head_pass(MultiHeadModel(desc, {"kit": twin}, type_map), "kit", periodic, inputs)
        _close(evaluate(periodic)[odef.atomic_key], out[odef.atomic_key], IDENTITY_RTOL,
               "output of a fresh build loaded from the state_dict (statistics kept outside buffers?)")

    check.run("checkpoint round trip (state_dict)", checkpoint, [fitting, stats_ok])
    check.run("layer sharing by layer_name", lambda: _check_sharing(registration, normalized, type_map, desc, inputs),
              [fitting])
    check.run("freeze round trip (TorchScript file = eager, 1e-10)",
              lambda: _freeze_round_trip(desc, fitting, type_map, frames, inputs), [fitting, scripts])
    if raise_on_failure:
        check.report.raise_for_failures()
    return check.report


def _check_sharing(registration: FittingRegistration, params: dict, type_map: List[str], desc: Descriptor,
                   inputs: _Inputs) -> None:
    """Two heads naming every layer alike hold the same tensors; a third without names holds none."""
    from mtcore.schema import schema_context

    names_in_schema = {a.name for a in registration.arguments(schema_context(_registry()))}
    if "layer_name" not in names_in_schema:
        raise _Skip("the schema has no 'layer_name' argument")
    neuron = params.get("neuron")
    if not isinstance(neuron, list):
        raise _Skip("no 'neuron' list to size layer_name by")
    names = [f"kit_shared_{k}" for k in range(len(neuron) + 1)]
    manager = SharedLayerManager()
    heads = {}
    for k, head in enumerate(("a", "b", "private")):
        section = dict(params, layer_name=None if head == "private" else names)
        if "seed" in names_in_schema:
            section["seed"] = 100 + k
        heads[head] = _build_fitting(registration, section, head, type_map, desc, manager)
    manager.check_usage(heads)
    if not manager.layers:
        raise AssertionError("layer_name was given but the builder asked ctx.layers for no layer (build the nets with mtcore.model.fitting_net.TypeFittingNet and pass it ctx.layers)")
    own = {head: {id(p) for p in module.parameters()} for head, module in heads.items()}
    for key, layer in manager.layers.items():
        for head in ("a", "b"):
            if not all(id(p) in own[head] for p in layer.parameters()):
                raise AssertionError(f"shared layer '{key}' is not a module of head '{head}'")
        if any(id(p) in own["private"] for p in layer.parameters()):
            raise AssertionError(f"shared layer '{key}' is also in a head whose layer_name is null")
    model = MultiHeadModel(desc, heads, type_map, manager.module_dict(), manager.users)
    frame = synthetic_frames(len(type_map))[0]
    key = heads["a"].output_def().atomic_key
    before = {head: _head_pass(model, head, frame, inputs)[key] for head in heads}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for layer in manager.layers.values():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    after = {head: _head_pass(model, head, frame, inputs)[key] for head in heads}
    for head in ("a", "b"):
        if float((after[head] - before[head]).abs().max()) < 1e-8:
            raise AssertionError(f"changing the shared layers does not change head '{head}': the shared tensors are not used")
    _close(before["private"], after["private"], IDENTITY_RTOL, "a head without layer_name after the shared layers changed")


# --------------------------------------------------------------------------------------------
# Data loaders
# --------------------------------------------------------------------------------------------

#: Labels asked of a loader unless the author names others.
DEFAULT_REQUIREMENTS = (DataRequirement("energy", 1), DataRequirement("force", 3, atomic=True))
_ABSENT = "mtcore_kit_absent_label"


def _snapshot(path: Path) -> dict:
    """Every file below ``path`` (or ``path`` itself): size, mtime and content digest."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def check_loader(
    registration: Union[DataLoaderRegistration, str],
    path: Union[str, Path],
    *,
    type_map: Optional[Sequence[str]] = None,
    requirements: Optional[Sequence[DataRequirement]] = None,
    set_prefix: str = "set",
    skip: Union[Sequence[str], Dict[str, str], None] = None,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Check a data-loader plugin on one system of its format at ``path`` (a small one is best).

    Properties: detects the system and not an empty folder or a missing path (without raising);
    loads a SystemData with the documented shapes and dtypes (coords [F, N, 3] float64 finite,
    atypes [F, N] integers in range, boxes [F, 3, 3] or None, labels [F, ndof] or [F, N, ndof],
    set_sizes summing to F); a missing optional label is left out and a missing required one is a
    one-line MtcoreError naming it; loading twice gives the same arrays; loading only reads
    (every file below ``path`` unchanged, none added).
    """
    registration = _registration("data_loader", registration, DataLoaderRegistration)
    path = Path(path)
    reqs = list(requirements if requirements is not None else DEFAULT_REQUIREMENTS)
    tmap = list(type_map) if type_map is not None else None
    check = _Checker(f"data loader '{registration.name}'", skip)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such system to check the loader on")
    before = _snapshot(path)

    def detects():
        if not registration.detect(path):
            raise AssertionError(f"detect({path}) is False for a system of its own format")
        with tempfile.TemporaryDirectory(prefix="mtcore-kit-") as empty:
            if registration.detect(Path(empty)):
                raise AssertionError("detect() is True for an empty folder")
            if registration.detect(Path(empty) / "missing"):
                raise AssertionError("detect() is True for a path that does not exist")

    check.run("detects its format (and nothing else)", detects)

    def load():
        return registration.load(path, tmap, list(reqs), set_prefix)

    data = check.run("loads", load)

    def shapes():
        if not isinstance(data, SystemData):
            raise AssertionError(f"load returned {type(data).__name__}, not a mtcore.data.system.SystemData")
        coords = np.asarray(data.coords)
        if coords.ndim != 3 or coords.shape[2] != 3 or coords.shape[0] < 1:
            raise AssertionError(f"coords has shape {coords.shape}; expected [frames, atoms, 3]")
        nframes, natoms = coords.shape[:2]
        if coords.dtype != np.float64 or not np.isfinite(coords).all():
            raise AssertionError(f"coords must be finite float64, got {coords.dtype}")
        atypes = np.asarray(data.atypes)
        if atypes.shape != (nframes, natoms) or not np.issubdtype(atypes.dtype, np.integer):
            raise AssertionError(f"atypes has shape {atypes.shape} and dtype {atypes.dtype}; expected integers [{nframes}, {natoms}]")
        if tmap is not None and (atypes.max() >= len(tmap) or atypes.min() < -1):
            raise AssertionError(f"atypes holds {atypes.min()}..{atypes.max()}, outside the type_map of {len(tmap)} (-1: virtual)")
        if data.boxes is not None:
            boxes = np.asarray(data.boxes)
            if boxes.shape != (nframes, 3, 3) or boxes.dtype != np.float64 or not np.isfinite(boxes).all():
                raise AssertionError(f"boxes has shape {boxes.shape} ({boxes.dtype}); expected finite float64 [{nframes}, 3, 3] or None")
        for req in reqs:
            if req.key not in data.labels:
                continue
            value = np.asarray(data.labels[req.key])
            shape = (nframes, natoms, req.ndof) if req.atomic else (nframes, req.ndof)
            if value.shape != shape:
                raise AssertionError(f"label '{req.key}' has shape {value.shape}; expected {shape}")
            if not np.isfinite(value).all():
                raise AssertionError(f"label '{req.key}' has non-finite values")
        if data.set_sizes and sum(data.set_sizes) != nframes:
            raise AssertionError(f"set_sizes {data.set_sizes} do not add up to {nframes} frames")

    check.run("SystemData shapes and dtypes", shapes, [data])

    def missing_labels():
        optional = registration.load(path, tmap, [DataRequirement(_ABSENT, 1)], set_prefix)
        if _ABSENT in optional.labels:
            raise AssertionError("a label without a file was returned (it must be left out; find=0 then)")
        try:
            registration.load(path, tmap, [DataRequirement(_ABSENT, 1, must=True)], set_prefix)
        except MtcoreError as exc:
            text = str(exc)
            if "\n" in text.strip() or _ABSENT not in text:
                raise AssertionError(f"the error for a missing required label must be one line naming it, got: {text!r}")
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"a missing required label raised {type(exc).__name__}, not MtcoreError: {exc}") from None
        else:
            raise AssertionError("a missing required label (must=True) raised no error")

    check.run("missing labels: optional left out, required is a one-line error", missing_labels, [data])

    def deterministic():
        again = registration.load(path, tmap, list(reqs), set_prefix)
        for name in ("coords", "atypes", "boxes"):
            a, b = getattr(data, name), getattr(again, name)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(np.asarray(a), np.asarray(b))):
                raise AssertionError(f"'{name}' differs between two loads")
        if sorted(data.labels) != sorted(again.labels):
            raise AssertionError(f"labels differ between two loads: {sorted(data.labels)} vs {sorted(again.labels)}")
        for key in data.labels:
            if not np.array_equal(np.asarray(data.labels[key]), np.asarray(again.labels[key])):
                raise AssertionError(f"label '{key}' differs between two loads")

    check.run("loads the same twice", deterministic, [data])

    def read_only():
        after = _snapshot(path)
        added = sorted(set(after) - set(before))
        changed = sorted(k for k in before if after.get(k) != before[k])
        if added or changed:
            what = ", ".join(added[:2] + changed[:2])
            raise AssertionError(f"loading wrote below {path} ({len(added)} files added, {len(changed)} changed or removed: {what})")

    check.run("only reads", read_only)
    if raise_on_failure:
        check.report.raise_for_failures()
    return check.report
