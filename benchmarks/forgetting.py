"""Benchmark: how much an old head forgets when a new head is added, and what replay buys (issue 15).

An old model (one head ``a``: DFT water, level A, data_0–1) is extended with a new head ``b``
(level B = A plus a pair correction, on the frames of data_2; see scarce_head.py) by
``mtcore train new.json --init-model old/model.ckpt.pt``. Head ``a`` is then:

* ``no_replay``: only measured (its data is gone and nothing is done about it);
* ``pseudo``: trained on b's frames labelled by its own --init-model predictions (``pseudo_labels``);
* ``replay``: trained on its real data (the data is still there).

Each run reports head a's validation force RMSE on held-out level-A frames (data_3) before and
after the extension (forgetting.json) and head b's on held-out level-B frames.

    python benchmarks/forgetting.py                 # ~5 min on one free core
    python benchmarks/forgetting.py --steps 100     # pipeline check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scarce_head import WATER, loss, lr, mtcore, write_system  # noqa: E402


def make_data(root: Path) -> dict:
    def frames(system: str) -> np.ndarray:
        return np.arange(sum(len(np.load(s / "energy.npy")) for s in (WATER / system).glob("set.*")))

    for k in (0, 1):
        write_system(root / f"a_{k}", WATER / f"data_{k}", frames(f"data_{k}"), False)
    write_system(root / "b_train", WATER / "data_2", frames("data_2"), True)
    write_system(root / "a_valid", WATER / "data_3", frames("data_3"), False)
    write_system(root / "b_valid", WATER / "data_3", frames("data_3"), True)
    return {"a": [str(root / "a_0"), str(root / "a_1")], "b": [str(root / "b_train")],
            "a_valid": [str(root / "a_valid")], "b_valid": [str(root / "b_valid")]}


def model(heads: list[str]) -> dict:
    return {
        "type_map": ["O", "H"],
        "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut_smth": 0.5, "rcut": 6.0, "neuron": [16, 32, 64],
                       "axis_neuron": 8, "resnet_dt": False, "seed": 1},
        "fitting_net_dict": {h: {"neuron": [64, 64, 64], "resnet_dt": True, "seed": 1 + i} for i, h in enumerate(heads)},
    }


def document(heads: dict, steps: int, seed: int) -> dict:
    return {
        "model": model(list(heads)),
        "learning_rate": lr(steps),
        "loss_dict": {h: loss() for h in heads},
        "training": {"data_dict": heads, "numb_steps": steps, "seed": seed, "disp_freq": max(steps // 5, 1),
                     "save_freq": steps, "validation_frames": 16},
    }


def valid(systems: list) -> dict:
    return {"systems": systems, "batch_size": 1, "numb_btch": 1}


def run(folder: Path, doc: dict, init: str | None = None) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.json").write_text(json.dumps(doc, indent=1))
    t0 = time.perf_counter()
    mtcore(["train", "input.json"] + (["--init-model", init] if init else []), folder)
    return time.perf_counter() - t0


def b_error(folder: Path, data: dict) -> float:
    mtcore(["freeze", "--head", "b", "-o", "b.pth"], folder)
    out = json.loads(mtcore(["test", "-m", "b.pth", *sum((["-s", v] for v in data["b_valid"]), []), "--json"], folder))
    return out["combined"]["Force"]["rmse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps of the old run and of each extension")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mtcore-forgetting-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data.json").exists():
        (work / "data.json").write_text(json.dumps(make_data(work / "data")))
    data = json.loads((work / "data.json").read_text())
    if not (work / "old" / "model.ckpt.pt").exists():
        run(work / "old", document({"a": {"training_data": {"systems": data["a"], "batch_size": 1},
                                          "validation_data": valid(data["a_valid"])}}, args.steps, args.seed))
    old = str(work / "old" / "model.ckpt.pt")
    a_train = {
        "no_replay": None,
        "pseudo": {"systems": data["b"], "batch_size": 1, "pseudo_labels": True},
        "replay": {"systems": data["a"], "batch_size": 1},
    }
    rows = {}
    for name, training_data in a_train.items():
        heads = {"a": {"validation_data": valid(data["a_valid"])},
                 "b": {"training_data": {"systems": data["b"], "batch_size": 1}, "validation_data": valid(data["b_valid"])}}
        if training_data is not None:
            heads["a"]["training_data"] = training_data
        doc = document(heads, args.steps, args.seed)
        if training_data is not None:
            doc["training"]["fitting_weight"] = {"a": 0.3, "b": 0.7}
        seconds = run(work / name, doc, init=old)
        report = json.loads((work / name / "forgetting.json").read_text())["heads"]["a"]
        rows[name] = {"a_before": report["before"]["rmse_f"], "a_after": report["after"]["rmse_f"],
                      "b_rmse_f": b_error(work / name, data), "train_s": round(seconds, 1)}
        print(name, rows[name], flush=True)
    print(f"\nhead a (level A) forgetting when head b (level B) is added; {args.steps} steps; force RMSE in eV/Å")
    print(f"{'run':10s} {'a before':>9s} {'a after':>9s} {'change':>8s} {'b':>8s} {'train s':>8s}")
    for name, r in rows.items():
        change = r["a_after"] / r["a_before"] - 1
        print(f"{name:10s} {r['a_before']:9.4f} {r['a_after']:9.4f} {change:+8.1%} {r['b_rmse_f']:8.4f} {r['train_s']:8.1f}")
    (work / "results.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))
    print(f"\nruns and results.json in {work}")


if __name__ == "__main__":
    main()
