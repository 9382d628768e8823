"""benchmarks/deepmd_v3_input.py: the v2 multi-task examples in DeePMD-kit 3's layout (bench.py's side-by-side)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import absolute_document, case_input  # noqa: E402
from deepmd_v3_input import v3_multi_task  # noqa: E402


def test_ener_dipole_layout_and_widened_atomic_labels(tmp_path):
    doc = absolute_document(case_input("water_multi_task/ener_dipole"))
    v3 = v3_multi_task(doc, tmp_path)
    model = v3["model"]
    assert model["shared_dict"] == {"type_map_all": ["O", "H"], "shared_descriptor": doc["model"]["descriptor"]}
    assert set(model["model_dict"]) == {"water_dipole", "water_ener"}
    for head, entry in model["model_dict"].items():
        assert entry["descriptor"] == "shared_descriptor" and entry["type_map"] == "type_map_all"
        assert entry["fitting_net"]["neuron"] == doc["model"]["fitting_net_dict"][head]["neuron"]
    assert v3["training"]["model_prob"] == {"water_dipole": 10.0, "water_ener": 20.0}
    assert "fitting_weight" not in v3["training"]
    assert v3["loss_dict"] == doc["loss_dict"]

    source = Path(doc["training"]["data_dict"]["water_dipole"]["training_data"]["systems"][0])
    copied = Path(v3["training"]["data_dict"]["water_dipole"]["training_data"]["systems"][0])
    assert copied != source and tmp_path in copied.parents
    atype = np.loadtxt(source / "type.raw", dtype=int)
    narrow = np.load(next(source.glob("set.*/atomic_dipole.npy")))
    wide = np.load(next(copied.glob("set.*/atomic_dipole.npy"))).reshape(narrow.shape[0], atype.size, 3)
    np.testing.assert_array_equal(wide[:, atype == 0].reshape(narrow.shape), narrow)  # sel_type [0]: O rows, in order
    assert not wide[:, atype != 0].any()
    # a system without atomic labels (the global dipoles) and the energy head's data are used in place
    assert v3["training"]["data_dict"]["water_dipole"]["training_data"]["systems"][1] == \
        doc["training"]["data_dict"]["water_dipole"]["training_data"]["systems"][1]
    assert v3["training"]["data_dict"]["water_ener"] == doc["training"]["data_dict"]["water_ener"]


def test_layer_name_is_dropped_and_weights_carried(tmp_path):
    doc = absolute_document(case_input("water_multi_task/two_levels"))
    v3 = v3_multi_task(doc, tmp_path)
    for entry in v3["model"]["model_dict"].values():
        assert "layer_name" not in entry["fitting_net"]
    assert v3["training"]["model_prob"] == {"ccsd": 2.0, "wb97m": 1.0}
    assert not any(tmp_path.iterdir())  # energy data only: nothing copied
