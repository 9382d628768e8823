"""Value checks the dargs schema cannot express: ranges, names, and settings that must agree.

dargs checks types and keys; these checks catch inputs of the right type that would otherwise
train silently on something else (``neuron: []`` becoming the default widths, a negative step
count, a learning rate that grows so loss prefactors go negative, duplicate element names) or fail
deep inside numpy/torch with a traceback (a seed beyond 64 bits, a float layer width). Each error
is one line naming the key path.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from mtcore.errors import MtcoreError

SEED_MAX = 2**63 - 1  # accepted by numpy (any n >= 0) and torch (up to 2^64-1) alike, and fits an int64

# Head names become module names (no '.' in torch), file names (frozen_model_<head>.pth) and
# lcurve column suffixes: letters, digits, '_' and '-', starting with a letter, digit or '_'.
HEAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_finite_numbers(node: Any, where: str = "") -> None:
    """JSON has no NaN/Infinity, but Python's reader accepts them: refuse them anywhere."""
    if isinstance(node, float) and not math.isfinite(node):
        raise MtcoreError(f"{where or 'input'}: {node} is not a finite number")
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite_numbers(value, f"{where}/{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_finite_numbers(value, f"{where}[{index}]")


def check_head_name(name: Any, where: str = "model/fitting_net_dict") -> None:
    if not isinstance(name, str) or not HEAD_NAME.fullmatch(name):
        raise MtcoreError(
            f"{where}: head name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-' "
            "(not starting with '-'); no '.', '/', spaces or control characters"
        )


def check_type_map(type_map: Any, where: str = "model/type_map") -> None:
    if type_map is None:
        return
    if not isinstance(type_map, list) or not all(isinstance(n, str) for n in type_map):
        raise MtcoreError(f'{where}: expected a list of element names (e.g. ["O", "H"]), got {type_map!r}')
    for name in type_map:
        if not name or name != name.strip() or any(c.isspace() for c in name):
            raise MtcoreError(f"{where}: element name {name!r} is empty or contains spaces")
    repeated = sorted({n for n in type_map if type_map.count(n) > 1})
    if repeated:
        raise MtcoreError(f"{where}: names {', '.join(repr(n) for n in repeated)} twice; each type needs its own name")


def check_seed(value: Any, where: str) -> None:
    if value is None:
        return
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise MtcoreError(f"{where}: {value!r} is not a seed; use an integer from 0 to 2^63-1, or null for a random one")


def check_neuron(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise MtcoreError(f"{where}: expected a non-empty list of layer widths, got {value!r}")
    for width in value:
        if not _is_int(width) or width < 1:
            raise MtcoreError(f"{where}: layer widths must be positive integers, got {width!r}")


def check_sel(value: Any, where: str) -> None:
    """``sel``: a count, one count per type, "auto" or "auto:<factor>"."""
    if isinstance(value, str):
        if value == "auto":
            return
        if value.startswith("auto:"):
            try:
                if float(value[5:]) > 0:
                    return
            except ValueError:
                pass
        raise MtcoreError(f'{where}: {value!r} is not "auto", "auto:<factor>", a count or a list of counts per type')
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_int(v) and v >= 0 for v in values):
        raise MtcoreError(f"{where}: expected non-negative integer neighbour counts, got {value!r}")


def check_network_settings(node: Any, where: str) -> None:
    """Every ``neuron`` and ``seed`` inside a model section (descriptors, hybrids, fitting nets,
    type embedding), wherever a plugin puts them."""
    if isinstance(node, dict):
        rcut = node.get("rcut")
        if isinstance(rcut, (int, float)) and not isinstance(rcut, bool) and not rcut > 0:
            raise MtcoreError(f"{where}/rcut: must be a positive distance, got {rcut}")
        for key, value in node.items():
            path = f"{where}/{key}"
            if key == "neuron" and value is not None:
                check_neuron(value, path)
            elif key == "seed":
                check_seed(value, path)
            elif key == "sel":
                check_sel(value, path)
            elif key == "rcut_smth" and isinstance(value, (int, float)) and value < 0:
                raise MtcoreError(f"{path}: must be between 0 and rcut, got {value!r}")
            else:
                check_network_settings(value, path)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_network_settings(value, f"{where}[{index}]")


def check_learning_rate(section: dict, where: str) -> None:
    start, stop = section.get("start_lr"), section.get("stop_lr")
    for key, value in (("start_lr", start), ("stop_lr", stop)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise MtcoreError(f"{where}/{key}: must be a positive number, got {value!r}")
    if stop > start:
        raise MtcoreError(
            f"{where}: stop_lr ({stop:g}) is larger than start_lr ({start:g}); the rate decays from start_lr "
            "to stop_lr (loss prefactors move from start_pref to limit_pref with it)"
        )
    decay = section.get("decay_steps")
    if decay is not None and (not _is_int(decay) or decay < 1):
        raise MtcoreError(f"{where}/decay_steps: must be at least 1, got {decay!r}")


def check_data_section(section: Optional[dict], where: str) -> None:
    if section is None:
        return
    numb_btch = section.get("numb_btch")
    if numb_btch is not None and (not _is_int(numb_btch) or numb_btch < 1):
        raise MtcoreError(f"{where}/numb_btch: must be at least 1, got {numb_btch!r}")
    systems = section.get("systems")
    if isinstance(systems, list) and not systems:
        raise MtcoreError(f"{where}/systems: empty; give at least one system folder")


def check_training(training: dict) -> None:
    steps = training.get("numb_steps")
    if not _is_int(steps) or steps < 0:
        raise MtcoreError(f"training/numb_steps: must be an integer of at least 0 (0: statistics only), got {steps!r}")
    check_seed(training.get("seed"), "training/seed")
    for key in ("disp_freq", "save_freq"):
        value = training.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise MtcoreError(f"training/{key}: must be a non-negative integer, got {value!r}")
    limit = training.get("max_nonfinite_steps")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise MtcoreError(f"training/max_nonfinite_steps: must be an integer of at least 1, got {limit!r}")
    disp_file = training.get("disp_file")
    if disp_file is not None and (not disp_file.strip() or disp_file.endswith(("/", os.sep)) or Path(disp_file).is_dir()):
        raise MtcoreError(f"training/disp_file: {disp_file!r} is a folder; give a file name (e.g. 'lcurve.out')")
    check_best_settings(training, "training")


def check_model(model: dict) -> None:
    check_type_map(model.get("type_map"))
    nbatch = model.get("data_stat_nbatch")
    if nbatch is not None and (not _is_int(nbatch) or nbatch < 1):
        raise MtcoreError(f"model/data_stat_nbatch: must be at least 1, got {nbatch!r}")
    for key in ("data_stat_nframes", "neighbor_stat_nframes"):
        value = model.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise MtcoreError(f"model/{key}: must be an integer of at least 1, got {value!r}")
    for key in ("descriptor", "type_embedding", "fitting_net"):
        if model.get(key) is not None:
            check_network_settings(model[key], f"model/{key}")


def check_loss(section: dict, where: str) -> None:
    """Loss prefactors (``start_pref_*``, ``limit_pref_*``, ``pref``, ``pref_atomic``) weigh squared
    errors: a negative one would reward errors."""
    for key, value in section.items():
        if key.startswith(("start_pref", "limit_pref", "pref")) and isinstance(value, (int, float)) and value < 0:
            raise MtcoreError(f"{where}/{key}: must not be negative, got {value!r}")
    relative_f = section.get("relative_f")
    if isinstance(relative_f, (int, float)) and relative_f <= 0:
        raise MtcoreError(f"{where}/relative_f: must be positive (it is added to |F| in the denominator), got {relative_f!r}")


#: keys of the fixed-set validation (best model per head, early stopping); see schema.best_model_arguments
BEST_MODEL_KEYS = ("validation_freq", "validation_frames", "best_metric", "patience")


def check_best_settings(section: Optional[dict], where: str) -> None:
    """validation_freq, validation_frames and patience count steps, frames and evaluations: a
    zero or negative value would silently never validate (or stop at once); null means the
    default. best_metric names are checked against the head's loss when the loss is built."""
    if not section:
        return
    for key in ("validation_freq", "validation_frames", "patience"):
        value = section.get(key)
        if key == "validation_frames" and value == "all":
            continue
        if value is not None and (not _is_int(value) or value < 1):
            also = ', "all"' if key == "validation_frames" else ""
            raise MtcoreError(f"{where}/{key}: must be a positive integer{also} or null, got {value!r}")
    metric = section.get("best_metric")
    if metric is not None and (not isinstance(metric, str) or not metric.strip()):
        raise MtcoreError(f"{where}/best_metric: expected a metric name such as 'rmse_f', got {metric!r}")
