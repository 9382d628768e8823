"""The bad-input matrix (issue 18): every bad input or bad data file gives ONE line naming the key
or file, exit code 1, and no traceback, through the CLI in-process.

Each case starts from a tiny valid run (a 4-frame copy of the water system data_0, a small
se_e2_a + ener net, numb_steps 1) and breaks one thing. Every case must fail before training
starts, so the whole matrix runs in seconds. A few non-matrix tests at the end check what is
accepted on purpose (numb_steps 0, the batch_size warning, --debug, JSON without NaN).
To read every message: MTCORE_SHOW_LINES=1 pytest -s tests/test_bad_inputs.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import WATER
from mtcore.cli import app

NFRAMES = 4


@pytest.fixture(scope="module")
def tiny_system(tmp_path_factory) -> Path:
    """data_0 cut to its first 4 frames (192 atoms), written once per module."""
    target = tmp_path_factory.mktemp("tiny") / "sys"
    (target / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        shutil.copy(WATER / "data_0" / name, target / name)
    for npy in (WATER / "data_0" / "set.000").glob("*.npy"):
        np.save(target / "set.000" / npy.name, np.load(npy)[:NFRAMES].astype(np.float64))
    return target


def base_doc(system: Path) -> dict:
    return {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [4, 8],
                           "axis_neuron": 2, "seed": 1},
            "fitting_net": {"neuron": [8], "seed": 2},
        },
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {
            "training_data": {"systems": [str(system)], "batch_size": 1},
            "numb_steps": 1,
            "seed": 1,
            "disp_freq": 1,
            "save_freq": 1,
        },
    }


def multi_doc(system: Path, names=("a", "b")) -> dict:
    doc = base_doc(system)
    fitting = doc["model"].pop("fitting_net")
    loss = doc.pop("loss")
    data = doc["training"].pop("training_data")
    doc["model"]["fitting_net_dict"] = {n: dict(fitting, layer_name=["l0", None]) for n in names}
    doc["loss_dict"] = {n: dict(loss) for n in names}
    doc["training"]["data_dict"] = {n: {"training_data": dict(data)} for n in names}
    return doc


# --- small mutators ------------------------------------------------------------------------------
def put(path: str, value):
    """Set doc[path] (keys separated by '/'; creates nothing)."""

    def mutate(doc, system, tmp):
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = copy.deepcopy(value)

    return mutate


def drop(path: str):
    def mutate(doc, system, tmp):
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


def npy(name: str, change: Callable[[np.ndarray], np.ndarray]):
    """Rewrite set.000/<name>.npy with change(old)."""

    def mutate(doc, system, tmp):
        path = system / "set.000" / f"{name}.npy"
        np.save(path, change(np.load(path)))

    return mutate


def with_value(index, value):
    def change(a):
        a = a.copy()
        a[index] = value
        return a

    return change


def write(relative: str, text):
    def mutate(doc, system, tmp):
        path = system / relative
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return mutate


def remove(relative: str):
    def mutate(doc, system, tmp):
        path = system / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return mutate


def truncate(name: str):
    def mutate(doc, system, tmp):
        path = system / "set.000" / f"{name}.npy"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return mutate


def both(*mutators):
    def mutate(doc, system, tmp):
        for m in mutators:
            m(doc, system, tmp)

    return mutate


def multi(*mutators, names=("a", "b")):
    """Start from the two-head multi-task input, then apply mutators."""

    def mutate(doc, system, tmp):
        doc.clear()
        doc.update(multi_doc(system, names))
        for m in mutators:
            m(doc, system, tmp)

    return mutate


def overlap(frame: int, i: int, j: int):
    def mutate(doc, system, tmp):
        path = system / "set.000" / "coord.npy"
        coord = np.load(path).reshape(NFRAMES, -1, 3)
        coord[frame, j] = coord[frame, i] + 1e-4
        np.save(path, coord.reshape(NFRAMES, -1))

    return mutate


def symlink_loop(doc, system, tmp):
    root = tmp / "tree"
    root.mkdir()
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")
    shutil.copytree(system, root / "real")
    doc["training"]["training_data"]["systems"] = [str(root / "self")]


def relative_symlink_loop(doc, system, tmp):
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    doc["training"]["training_data"]["systems"] = ["a"]


def no_system_below(doc, system, tmp):
    (tmp / "empty").mkdir()
    doc["training"]["training_data"]["systems"] = str(tmp / "empty")


def second_set_without_force(doc, system, tmp):
    shutil.copytree(system / "set.000", system / "set.001")
    (system / "set.001" / "force.npy").unlink()


def raw_input(text: str):
    def mutate(doc, system, tmp):
        doc.clear()
        doc["__raw__"] = text

    return mutate


# --- the matrix ----------------------------------------------------------------------------------
# (id, mutator, regex the one line must match, CLI args; default: train input.json)
TRAIN = ["train", "input.json"]
CASES: list[tuple[str, Callable, str, Optional[list]]] = [
    # the input document: sections missing in turn
    ("missing-model", drop("model"), r"model", None),
    ("missing-training", drop("training"), r"training", None),
    ("missing-descriptor", drop("model/descriptor"), r"descriptor", None),
    ("missing-fitting_net", drop("model/fitting_net"), r"model/fitting_net", None),
    ("missing-training_data", drop("training/training_data"), r"training/training_data", None),
    ("missing-numb_steps", drop("training/numb_steps"), r"numb_steps", None),
    ("missing-systems", drop("training/training_data/systems"), r"systems", None),
    ("missing-type_map", drop("model/type_map"), r"model/type_map", None),
    ("missing-descriptor-type", drop("model/descriptor/type"), r"model/descriptor.*type", None),
    ("not-json", raw_input('{"model": '), r"input.json: not valid JSON", None),
    ("json-list", raw_input("[1, 2]"), r"input.json: the input must be a JSON object", None),
    ("json-nan", put("learning_rate/start_lr", math.nan), r"learning_rate/start_lr.*(NaN|nan|finite)", None),
    ("json-inf", put("model/descriptor/rcut", math.inf), r"model/descriptor/rcut.*(inf|finite)", None),
    ("input-missing", lambda d, s, t: None, r"nowhere.json: input file not found", ["train", "nowhere.json"]),
    # wrong types in each nested dict
    ("model-int", put("model", 5), r"model", None),
    ("training-list", put("training", []), r"training", None),
    ("descriptor-int", put("model/descriptor", 5), r"model/descriptor", None),
    ("descriptor-unknown-type", put("model/descriptor/type", "se_xyz"), r"descriptor.*se_xyz", None),
    ("fitting-int", put("model/fitting_net", 5), r"model/fitting_net", None),
    ("fitting-unknown-type", put("model/fitting_net/type", "nope"), r"fitting_net.*nope", None),
    ("sel-str", put("model/descriptor/sel", "x"), r"model/descriptor/sel", None),
    ("sel-list-str", put("model/descriptor/sel", ["a", "b"]), r"model/descriptor/sel", None),
    ("sel-wrong-length", put("model/descriptor/sel", [46, 92, 3]), r"model/descriptor/sel", None),
    ("sel-negative", put("model/descriptor/sel", [-1, 92]), r"model/descriptor/sel", None),
    ("rcut-str", put("model/descriptor/rcut", "6"), r"rcut", None),
    ("rcut_smth-negative", put("model/descriptor/rcut_smth", -1.0), r"model/descriptor/rcut_smth.*-1", None),
    ("rcut_smth-above-rcut", put("model/descriptor/rcut_smth", 7.0), r"rcut_smth", None),
    ("neuron-str", put("model/descriptor/neuron", "abc"), r"model/descriptor.*neuron", None),
    ("descriptor-neuron-empty", put("model/descriptor/neuron", []), r"model/descriptor/neuron", None),
    ("fitting-neuron-empty", put("model/fitting_net/neuron", []), r"model/fitting_net/neuron", None),
    ("fitting-neuron-float", put("model/fitting_net/neuron", [64.5]), r"model/fitting_net/neuron.*64.5", None),
    ("descriptor-neuron-float", put("model/descriptor/neuron", [4, 8.5]), r"model/descriptor/neuron.*8.5", None),
    ("neuron-bool", put("model/fitting_net/neuron", [True]), r"model/fitting_net/neuron", None),
    ("activation-unknown", put("model/fitting_net/activation_function", "swish9"), r"activation_function.*swish9", None),
    ("precision-unknown", put("model/descriptor/precision", "float8"), r"precision.*float8", None),
    ("axis_neuron-big", put("model/descriptor/axis_neuron", 1000), r"model/descriptor/axis_neuron", None),
    ("type_map-str", put("model/type_map", "O H"), r"model/type_map", None),
    ("type_map-ints", put("model/type_map", [1, 2]), r"model/type_map", None),
    ("type_map-duplicates", put("model/type_map", ["O", "O"]), r"model/type_map.*'O'.*(twice|duplicate)", None),
    ("type_map-empty-name", put("model/type_map", ["O", ""]), r"model/type_map", None),
    ("training_data-list", put("training/training_data", [1]), r"training_data", None),
    ("systems-int", put("training/training_data/systems", 5), r"systems", None),
    ("systems-list-of-int", put("training/training_data/systems", [5]), r"systems", None),
    ("systems-missing-folder", put("training/training_data/systems", ["/nowhere/x"]), r"systems: /nowhere/x: not found", None),
    ("systems-empty-list", put("training/training_data/systems", []), r"systems", None),
    ("systems-relative-link-loop", relative_symlink_loop, r"training/training_data/systems: .*/a: is a symlink loop", None),
    ("systems-no-system-below", no_system_below, r"systems: no data system found below", None),
    ("systems-symlink-loop", symlink_loop, r"systems.*self.*(symlink|link) loop", None),
    ("batch_size-zero", put("training/training_data/batch_size", 0), r"batch_size", None),
    ("batch_size-negative", put("training/training_data/batch_size", -3), r"batch_size", None),
    ("batch_size-word", put("training/training_data/batch_size", "huge"), r"batch_size.*huge", None),
    ("batch_size-auto-bad", put("training/training_data/batch_size", "auto:x"), r"batch_size.*auto:x", None),
    ("batch_size-list-length", put("training/training_data/batch_size", [1, 2]), r"batch_size", None),
    ("batch_size-list-zero", put("training/training_data/batch_size", [0]), r"batch_size", None),
    ("sys_probs-length", put("training/training_data/sys_probs", [0.5, 0.5]), r"sys_probs", None),
    ("sys_probs-str", put("training/training_data/sys_probs", ["x"]), r"training/training_data/sys_probs.*'x'", None),
    ("auto_prob-zero-weights", put("training/training_data/auto_prob", "prob_sys_size;0:1:0"), r"auto_prob.*weights", None),
    ("auto_prob-unknown", put("training/training_data/auto_prob", "prob_magic"), r"auto_prob.*prob_magic", None),
    ("numb_steps-negative", put("training/numb_steps", -5), r"training/numb_steps.*-5", None),
    ("numb_steps-str", put("training/numb_steps", "many"), r"numb_steps", None),
    ("numb_steps-float", put("training/numb_steps", 1.5), r"numb_steps", None),
    ("numb_btch-zero", lambda d, s, t: d["training"].update(validation_data={"systems": [str(s)], "numb_btch": 0}),
     r"validation_data/numb_btch", None),
    ("seed-huge", put("training/seed", 2**70), r"training/seed.*2\^63", None),
    ("seed-negative", put("training/seed", -1), r"training/seed.*-1", None),
    ("seed-descriptor-huge", put("model/descriptor/seed", 2**70), r"model/descriptor/seed", None),
    ("seed-fitting-negative", put("model/fitting_net/seed", -7), r"model/fitting_net/seed", None),
    ("seed-str", put("training/seed", "abc"), r"seed", None),
    ("data_stat_nbatch-zero", put("model/data_stat_nbatch", 0), r"model/data_stat_nbatch", None),
    ("learning_rate-int", put("learning_rate", 5), r"learning_rate", None),
    ("start_lr-str", put("learning_rate/start_lr", "x"), r"learning_rate.*start_lr", None),
    ("start_lr-negative", put("learning_rate/start_lr", -1.0), r"learning_rate/start_lr", None),
    ("stop_lr-above-start_lr", put("learning_rate/stop_lr", 1e-2), r"learning_rate: stop_lr .* start_lr", None),
    ("decay_steps-zero", put("learning_rate/decay_steps", 0), r"learning_rate/decay_steps", None),
    ("loss-int", put("loss", 5), r"loss", None),
    ("loss-pref-str", put("loss/start_pref_e", "x"), r"loss.*start_pref_e", None),
    ("loss-pref-negative", put("loss/start_pref_f", -1.0), r"loss/start_pref_f", None),
    ("loss-relative_f-negative", put("loss/relative_f", -1.0), r"loss/relative_f.*-1", None),
    ("disp_file-folder", put("training/disp_file", "/"), r"training/disp_file: '/' is a folder", None),
    ("loss-all-zero", both(*(put(f"loss/{w}_pref_{t}", 0) for w in ("start", "limit") for t in "ef")), r"loss.*prefactor", None),
    ("unknown-key", put("model/descriptor/rcutt", 6.0), r"model/descriptor: undefined key `rcutt`", None),
    # multi-task: head names, dict types, shared layers
    ("head-dot", multi(names=(".", "b")), r"fitting_net_dict.*'\.'", None),
    ("head-dotdot", multi(names=("..", "b")), r"fitting_net_dict.*'\.\.'", None),
    ("head-empty", multi(names=("", "b")), r"fitting_net_dict.*''", None),
    ("head-slash", multi(names=("a/b", "b")), r"fitting_net_dict.*'a/b'", None),
    ("head-space", multi(names=("a b", "b")), r"fitting_net_dict.*'a b'", None),
    ("head-control", multi(names=("a\x01", "b")), r"fitting_net_dict.*'a\\x01'", None),
    ("head-dot-inside", multi(names=("v1.2", "b")), r"fitting_net_dict.*'v1.2'", None),
    ("fitting_net_dict-list", multi(put("model/fitting_net_dict", [1])), r"model/fitting_net_dict", None),
    ("data_dict-unknown-head", multi(put("training/data_dict/c", {})), r"training/data_dict.*'c'", None),
    ("loss_dict-int", multi(put("loss_dict", 5)), r"loss_dict", None),
    ("learning_rate_dict-stop-above-start", multi(put("learning_rate_dict", {"b": {"start_lr": 1e-3, "stop_lr": 1.0}})),
     r"learning_rate_dict/b: stop_lr .* start_lr", None),
    ("shared-activation", multi(put("model/fitting_net_dict/b/activation_function", "relu")),
     r"shared layer 'l0'.*'a'.*'b'.*activation", None),
    ("shared-precision", multi(put("model/fitting_net_dict/b/precision", "float32")), r"shared layer 'l0'.*'a'.*'b'", None),
    ("shared-resnet_dt", multi(put("model/fitting_net_dict/a/neuron", [8, 8]), put("model/fitting_net_dict/b/neuron", [8, 8]),
                               put("model/fitting_net_dict/a/layer_name", [None, "l1", None]),
                               put("model/fitting_net_dict/b/layer_name", [None, "l1", None]),
                               put("model/fitting_net_dict/b/resnet_dt", False)),
     r"shared layer 'l1'.*'a'.*'b'.*(timestep|resnet_dt)", None),
    ("shared-shape", multi(put("model/fitting_net_dict/b/neuron", [16])), r"shared layer 'l0'.*'a'.*'b'", None),
    ("layer_name-length", multi(put("model/fitting_net_dict/b/layer_name", ["l0"])), r"'b'.*layer_name", None),
    ("layer_name-empty", multi(put("model/fitting_net_dict/a/layer_name", ["", None])), r"'a'.*layer_name entry ''", None),
    ("layer_name-slash", multi(put("model/fitting_net_dict/a/layer_name", ["x/y", None])), r"'a'.*layer_name entry 'x/y'", None),
    ("mixed-single-multi", multi(put("loss", {"type": "ener"})), r"cannot be mixed", None),
    # data files
    ("energy-nan", npy("energy", with_value(2, np.nan)), r"energy.npy: .*nan.* frame 2", None),
    ("energy-inf", npy("energy", with_value(1, np.inf)), r"energy.npy: .*inf.* frame 1", None),
    ("force-nan", npy("force", with_value((3, 3 * 7 + 1), np.nan)), r"force.npy: .*nan.* frame 3.* atom 7", None),
    ("force-inf", npy("force", with_value((0, 5), -np.inf)), r"force.npy: .*inf.* frame 0.* atom 1", None),
    ("coord-nan", npy("coord", with_value((1, 3 * 10), np.nan)), r"coord.npy: .*nan.* frame 1.* atom 10", None),
    ("box-inf", npy("box", with_value((2, 0), np.inf)), r"box.npy: .*inf.* frame 2", None),
    ("virial-nan", both(put("loss/start_pref_v", 1.0),
                        lambda d, s, t: np.save(s / "set.000" / "virial.npy", with_value((1, 4), np.nan)(np.zeros((NFRAMES, 9))))),
     r"virial.npy: .*nan.* frame 1", None),
    ("energy-truncated", truncate("energy"), r"energy.npy: cannot be read", None),
    ("coord-truncated", truncate("coord"), r"coord.npy: cannot be read", None),
    ("coord-garbage", write("set.000/coord.npy", b"not a numpy file"), r"coord.npy: cannot be read", None),
    ("coord-strings", npy("coord", lambda a: np.array(["a"] * a.size).reshape(a.shape)), r"coord.npy: .*(dtype|numbers)", None),
    ("energy-object", lambda d, s, t: np.save(s / "set.000" / "energy.npy", np.array([{}, 1], dtype=object), allow_pickle=True),
     r"energy.npy: cannot be read", None),
    ("energy-complex", npy("energy", lambda a: a.astype(np.complex128)), r"energy.npy: .*(dtype|numbers)", None),
    ("force-fewer-frames", npy("force", lambda a: a[:2]), r"force.npy: has 2 frames; coord.npy has 4", None),
    ("force-more-frames", npy("force", lambda a: np.concatenate([a, a])), r"force.npy: has 8 frames; coord.npy has 4", None),
    ("energy-fewer-frames", npy("energy", lambda a: a[:3]), r"energy.npy: has 3 frames; coord.npy has 4", None),
    ("energy-two-per-frame", npy("energy", lambda a: np.stack([a, a], 1)), r"energy.npy: has 2 values per frame; expected 1", None),
    ("force-wrong-width", npy("force", lambda a: a[:, :-3]), r"force.npy: has 573 values per frame; expected 576", None),
    ("force-flat", npy("force", lambda a: a.reshape(-1)[:-1]), r"force.npy", None),
    ("box-fewer-frames", npy("box", lambda a: a[:1]), r"box.npy: has 1 frame; coord.npy has 4", None),
    ("box-six-values", npy("box", lambda a: a[:, :6]), r"box.npy: has 6 values per frame; expected 9", None),
    ("box-flat-odd", npy("box", lambda a: a.reshape(-1)[:-2]), r"box.npy", None),
    ("box-zero-volume", npy("box", lambda a: np.zeros_like(a)), r"box.npy: the cell of frame 0 has zero volume", None),
    ("box-missing", remove("set.000/box.npy"), r"box.npy: not found", None),
    ("coord-missing", remove("set.000/coord.npy"), r"coord.npy: not found", None),
    ("coord-wrong-width", npy("coord", lambda a: a[:, :-3]), r"coord.npy: has 573 values per frame but type.raw lists 192", None),
    ("coord-zero-frames", npy("coord", lambda a: a[:0]), r"coord.npy: .*(no|0) frames", None),
    ("coord-scalar", npy("coord", lambda a: np.float64(1.0)), r"coord.npy", None),
    ("overlap", both(put("model/descriptor/sel", "auto"), overlap(2, 5, 9)), r"sys.*frame 2.*atoms 5 and 9", None),
    ("overlap-fixed-sel", overlap(1, 3, 4), r"sys.*frame 1.*atoms 3 and 4", None),
    ("no-set-folder", remove("set.000"), r"no set\.\* folder", None),
    ("set-missing-label", second_set_without_force, r"force.npy is missing in set.001", None),
    ("type-raw-words", write("type.raw", "O H H\n"), r"type.raw: expected whitespace-separated integer", None),
    ("type-raw-float", write("type.raw", "0 1.5\n"), r"type.raw: expected whitespace-separated integer", None),
    ("type-raw-huge-int", write("type.raw", "99999999999999999999999 " * 192), r"type.raw: expected whitespace-separated integer", None),
    ("type-raw-empty", write("type.raw", ""), r"type.raw: lists no atoms", None),
    ("type-raw-negative", write("type.raw", " ".join(["-1"] * 192)), r"type.raw: atom types must be non-negative", None),
    ("type-raw-missing", remove("type.raw"), r"not a (deepmd/npy system|data system)", None),
    ("type-raw-binary", write("type.raw", b"\xff\xfe\x00"), r"type.raw", None),
    ("type_map-raw-empty", write("type_map.raw", ""), r"type_map.raw: (is empty|names no)", None),
    ("type_map-raw-duplicates", write("type_map.raw", "O\nO\n"), r"type_map.raw: .*'O'.*(twice|duplicate)", None),
    ("type_map-raw-unknown", write("type_map.raw", "O\nC\n"), r"type_map.raw: element 'C' is not in the model's type_map", None),
    ("type_map-raw-too-short", write("type_map.raw", "O\n"), r"type_map.raw: names 1 types but type.raw uses 2", None),
    ("too-many-types", both(remove("type_map.raw"), put("model/type_map", ["O"]), put("model/descriptor/sel", [46])),
     r"type.raw: uses 2 types but the model's type_map has 1", None),
    ("real_atom_types-float", lambda d, s, t: np.save(s / "set.000" / "real_atom_types.npy", np.full((NFRAMES, 192), 0.5)),
     r"real_atom_types.npy: atom types must be integers", None),
    ("real_atom_types-frames", lambda d, s, t: np.save(s / "set.000" / "real_atom_types.npy", np.zeros((1, 192))),
     r"real_atom_types.npy: has 1 frame; coord.npy has 4", None),
    ("fparam-missing", put("model/fitting_net/numb_fparam", 1), r"fparam.npy: not found \(required\)", None),
    ("fparam-nan", both(put("model/fitting_net/numb_fparam", 1),
                        lambda d, s, t: np.save(s / "set.000" / "fparam.npy", with_value(3, np.nan)(np.ones((NFRAMES, 1))))),
     r"fparam.npy: .*nan.* frame 3", None),
    ("validation-energy-nan", lambda d, s, t: (shutil.copytree(s, t / "valid"),
                                               npy("energy", with_value(0, np.nan))(d, t / "valid", t),
                                               d["training"].update(validation_data={"systems": [str(t / "valid")]})),
     r"valid/set.000/energy.npy: .*nan.* frame 0", None),
    # other commands
    ("init-model-missing", lambda d, s, t: None, r"nothere.pt", ["train", "input.json", "--init-model", "nothere.pt"]),
    ("restart-and-init-model", lambda d, s, t: None, r"--restart and --init-model", ["train", "-r", "a.pt", "-i", "b.pt"]),
    ("test-negative-n", lambda d, s, t: None, r"-n/--numb-test.*-5", ["test", "-m", "x.pth", "-n", "-5"]),
    ("test-missing-model", lambda d, s, t: None, r"nothere.pth", ["test", "-m", "nothere.pth"]),
    ("freeze-missing-checkpoint", lambda d, s, t: None, r"nowhere", ["freeze", "-c", "nowhere"]),
    ("show-missing", lambda d, s, t: None, r"nothing.pt", ["show", "nothing.pt"]),
    ("restart-missing", lambda d, s, t: None, r"gone.pt", ["train", "--restart", "gone.pt"]),
]


def invoke(args: list, cwd: Path, monkeypatch, env: Optional[dict] = None):
    """The CLI in-process, in ``cwd``; MTCORE_DEBUG from the caller's shell does not leak in."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, env={"MTCORE_DEBUG": "", **(env or {})})


@pytest.mark.parametrize("case, mutate, expected, args", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, mutate, expected, args, tiny_system, tmp_path, monkeypatch):
    system = tmp_path / "sys"
    shutil.copytree(tiny_system, system)
    doc = base_doc(system)
    mutate(doc, system, tmp_path)
    if "__raw__" in doc:
        (tmp_path / "input.json").write_text(doc["__raw__"])
    else:
        (tmp_path / "input.json").write_text(json.dumps(doc))
    result = invoke(args or TRAIN, tmp_path, monkeypatch)
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert result.exit_code == 1, (result.exit_code, everything, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, everything
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(expected, lines[0]), lines[0]
    if os.environ.get("MTCORE_SHOW_LINES"):
        print(f"\n{case}: {lines[0]}")
    assert not result.stdout.strip(), result.stdout  # failed before anything was printed or trained
    assert not list(tmp_path.glob("model.ckpt*")), "nothing may be written"


def test_the_matrix_is_large():
    assert len(CASES) >= 80


# --- what is accepted on purpose ------------------------------------------------------------------
def _write(tmp_path: Path, doc: dict) -> None:
    (tmp_path / "input.json").write_text(json.dumps(doc))


def test_numb_steps_0_computes_statistics_and_saves(tiny_system, tmp_path, monkeypatch):
    """numb_steps 0 is allowed (DeePMD-kit: statistics only): exit 0, a step-0 checkpoint that
    holds the statistics-derived energy bias, no training step; it freezes like any other."""
    import torch

    doc = base_doc(tiny_system)
    doc["training"]["numb_steps"] = 0
    _write(tmp_path, doc)
    result = invoke(TRAIN, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.stdout + result.stderr
    state = torch.load(tmp_path / "model.ckpt-0.pt", weights_only=False)
    assert state["step"] == 0
    bias = state["model"]["heads.default.bias_atom_e"]
    assert torch.all(torch.isfinite(bias)) and float(bias.abs().max()) > 1.0  # water: about -94 and -187 eV
    frozen = invoke(["freeze", "-o", "zero.pth"], tmp_path, monkeypatch)
    assert frozen.exit_code == 0, frozen.stdout + frozen.stderr
    assert (tmp_path / "zero.pth").is_file()


def test_batch_size_beyond_the_frames_warns_once_naming_the_system(tiny_system, tmp_path, monkeypatch):
    doc = base_doc(tiny_system)
    doc["training"]["training_data"]["batch_size"] = 50
    _write(tmp_path, doc)
    result = invoke(TRAIN, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.stdout + result.stderr
    warned = [line for line in result.stderr.splitlines() if "batch_size" in line]
    assert len(warned) == 1, result.stderr
    assert warned[0].startswith("warning: training/training_data/batch_size: 50 is more than the 4 frames of")
    assert str(tiny_system) in warned[0]


def test_a_link_loop_below_a_systems_folder_ends_and_finds_each_system_once(tiny_system, tmp_path):
    from mtcore.data.loading import expand_systems
    from mtcore.plugins import get_registry

    root = tmp_path / "tree"
    root.mkdir()
    shutil.copytree(tiny_system, root / "real")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "linked").symlink_to(tiny_system, target_is_directory=True)
    found = expand_systems(str(root), get_registry(), "t")
    assert sorted(p.name for p in found) == ["linked", "real"]


@pytest.mark.parametrize("ratio", [-3.0, 0.0, 0.4, 1.0, 7.0])
def test_loss_prefactors_stay_between_limit_and_start(ratio):
    """Whatever lr ratio a schedule gives, the ener loss weighs each term between its limit and
    start prefactor (a growing rate made the energy prefactor negative)."""
    import torch

    from mtcore_builtins.losses.ener import EnerLoss

    params = {f"{w}_pref_{t}": 0.0 for w in ("start", "limit") for t in ("e", "f", "v", "ae", "pf")}
    params.update(start_pref_e=0.02, limit_pref_e=1.0)
    loss = EnerLoss(params, "h")
    natoms = 3
    pred = {"energy": torch.tensor([[2.0]], dtype=torch.float64)}
    label = {"energy": torch.tensor([[0.0]], dtype=torch.float64)}
    value, metrics = loss(pred, label, {"energy": 1.0}, torch.zeros(1, natoms, dtype=torch.long), ratio, metrics=True)
    pref = float(value) * natoms / 4.0
    clamped = min(max(ratio, 0.0), 1.0)
    assert abs(pref - (1.0 + (0.02 - 1.0) * clamped)) < 1e-12
    assert 0.02 - 1e-12 <= pref <= 1.0 + 1e-12
    assert math.isfinite(metrics["rmse"])


def test_a_growing_learning_rate_is_refused_by_the_schedule_too():
    from mtcore.errors import MtcoreError
    from mtcore.train.lr import ExpDecay

    with pytest.raises(MtcoreError, match="stop_lr"):
        ExpDecay(1e-3, 1e-2, 10, 100)
    with pytest.raises(MtcoreError, match="numb_steps"):
        ExpDecay(1e-3, 1e-5, 10, -5)


def test_valid_head_names_are_accepted(tiny_system, tmp_path, monkeypatch):
    from mtcore.config import normalize

    config = normalize(multi_doc(tiny_system, names=("ccsd-t", "wB97M_D3", "2")), tmp_path)
    assert list(config.heads) == ["ccsd-t", "wB97M_D3", "2"]


def test_shared_layers_with_the_same_function_under_two_names_are_accepted(tiny_system, tmp_path):
    """'none' and 'linear' are one function: sharing is fine (the check compares functions)."""
    from mtcore.config import normalize
    from mtcore.model.build import build_model

    doc = multi_doc(tiny_system)
    doc["model"]["fitting_net_dict"]["a"]["activation_function"] = "linear"
    doc["model"]["fitting_net_dict"]["b"]["activation_function"] = "none"
    model = build_model(normalize(doc, tmp_path))
    assert model.heads["a"].nets[0].blocks[0].dense is model.heads["b"].nets[0].blocks[0].dense


# --- --debug and internal errors -------------------------------------------------------------------
def _break_config(monkeypatch, exc: Exception) -> None:
    import mtcore.config

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(mtcore.config, "load_config", broken)


def test_an_internal_error_is_one_line_without_debug(tmp_path, monkeypatch):
    _break_config(monkeypatch, ZeroDivisionError("boom\nsecond line"))
    result = invoke(["train", "input.json"], tmp_path, monkeypatch, env={"MTCORE_DEBUG": ""})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert lines == ["internal error: ZeroDivisionError: boom ... (run with --debug for the traceback)"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    _break_config(monkeypatch, ZeroDivisionError("boom"))
    args = ["--debug", "train", "input.json"] if how == "flag" else ["train", "input.json"]
    result = invoke(args, tmp_path, monkeypatch, env={"MTCORE_DEBUG": "1" if how == "env" else ""})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError: boom" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "internal error: ZeroDivisionError: boom"


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path, monkeypatch):
    result = invoke(["--debug", "train", "nowhere.json"], tmp_path, monkeypatch, env={"MTCORE_DEBUG": ""})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: nowhere.json: input file not found"


def test_messages_are_printed_verbatim(tmp_path, monkeypatch):
    """Rich markup and emoji codes in a message (paths, 'a:b:w') are not interpreted."""
    from mtcore.errors import MtcoreError

    _break_config(monkeypatch, MtcoreError("odd [bold]path[/bold] :b: [/]"))
    result = invoke(["train", "input.json"], tmp_path, monkeypatch, env={"MTCORE_DEBUG": ""})
    assert result.stderr.strip() == "error: odd [bold]path[/bold] :b: [/]"


# --- mtcore test --json -------------------------------------------------------------------------
def test_json_output_has_null_and_a_reason_instead_of_nan(tmp_path, monkeypatch):
    import mtcore.evaluate as evaluate

    bad = evaluate.ErrorStat()
    bad.add(np.array([1.0, np.nan]))
    good = evaluate.ErrorStat()
    good.add(np.array([1.0, -3.0]))
    result_ = evaluate.TestResult("sys", 2, {"Energy": bad, "Force": good})

    def fake_run_test(*args, **kwargs):
        return [result_], {"Energy": bad, "Force": good, "Virial": evaluate.ErrorStat()}

    monkeypatch.setattr(evaluate, "run_test", fake_run_test)
    result = invoke(["test", "-m", "m.pth", "--json"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.stderr

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    report = json.loads(result.stdout, parse_constant=no_constants)
    energy = report["combined"]["Energy"]
    assert energy["mae"] is None and energy["rmse"] is None and "not finite" in energy["why"]
    assert report["combined"]["Virial"] == {"mae": None, "rmse": None, "why": "no values were compared"}
    force = report["combined"]["Force"]
    assert set(force) == {"mae", "rmse"}
    assert abs(force["mae"] - 2.0) < 1e-12 and abs(force["rmse"] - math.sqrt(5.0)) < 1e-12
    assert report["systems"][0]["errors"]["Energy"]["mae"] is None


@pytest.mark.parametrize("what", ["coords", "boxes", "energy", "no_frames", "type"])
def test_any_loader_s_output_is_checked(what, tiny_system):
    """The checks do not depend on the deepmd/npy loader: a third-party loader that hands over
    NaN, no frames or types beyond the type_map gets the same one-line refusal."""
    from types import SimpleNamespace

    from mtcore.data.loading import load_system
    from mtcore.data.system import SystemData
    from mtcore.errors import MtcoreError

    coords = np.zeros((2, 3, 3))
    coords[:, :, 0] = [0.0, 1.0, 2.0]
    system = SystemData("fake", np.zeros((2, 3), dtype=np.int64), coords, np.tile(np.eye(3) * 10, (2, 1, 1)),
                        {"energy": np.zeros((2, 1))}, [2])
    expected = {"coords": "coordinates hold NaN", "boxes": "cells hold NaN", "energy": "energy hold NaN",
                "no_frames": "no frames", "type": "atom types outside 0..1"}[what]
    if what == "coords":
        system.coords[1, 2, 1] = np.nan
    elif what == "boxes":
        system.boxes[0, 0, 0] = np.inf
    elif what == "energy":
        system.labels["energy"][1, 0] = np.nan
    elif what == "no_frames":
        system = SystemData("fake", np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3, 3)), None)
    else:
        system.atypes[0, 1] = 5
    loader = SimpleNamespace(detect=lambda path: True, load=lambda *args: system)
    registry = SimpleNamespace(entries=lambda kind: [SimpleNamespace(registration=loader)], names=lambda kind: ["fake"],
                               loader_for=lambda path: loader)
    with pytest.raises(MtcoreError, match=expected):
        load_system(Path("fake"), ["O", "H"], [], "set", registry)


def test_a_stored_document_is_rebuilt_as_trained(tiny_system):
    """Value checks apply to new inputs; a checkpoint's stored document (here with a negative
    descriptor seed, which torch accepted) is still rebuilt for --restart and freeze."""
    from mtcore.config import config_from_document, normalize
    from mtcore.errors import MtcoreError

    doc = base_doc(tiny_system)
    doc["model"]["descriptor"]["seed"] = -7
    with pytest.raises(MtcoreError, match="model/descriptor/seed"):
        normalize(doc, Path("/"))
    config = config_from_document(doc)
    assert config.model["descriptor"]["seed"] == -7
