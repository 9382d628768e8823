"""Input handling: normalisation, defaults and aliases as DeePMD-kit v2, strict checks, modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import small_input
from mtcore.config import detect_mode, load_config, normalize
from mtcore.errors import MtcoreError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_aliases_and_comments(tmp_path):
    doc = small_input(tmp_path)
    doc["model"]["descriptor"] = {"type": "se_a", "sel": [46, 92], "n_axis_neuron": 8, "_comment": "x"}
    doc["model"]["fitting_net"] = {"n_neuron": [16, 16]}
    doc["training"]["stop_batch"] = doc["training"].pop("numb_steps")
    config = normalize(doc, tmp_path)
    descriptor = config.model["descriptor"]
    assert descriptor["type"] == "se_e2_a" and descriptor["axis_neuron"] == 8
    assert descriptor["rcut"] == 6.0 and descriptor["rcut_smth"] == 0.5 and descriptor["neuron"] == [10, 20, 40]
    assert "_comment" not in descriptor
    fitting = config.heads["default"].fitting
    assert fitting["neuron"] == [16, 16] and fitting["resnet_dt"] is True and fitting["type"] == "ener"
    assert config.training["numb_steps"] == 20 and config.training["disp_file"] == "lcurve.out"
    assert config.heads["default"].learning_rate["decay_steps"] == 10


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["model"]["descriptor"].update(rcutt=6.0), "model/descriptor: undefined key `rcutt`.*Did you mean: rcut"),
        (lambda d: d["training"].update(numb_stpes=3), "training: undefined key `numb_stpes`"),
        (lambda d: d["model"]["descriptor"].update(rcut="six"), "model/descriptor: key `rcut` gets wrong value type"),
        (lambda d: d["model"]["descriptor"].update(type="se_nope"), "invalid choice `se_nope`"),
        (lambda d: d["model"].update(fitting_net_dict={"a": {}}), "cannot be mixed"),
        (lambda d: d["training"].pop("training_data"), "training/training_data is missing"),
    ],
)
def test_bad_input_names_the_key(tmp_path, mutate, message):
    doc = small_input(tmp_path)
    mutate(doc)
    with pytest.raises(MtcoreError, match=message) as info:
        normalize(doc, tmp_path)
    assert "\n" not in str(info.value)


def test_relative_systems_resolve_against_the_input_folder(tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    doc = small_input(tmp_path, train_systems=["../data/data_0"], valid_systems=["../data/data_3"])
    (folder / "input.json").write_text(json.dumps(doc))
    config = load_config(folder / "input.json")
    assert config.heads["default"].training_data["systems"] == [str((tmp_path / "data" / "data_0").resolve())]


def test_unreadable_json_is_one_line(tmp_path):
    path = tmp_path / "input.json"
    path.write_text('{"model": {"type_map": ["O"],, }')
    with pytest.raises(MtcoreError, match=r"input.json: not valid JSON: .* line 1 column"):
        load_config(path)


def test_mode_detection():
    assert detect_mode({"model": {"fitting_net_dict": {"a": {}}}, "training": {"data_dict": {"a": {}}}}) is True
    assert detect_mode({"model": {"fitting_net": {}}, "training": {"training_data": {}}}) is False
    with pytest.raises(MtcoreError, match="training/data_dict is missing"):
        detect_mode({"model": {"fitting_net_dict": {"a": {}}}, "training": {}})
    with pytest.raises(MtcoreError, match=r"single-task keys \(loss\) and multi-task keys \(model/fitting_net_dict"):
        detect_mode({"model": {"fitting_net_dict": {"a": {}}}, "loss": {}, "training": {"data_dict": {"a": {}}}})
