"""Benchmark: does a data-scarce head gain from a data-rich one? (issue 15's headline)

Two levels of theory on the same configurations: level A is DeePMD-kit's water data (DFT energy
and forces, 192 atoms); level B is level A plus a pairwise correction with its own shape per type
pair (a smooth, short-ranged term the descriptor has to learn: not a rescaling the shared layers
get for free). The scarce head sees ``--scarce-frames`` frames of level B (≤ 10); the rich head
every training frame of level A. Validation: held-out frames of level B (never trained on).

``--scarce-labels energy`` builds the common real case of a scarce high level of theory (CCSD(T),
RPA): the scarce frames carry energies only (no ``force.npy``) and the scarce head's loss is
energies alone (``start/limit_pref_f`` 0, ``start/limit_pref_e`` 1), as a DeePMD-kit user would
write it. Validation still measures forces and energies on the fully labelled held-out frames.
Default ``energy_force``: the scarce frames carry energies and forces, every head's loss the same.

``--configurations clusters`` (water_clusters.py) replaces the periodic 192-atom frames by clusters
of ``--molecules`` whole molecules cut out of them, labelled by two analytic levels (a flexible
SPC/E-like model, and the same plus the pair correction): a few 12-atom clusters really are a data
limit (the single run's validation error well above its training error, reported as ``train F
RMSE``), while a few 192-atom frames are not: that is the regime where borrowing can beat a head's
own steps.

Runs, each a real ``mtcore train`` + ``freeze`` + ``test`` in its own folder:

* ``single``: the scarce head alone for N steps (its baseline).
* ``mt_equal_steps``: rich + scarce heads; the scarce head is drawn N times (equal steps on it).
* ``mt_equal_compute``: rich + scarce heads, N steps in all (equal compute).
* ``warm_start``: N/2 steps of the rich head alone, then N/2 steps of the scarce head alone
  starting from that model (``--init-model``): equal compute.
* ``rich_change_bias``: the rich head alone for N steps, its per-type energy bias then refit to the
  scarce frames (``mtcore change-bias``): equal steps, no training on level B at all.
* ``<variant>_equal_steps`` / ``<variant>_equal_compute`` for the multi-task options (VARIANTS):
  ``shared_fit`` (every hidden fitting layer shared, ``layer_name``), ``delta`` (the scarce head
  a Δ head on the rich one, ``base_head``), ``delta_fixed_base`` (the same, ``base_trainable:
  false``), ``delta_small`` (a Δ head with a 32-32 correction net), ``ramp`` (the scarce head's draw share 0.2 → 0.8, ``fitting_weight_final``);
  ``mt_*`` are the plain two-head runs above. ``<mt|delta|delta_fixed_base>_equal_steps_w0.75``:
  the scarce head drawn N times at weight 0.75 (4N/3 steps in all, a cheaper equal-steps check).

Results of earlier calls with the same settings are kept in ``results.json`` (run one case per
call on a busy machine: ``--only delta_equal_compute``; calls running side by side in one workdir
add their rows, the file is read again before each write).

    python benchmarks/scarce_head.py --steps 2000 --only single mt_equal_compute --workdir /tmp/scarce
    python benchmarks/scarce_head.py --steps 200 --quick     # pipeline check
    python benchmarks/scarce_head.py --scarce-labels energy --only single --workdir /tmp/scarce_e8
    python benchmarks/scarce_head.py --configurations clusters --molecules 4 --scarce-frames 4 --steps 16000 \
        --only single mt_equal_compute mt_equal_steps_w0.75 --workdir /tmp/scarce_clusters

It prints a table of the scarce head's validation force and energy RMSE per run (and the ratio to
``single``) and writes it as JSON beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "examples" / "water" / "data"

#: pair correction V(r) = A_ab · (1 − r/rc)^4 · (1 + 4 r/rc) for r < rc (C² at rc), eV and Å
PAIR_AMPLITUDE = {(0, 0): 2.4, (0, 1): -1.5, (1, 1): 0.7}
PAIR_CUTOFF = 4.0


def pair_correction(coord: np.ndarray, box: np.ndarray, types: np.ndarray) -> tuple[float, np.ndarray]:
    """Energy and forces of the level-B correction for one periodic frame (vectorised over pairs)."""
    import vesin

    i, j, shifts, dist = vesin.NeighborList(cutoff=PAIR_CUTOFF, full_list=False).compute(coord, box, True, "ijSd")
    vec = coord[j] + shifts @ box - coord[i]
    x = dist / PAIR_CUTOFF
    ti, tj = types[i], types[j]
    amp = np.zeros(len(i))
    for (a, b), value in PAIR_AMPLITUDE.items():
        amp[((ti == a) & (tj == b)) | ((ti == b) & (tj == a))] = value
    energy = float(np.sum(amp * (1 - x) ** 4 * (1 + 4 * x)))
    # dV/dr = A · d/dx[(1−x)^4 (1+4x)] / rc = A · (−20 x (1−x)^3) / rc
    dvdr = amp * (-20.0 * x * (1 - x) ** 3) / PAIR_CUTOFF
    pair_force = (dvdr / dist)[:, None] * vec  # F_i = −dV/dr_i = +dV/dr · r̂_ij, F_j = −F_i
    force = np.zeros_like(coord)
    np.add.at(force, i, pair_force)
    np.add.at(force, j, -pair_force)
    return energy, force


def write_system(folder: Path, source: Path, frames: np.ndarray, level_b: bool, forces_too: bool = True) -> None:
    """A deepmd/npy system of ``frames`` of ``source``, labels of level A or B (no force.npy
    without ``forces_too``: an energy-only data set, as a CCSD(T) set usually is)."""
    sets = sorted(source.glob("set.*"))
    coords = np.concatenate([np.load(s / "coord.npy") for s in sets])[frames].astype(np.float64)
    boxes = np.concatenate([np.load(s / "box.npy") for s in sets])[frames].astype(np.float64)
    energies = np.concatenate([np.load(s / "energy.npy") for s in sets])[frames].astype(np.float64)
    forces = np.concatenate([np.load(s / "force.npy") for s in sets])[frames].astype(np.float64)
    types = np.loadtxt(source / "type.raw", dtype=int).reshape(-1)
    if level_b:
        for k in range(len(frames)):
            e, f = pair_correction(coords[k].reshape(-1, 3), boxes[k].reshape(3, 3), types)
            energies[k] += e
            forces[k] += f.reshape(-1)
    out = folder / "set.000"
    out.mkdir(parents=True)
    arrays = {"coord": coords, "box": boxes, "energy": energies, **({"force": forces} if forces_too else {})}
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array)
    shutil.copy(source / "type.raw", folder / "type.raw")
    shutil.copy(source / "type_map.raw", folder / "type_map.raw")


def make_data(root: Path, scarce_frames: int, seed: int, scarce_forces: bool = True) -> dict:
    """rich (A, data_0..2), scarce (B, a few frames of data_0), validation of both on data_3."""
    rng = np.random.default_rng(seed)
    data = {}
    for k in range(3):
        source = WATER / f"data_{k}"
        n = sum(len(np.load(s / "energy.npy")) for s in source.glob("set.*"))
        write_system(root / f"rich_{k}", source, np.arange(n), False)
    data["rich"] = [str(root / f"rich_{k}") for k in range(3)]
    n0 = len(np.load(WATER / "data_0" / "set.000" / "energy.npy"))
    write_system(root / "scarce", WATER / "data_0", np.sort(rng.choice(n0, scarce_frames, replace=False)), True,
                 forces_too=scarce_forces)
    data["scarce"] = [str(root / "scarce")]
    n3 = len(np.load(WATER / "data_3" / "set.000" / "energy.npy"))
    write_system(root / "valid_b", WATER / "data_3", np.arange(n3), True)
    write_system(root / "valid_a", WATER / "data_3", np.arange(n3), False)
    data["valid_b"], data["valid_a"] = [str(root / "valid_b")], [str(root / "valid_a")]
    return data


def model_section(quick: bool) -> dict:
    return {
        "type_map": ["O", "H"],
        "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut_smth": 0.5, "rcut": 6.0,
                       "neuron": [8, 16, 32] if quick else [16, 32, 64], "axis_neuron": 8,
                       "resnet_dt": False, "seed": 1},
        "fitting": {"neuron": [32, 32] if quick else [96, 96, 96], "resnet_dt": True, "seed": 1},
    }


def loss(energy_only: bool = False) -> dict:
    """DeePMD-kit's usual energy+force prefactors; energy-only: a constant energy term (with Adam
    only the prefactor's changes matter, so 1 → 1 keeps the step size the learning rate's alone)."""
    if energy_only:
        return {"type": "ener", "start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 0, "limit_pref_f": 0,
                "start_pref_v": 0, "limit_pref_v": 0}
    return {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
            "start_pref_v": 0, "limit_pref_v": 0}


def lr(steps: int, scale: float = 1.0) -> dict:
    """The benchmark's schedule; ``scale`` multiplies its start (the *_fast variants, single_lr2x)."""
    return {"type": "exp", "start_lr": 1e-3 * scale, "stop_lr": 3e-6, "decay_steps": max(steps // 40, 1)}


def single_input(systems: list, valid: list, steps: int, quick: bool, seed: int, energy_only: bool = False,
                 lr_scale: float = 1.0) -> dict:
    m = model_section(quick)
    return {
        "model": {"type_map": m["type_map"], "descriptor": m["descriptor"], "fitting_net": m["fitting"]},
        "learning_rate": lr(steps, lr_scale), "loss": loss(energy_only),
        "training": {"training_data": {"systems": systems, "batch_size": 1},
                     "validation_data": {"systems": valid, "batch_size": 1, "numb_btch": 1},
                     "numb_steps": steps, "seed": seed, "disp_freq": max(steps // 10, 1), "save_freq": steps},
    }


#: multi-task variants: what changes in the scarce head's fitting net (and the training section)
VARIANTS = {
    "mt": {},
    # every hidden fitting layer shared by the two heads; only the output layer is per head
    "shared_fit": {"shared_hidden": True},
    # Δ-learning: scarce = rich head's atomic energy + its own correction net (base trained by both)
    "delta": {"fitting": {"base_head": "rich"}},
    # Δ-learning, the scarce loss trains only the correction (and the descriptor)
    "delta_fixed_base": {"fitting": {"base_head": "rich", "base_trainable": False}},
    # Δ-learning with a small correction net (32-32 instead of the base's size): fewer functions
    # for a few energies to pin down (energy-only scarce data)
    "delta_small": {"fitting": {"base_head": "rich", "neuron": [32, 32]}},
    # the scarce head's draw share ramps from 0.2 to 0.8 (mean 0.5): the rich head shapes the descriptor first
    "ramp": {"ramp": (0.2, 0.8)},
    # the scarce head's own schedule starts at twice the learning rate (learning_rate_dict): its
    # fitting net gets fewer updates at equal compute, each larger
    "fast_scarce": {"scarce_lr_scale": 2.0},
    # shared hidden fitting layers and the faster scarce schedule together
    "shared_fit_fast": {"shared_hidden": True, "scarce_lr_scale": 2.0},
}


def multi_input(data: dict, steps: int, weight_scarce: float, quick: bool, seed: int, variant: str = "mt",
                energy_only: bool = False) -> dict:
    m = model_section(quick)
    heads = {"rich": dict(m["fitting"], seed=1), "scarce": dict(m["fitting"], seed=2)}
    spec = VARIANTS[variant]
    if spec.get("shared_hidden"):
        names = [f"fit_{k}" for k in range(len(m["fitting"]["neuron"]))] + [None]
        heads = {h: dict(f, layer_name=names) for h, f in heads.items()}
    heads["scarce"].update(spec.get("fitting", {}))
    start, final = spec.get("ramp", (weight_scarce, None))
    return {
        "model": {"type_map": m["type_map"], "descriptor": m["descriptor"], "fitting_net_dict": heads},
        "learning_rate": lr(steps), "loss_dict": {"rich": loss(), "scarce": loss(energy_only)},
        "training": {
            "data_dict": {
                "rich": {"training_data": {"systems": data["rich"], "batch_size": 1},
                         "validation_data": {"systems": data["valid_a"], "batch_size": 1, "numb_btch": 1}},
                "scarce": {"training_data": {"systems": data["scarce"], "batch_size": 1},
                           "validation_data": {"systems": data["valid_b"], "batch_size": 1, "numb_btch": 1}},
            },
            "fitting_weight": {"rich": 1.0 - start, "scarce": start},
            **({"fitting_weight_final": {"rich": 1.0 - final, "scarce": final}} if final is not None else {}),
            "numb_steps": steps, "seed": seed, "disp_freq": max(steps // 10, 1), "save_freq": steps,
        },
        **({"learning_rate_dict": {"scarce": lr(steps, spec["scarce_lr_scale"])}} if "scarce_lr_scale" in spec else {}),
    }


def mtcore(args: list, cwd: Path) -> str:
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "mtcore.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"mtcore {' '.join(args)} failed in {cwd}:\n{result.stderr[-2000:]}")
    return result.stdout


def scarce_errors(folder: Path, frozen: str, valid: list) -> dict:
    out = json.loads(mtcore(["test", "-m", frozen, *sum((["-s", v] for v in valid), []), "--json"], folder))
    combined = out["combined"]
    return {"rmse_f": combined["Force"]["rmse"], "rmse_e_per_atom": combined["Energy/atom"]["rmse"]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(name: str, workdir: Path, document: dict, freeze_head: str | None, init: str | None = None) -> Path:
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.json").write_text(json.dumps(document, indent=1))
    args = ["train", "input.json"] + (["--init-model", init] if init else [])
    t0, cpu0 = time.perf_counter(), _children_cpu()
    mtcore(args, folder)
    elapsed, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    freeze = ["freeze", "-o", "frozen.pth"] + (["--head", freeze_head] if freeze_head else [])
    mtcore(freeze, folder)
    (folder / "train_seconds.txt").write_text(f"{elapsed:.1f}\n")
    # CPU time is what a shared machine does not distort (wall-clock grows with the others' load)
    (folder / "train_cpu_seconds.txt").write_text(f"{cpu:.1f}\n")
    return folder


def change_bias_case(rich: Path, scarce: list) -> Path:
    """The rich head alone, its per-type energy bias refit to the scarce frames (``mtcore
    change-bias``, dp change-bias): level B's forces are level A's, its energies shifted."""
    folder = rich.parent / "rich_change_bias"
    folder.mkdir(exist_ok=True)
    if (folder / "frozen.pth").exists():
        (folder / "frozen.pth").unlink()  # this benchmark's own output of an earlier call
    mtcore(["change-bias", str(rich / "frozen.pth"), *sum((["-s", s] for s in scarce), []), "-o", "frozen.pth"], folder)
    for name in ("train_seconds.txt", "train_cpu_seconds.txt"):
        shutil.copy(rich / name, folder / name)
    return folder


def _settings_of_old_data(data: dict, seed: int) -> dict:
    """data.json written before the settings were recorded: read them off the scarce system (its
    seed was not recorded, so it is taken as given)."""
    scarce = Path(data["scarce"][0]) / "set.000"
    labels = "energy_force" if (scarce / "force.npy").exists() else "energy"
    return {"scarce_frames": len(np.load(scarce / "energy.npy")), "seed": seed, "scarce_labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="N: steps of the scarce head's baseline")
    parser.add_argument("--scarce-frames", type=int, default=8)
    parser.add_argument("--scarce-labels", choices=("energy_force", "energy"), default="energy_force",
                        help="labels of the scarce frames (energy: no force.npy, an energy-only loss)")
    parser.add_argument("--configurations", choices=("periodic", "clusters"), default="periodic",
                        help="periodic: the 192-atom DFT frames; clusters: --molecules-molecule clusters cut from "
                             "them with two analytic levels (water_clusters.py), where a few frames are a data limit")
    parser.add_argument("--molecules", type=int, default=8, help="molecules per cluster (--configurations clusters)")
    parser.add_argument("--weight", type=float, default=0.5, help="fitting_weight of the scarce head in multi-task runs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small nets: a pipeline check, not a measurement")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only these cases")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mtcore-scarce-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data_root = workdir / "data"
    energy_only = args.scarce_labels == "energy"
    data_settings = {"scarce_frames": args.scarce_frames, "seed": args.seed, "scarce_labels": args.scarce_labels}
    clusters = args.configurations == "clusters"
    if clusters:  # absent for periodic frames, so data.json files written before the option still match
        data_settings["clusters_of"] = args.molecules
    if not data_root.exists():
        if clusters:
            from water_clusters import make_cluster_data

            data = make_cluster_data(data_root, WATER, args.scarce_frames, args.seed, args.molecules,
                                     scarce_forces=not energy_only)
        else:
            data = make_data(data_root, args.scarce_frames, args.seed, scarce_forces=not energy_only)
        (workdir / "data.json").write_text(json.dumps(dict(data, settings=data_settings)))
    data = json.loads((workdir / "data.json").read_text())
    made = data.pop("settings", None) or _settings_of_old_data(data, args.seed)
    if made != data_settings:
        raise SystemExit(f"{workdir / 'data.json'}: data made with {made}, not {data_settings}; use another --workdir")
    n, w, q, seed = args.steps, args.weight, args.quick, args.seed
    cases = {
        "single": lambda: run_case("single", workdir, single_input(data["scarce"], data["valid_b"], n, q, seed, energy_only), None),
    }
    # the baseline with the faster schedule of the *_fast variants: is a gain the schedule's alone?
    cases["single_lr2x"] = lambda: run_case(
        "single_lr2x", workdir, single_input(data["scarce"], data["valid_b"], n, q, seed, energy_only, lr_scale=2.0), None)
    for variant in VARIANTS:
        cases[f"{variant}_equal_steps"] = lambda v=variant: run_case(
            f"{v}_equal_steps", workdir, multi_input(data, int(round(n / w)), w, q, seed, v, energy_only), "scarce")
        cases[f"{variant}_equal_compute"] = lambda v=variant: run_case(
            f"{v}_equal_compute", workdir, multi_input(data, n, w, q, seed, v, energy_only), "scarce")
    # equal steps on the scarce head at 3/4 of the draws: 4N/3 steps in all instead of 2N (a cheaper check)
    for variant in ("mt", "delta", "delta_fixed_base", "shared_fit_fast"):
        cases[f"{variant}_equal_steps_w0.75"] = lambda v=variant: run_case(
            f"{v}_equal_steps_w0.75", workdir, multi_input(data, int(round(n / 0.75)), 0.75, q, seed, v, energy_only), "scarce")
    cases.update({
        "warm_start": lambda: (
            run_case("warm_start_rich", workdir, single_input(data["rich"], data["valid_a"], n // 2, q, seed), None),
            run_case("warm_start", workdir, single_input(data["scarce"], data["valid_b"], n - n // 2, q, seed, energy_only), None,
                     init=str(workdir / "warm_start_rich" / "frozen.pth")),
        )[-1],
        "rich_change_bias": lambda: change_bias_case(
            run_case("rich_alone", workdir, single_input(data["rich"], data["valid_a"], n, q, seed), None), data["scarce"]),
    })
    if args.only:
        unknown = sorted(set(args.only) - set(cases))
        if unknown:
            raise SystemExit(f"--only: unknown case(s) {', '.join(unknown)}; cases: {', '.join(cases)}")
    # earlier results of the same settings are kept (one case per call on a busy machine)
    settings = {"steps": n, "weight": w, "scarce_frames": args.scarce_frames, "quick": args.quick}
    if energy_only:  # absent for energy_force, so results.json files written before the option still match
        settings["scarce_labels"] = args.scarce_labels
    if clusters:
        settings["clusters_of"] = args.molecules
    results = workdir / "results.json"

    def kept_rows() -> dict:
        """Rows of earlier calls with the same settings, read again before each write, so calls
        running side by side in one workdir add their rows instead of overwriting each other's."""
        previous = json.loads(results.read_text()) if results.exists() else {}
        same = {k: v for k, v in previous.items() if k != "rows"} == settings
        return previous.get("rows", {}) if same else {}

    for name, run in cases.items():
        if args.only and name not in args.only:
            continue
        folder = run()
        row = scarce_errors(folder, "frozen.pth", data["valid_b"])
        if not energy_only:  # training error on the scarce frames: above validation's = data-limited
            row["train_rmse_f"] = scarce_errors(folder, "frozen.pth", data["scarce"])["rmse_f"]
        row["train_s"] = float((folder / "train_seconds.txt").read_text())
        row["train_cpu_s"] = float((folder / "train_cpu_seconds.txt").read_text())
        rows = kept_rows()
        rows[name] = row
        results.write_text(json.dumps(dict(settings, rows=rows), indent=1))
        print(f"{name:18s} rmse_f {row['rmse_f']:.4f} eV/Å   rmse_e/atom {row['rmse_e_per_atom']}", flush=True)
    rows = kept_rows()
    base = rows.get("single", {})
    labels = "energies only" if energy_only else "energies and forces"
    print(f"\nscarce head ({args.scarce_frames} frames of level B, {labels}), validation on "
          f"{len(data['valid_b'])} held-out system(s); N = {n}")
    print(f"{'run':30s} {'force RMSE':>11s} {'vs single':>10s} {'E/atom RMSE':>12s} {'vs single':>10s} "
          f"{'train F RMSE':>12s} {'train s':>8s} {'cpu s':>8s}")
    for name, row in rows.items():
        ratio_f = f"{row['rmse_f'] / base['rmse_f']:.3f}" if base else "-"
        ratio_e = f"{row['rmse_e_per_atom'] / base['rmse_e_per_atom']:.3f}" if base else "-"
        print(f"{name:30s} {row['rmse_f']:11.4f} {ratio_f:>10s} {row['rmse_e_per_atom']:12.5f} {ratio_e:>10s} "
              f"{row.get('train_rmse_f', float('nan')):12.4f} {row['train_s']:8.1f} {row.get('train_cpu_s', float('nan')):8.1f}")
    print(f"\nruns and results.json in {workdir}")


if __name__ == "__main__":
    main()
