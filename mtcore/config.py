"""Reading an input file: mode detection, normalisation, the per-head view the trainer uses.

Single-task inputs (``model/fitting_net``, ``loss``, ``training/training_data``) and multi-task
inputs (``model/fitting_net_dict``, ``loss_dict``, ``training/data_dict``, optional
``training/fitting_weight`` and ``learning_rate_dict``) both become a :class:`RunConfig` with
named heads; a single-task run has one head called ``default``. The normalised document (with
data paths made absolute) is what checkpoints store and what ``--restart`` uses.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mtcore.errors import MtcoreError
from mtcore.input_checks import (
    BEST_MODEL_KEYS,
    check_best_settings,
    check_data_section,
    check_finite_numbers,
    check_head_name,
    check_learning_rate,
    check_loss,
    check_model,
    check_network_settings,
    check_training,
    check_type_map,
)
from mtcore.model.precision import policy_of, warn_disagreeing
from mtcore.plugins import Registry, get_registry
from mtcore.schema import (
    check,
    data_dict_entry_argument,
    fitting_argument,
    input_argument,
    learning_rate_argument,
    loss_argument,
)

SINGLE_HEAD = "default"


@dataclass
class HeadConfig:
    """Everything about one head, normalised."""

    name: str
    fitting: dict
    loss: dict
    learning_rate: dict
    training_data: Optional[dict]
    validation_data: Optional[dict]
    weight: float  # sampling probability; 0 = not trained
    #: validation_freq, validation_frames, best_metric, patience for this head (None = default);
    #: the per-head value (multi-task data_dict) where given, else the training one
    best: dict = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return self.weight > 0


@dataclass
class RunConfig:
    multi_task: bool
    document: dict  # the normalised input (absolute data paths); stored in checkpoints
    heads: dict[str, HeadConfig] = field(default_factory=dict)

    @property
    def model(self) -> dict:
        return self.document["model"]

    @property
    def training(self) -> dict:
        return self.document["training"]

    @property
    def auto_weights(self) -> bool:
        """``fitting_weight: "auto"``: the trainer sets each head's weight from its frame count."""
        return self.multi_task and self.training.get("fitting_weight") == AUTO_WEIGHT

    @property
    def type_map(self) -> Optional[list[str]]:
        return self.model.get("type_map")

    def trained_heads(self) -> list[str]:
        return [name for name, head in self.heads.items() if head.trained]


def read_input(path: Path) -> dict:
    """Load a JSON (or YAML, if PyYAML is installed) input file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MtcoreError(f"{path}: input file not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore
        except ImportError:
            raise MtcoreError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MtcoreError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MtcoreError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise MtcoreError(f"{path}: the input must be a JSON object with model, training, ... sections")
    return data


_SECTIONS = {
    "model": dict,
    "training": dict,
    "learning_rate": dict,
    "loss": dict,
    "learning_rate_dict": dict,
    "loss_dict": dict,
}
_NESTED = {
    ("model", "descriptor"): dict,
    ("model", "fitting_net"): dict,
    ("model", "fitting_net_dict"): dict,
    ("model", "type_embedding"): dict,
    ("training", "training_data"): dict,
    ("training", "validation_data"): dict,
    ("training", "data_dict"): dict,
}

#: ``training/fitting_weight: "auto"``: each trained head drawn with probability proportional to
#: its number of training frames (resolved by the trainer once the data are read)
AUTO_WEIGHT = "auto"


def _check_sections(doc: dict) -> None:
    """Sections of the wrong kind (``"descriptor": 5``, ``training_data`` as a list) named before
    mode detection or the schema look inside them."""
    for key, kind in _SECTIONS.items():
        value = doc.get(key)
        if value is not None and not isinstance(value, kind):
            raise MtcoreError(f"{key}: expected a dict (JSON object), got {type(value).__name__} {value!r}")
    for (outer, key), kind in _NESTED.items():
        value = (doc.get(outer) or {}).get(key)
        if value is not None and not isinstance(value, kind):
            raise MtcoreError(f"{outer}/{key}: expected a dict (JSON object), got {type(value).__name__} {value!r}")
    weights = (doc.get("training") or {}).get("fitting_weight")
    if weights is not None and not isinstance(weights, dict) and weights != AUTO_WEIGHT:
        raise MtcoreError(
            f'training/fitting_weight: expected a dict head → weight or "{AUTO_WEIGHT}" (weights ∝ training '
            f"frames), got {type(weights).__name__} {weights!r}"
        )
    for missing in ("model", "training"):
        if missing not in doc:
            raise MtcoreError(f"{missing}: section missing; an input needs model, training (and usually learning_rate, loss)")
    if doc["model"].get("descriptor") is None:
        raise MtcoreError("model/descriptor: missing; give the shared descriptor (e.g. {\"type\": \"se_e2_a\", ...})")


def _present(doc: dict, *keys: str) -> bool:
    node: Any = doc
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return False
        node = node[key]
    return True


def detect_mode(doc: dict) -> bool:
    """True for multi-task. Mixing the two families is an error naming the offending keys."""
    single = {
        "model/fitting_net": _present(doc, "model", "fitting_net"),
        "loss": _present(doc, "loss"),
        "training/training_data": _present(doc, "training", "training_data"),
        "training/validation_data": _present(doc, "training", "validation_data"),
    }
    multi = {
        "model/fitting_net_dict": _present(doc, "model", "fitting_net_dict"),
        "loss_dict": _present(doc, "loss_dict"),
        "learning_rate_dict": _present(doc, "learning_rate_dict"),
        "training/data_dict": _present(doc, "training", "data_dict"),
        "training/fitting_weight": _present(doc, "training", "fitting_weight"),
    }
    used_single = [k for k, v in single.items() if v]
    used_multi = [k for k, v in multi.items() if v]
    if used_single and used_multi:
        raise MtcoreError(
            "single-task keys (" + ", ".join(used_single) + ") and multi-task keys (" + ", ".join(used_multi)
            + ") cannot be mixed in one input"
        )
    if used_multi:
        for needed in ("model/fitting_net_dict", "training/data_dict"):
            if not multi[needed]:
                raise MtcoreError(f"multi-task input: {needed} is missing (it is required with " + ", ".join(used_multi) + ")")
        return True
    for needed in ("model/fitting_net", "training/training_data"):
        if not single[needed]:
            raise MtcoreError(
                f"{needed} is missing: give model/fitting_net and training/training_data (single-task) "
                "or model/fitting_net_dict and training/data_dict (multi-task)"
            )
    return False


def _absolute(path: str, base_dir: Path) -> str:
    """``path`` made absolute against the input's folder; a link loop is left for the loader to
    name (resolving it would raise from inside pathlib)."""
    if Path(path).is_absolute():
        return path
    try:
        return str((base_dir / path).resolve())
    except (RuntimeError, OSError):
        return os.path.abspath(base_dir / path)


def _absolute_systems(section: Optional[dict], base_dir: Path) -> Optional[dict]:
    if section is None:
        return None
    out = dict(section)
    systems = out["systems"]
    if isinstance(systems, str):
        out["systems"] = _absolute(systems, base_dir)
    else:
        resolved = []
        for s in systems:
            if not isinstance(s, str):
                raise MtcoreError(f"systems: expected paths of systems (strings), got {s!r}")
            resolved.append(_absolute(s, base_dir))
        out["systems"] = resolved
    return out


def _normalise_weights(
    heads: list[str], with_data: list[str], weights: Optional[dict]
) -> dict[str, float]:
    """Head → sampling probability (v2 rules): missing/invalid/zero weight → 0, warned; a negative
    number is an error (a typo, not a way to switch a head off). ``"auto"``: 1 per head with data
    here, replaced by the frame-count proportions once the trainer has read the data."""
    numbers = {h: v for h, v in (weights.items() if isinstance(weights, dict) else ())
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    negative = [h for h, v in numbers.items() if v < 0]
    if negative and any(v > 0 and h in with_data for h, v in numbers.items()):
        # (all weights ≤ 0: the error below says that nothing is trained)
        h = negative[0]
        raise MtcoreError(f"training/fitting_weight/{h}: {numbers[h]!r} is negative; give a weight ≥ 0 (0: the head is not trained)")
    if weights is None or weights == AUTO_WEIGHT:
        raw = {h: (1.0 if h in with_data else 0.0) for h in heads}
    else:
        raw = {}
        for h in heads:
            value = weights.get(h)
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if h in with_data and not valid:
                warnings.warn(
                    f"fitting net '{h}' has zero or invalid weight ({value!r}) in training/fitting_weight "
                    "and will not be trained",
                    stacklevel=3,
                )
            raw[h] = float(value) if valid and h in with_data else 0.0
    total = sum(raw.values())
    if total <= 0:
        raise MtcoreError("training/fitting_weight: no head has a positive weight and training data; nothing to train")
    return {h: v / total for h, v in raw.items()}


def _final_weights(heads: list[str], start: dict[str, float], final) -> Optional[dict[str, float]]:
    """``training/fitting_weight_final`` normalised over the trained heads (those with a positive
    starting probability); every trained head needs a number ≥ 0, an untrained head none."""
    if final is None:
        return None
    where = "training/fitting_weight_final"
    if not isinstance(final, dict):
        raise MtcoreError(f"{where}: expected a dict head → weight, got {type(final).__name__}")
    _unknown_keys(where, final, heads)
    trained = [h for h in heads if start.get(h, 0.0) > 0]
    out = {}
    for h in heads:
        value = final.get(h)
        if h not in trained:
            if value not in (None, 0, 0.0):
                raise MtcoreError(f"{where}/{h}: this head is not trained (no data or weight 0 in fitting_weight)")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MtcoreError(f"{where}/{h}: expected a number ≥ 0 for every trained head, got {value!r}")
        out[h] = float(value)
    total = sum(out.values())
    if total <= 0:
        raise MtcoreError(f"{where}: every weight is 0; give at least one trained head a positive weight")
    return {h: out.get(h, 0.0) / total for h in heads}


def _unknown_keys(section: str, keys, heads: list[str]) -> None:
    extra = [k for k in keys if k not in heads]
    if extra:
        raise MtcoreError(
            f"{section}: key(s) {', '.join(repr(k) for k in extra)} are not heads; heads in "
            f"model/fitting_net_dict: {', '.join(heads)}"
        )


def _run_check(check_fn, *args) -> None:
    check_fn(*args)


def _skip_check(check_fn, *args) -> None:
    pass


def normalize(doc: dict, base_dir: Path, registry: Optional[Registry] = None, check_values: bool = True) -> RunConfig:
    """Validate and normalise an input document (as loaded from JSON) into a RunConfig.

    ``check_values=False`` skips the value checks of :mod:`mtcore.input_checks` (ranges, seeds,
    duplicate names): a document stored in an earlier checkpoint is rebuilt as it was trained,
    even if a newer release refuses some of its values for new runs."""
    registry = registry or get_registry()
    doc = copy.deepcopy(doc)
    verify = _run_check if check_values else _skip_check
    verify(check_finite_numbers, doc)
    _check_sections(doc)
    verify(check_type_map, doc["model"].get("type_map"))
    multi = detect_mode(doc)
    if not multi:
        checked = check(input_argument(registry), doc)
        training = checked["training"]
        _check_mixed_precision(checked)
        if training.get("fitting_weight_final") is not None:
            raise MtcoreError("training/fitting_weight_final: multi-task only (head draw weights); drop it here")
        training["training_data"] = _absolute_systems(training["training_data"], base_dir)
        training["validation_data"] = _absolute_systems(training.get("validation_data"), base_dir)
        fitting = checked["model"]["fitting_net"]
        loss = checked.get("loss") or _default_loss(registry, fitting, "loss")
        checked["loss"] = loss
        checked["learning_rate"] = check(learning_rate_argument(), checked.get("learning_rate") or {}, "learning_rate")
        verify(check_model, checked["model"])
        verify(check_training, training)
        verify(check_learning_rate, checked["learning_rate"], "learning_rate")
        verify(check_loss, loss, "loss")
        verify(check_data_section, training["training_data"], "training/training_data")
        verify(check_data_section, training["validation_data"], "training/validation_data")
        head = HeadConfig(
            SINGLE_HEAD,
            fitting,
            loss,
            checked["learning_rate"],
            training["training_data"],
            training["validation_data"],
            1.0,
            _best_settings(training, None),
        )
        return RunConfig(False, checked, {SINGLE_HEAD: head})

    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    training_raw = doc.get("training") if isinstance(doc.get("training"), dict) else {}
    fitting_dict = model.pop("fitting_net_dict")
    data_dict = training_raw.pop("data_dict")
    weights = training_raw.pop("fitting_weight", None)
    final_weights = training_raw.pop("fitting_weight_final", None)
    loss_dict = doc.pop("loss_dict", None) or {}
    lr_dict = doc.pop("learning_rate_dict", None)
    for name, value in (("model/fitting_net_dict", fitting_dict), ("training/data_dict", data_dict),
                        ("loss_dict", loss_dict), ("learning_rate_dict", lr_dict),
                        ("training/fitting_weight", None if weights == AUTO_WEIGHT else weights)):
        if value is not None and not isinstance(value, dict):
            raise MtcoreError(f"{name}: expected a dict keyed by head name, got {type(value).__name__}")
    if not fitting_dict:
        raise MtcoreError("model/fitting_net_dict: empty; give at least one head")
    heads = list(fitting_dict)
    for h in heads:
        check_head_name(h)
    _unknown_keys("training/data_dict", data_dict, heads)
    _unknown_keys("loss_dict", loss_dict, heads)
    if lr_dict is not None:
        _unknown_keys("learning_rate_dict", lr_dict, heads)
    if isinstance(weights, dict):
        _unknown_keys("training/fitting_weight", weights, heads)
    if not model.get("type_map"):
        raise MtcoreError("model/type_map: required in multi-task mode (heads' data are mapped onto it by element)")

    checked = check(input_argument(registry), doc)
    fittings = {h: check(fitting_argument(registry, h), fitting_dict[h] or {}, "model/fitting_net_dict/" + h) for h in heads}
    with_data = []
    datas: dict[str, dict] = {}
    for h in heads:
        if h not in data_dict:
            warnings.warn(f"fitting net '{h}' has no entry in training/data_dict and will not be trained", stacklevel=2)
            continue
        entry = check(data_dict_entry_argument(h), data_dict[h] or {}, "training/data_dict/" + h)
        if entry.get("training_data") is None:
            warnings.warn(f"fitting net '{h}' has no training_data in training/data_dict and will not be trained", stacklevel=2)
        else:
            with_data.append(h)
        entry["training_data"] = _absolute_systems(entry.get("training_data"), base_dir)
        entry["validation_data"] = _absolute_systems(entry.get("validation_data"), base_dir)
        datas[h] = entry
    verify(check_model, checked["model"])
    verify(check_training, checked["training"])
    for h in heads:
        verify(check_best_settings, datas.get(h), "training/data_dict/" + h)
        verify(check_network_settings, fittings[h], "model/fitting_net_dict/" + h)
        for part in ("training_data", "validation_data"):
            verify(check_data_section, datas.get(h, {}).get(part), f"training/data_dict/{h}/{part}")
    probabilities = _normalise_weights(heads, with_data, weights)
    final = _final_weights(heads, probabilities, final_weights)
    losses = {}
    for h in heads:
        if h in loss_dict:
            losses[h] = check(loss_argument(registry, h), loss_dict[h] or {}, "loss_dict/" + h)
        else:
            losses[h] = _default_loss(registry, fittings[h], "loss_dict/" + h)
        verify(check_loss, losses[h], "loss_dict/" + h)
    shared_lr = check(learning_rate_argument(), checked.get("learning_rate") or {}, "learning_rate")
    verify(check_learning_rate, shared_lr, "learning_rate")
    lrs = {}
    for h in heads:
        if lr_dict is not None and h in lr_dict:
            lrs[h] = check(learning_rate_argument(h), lr_dict[h] or {}, "learning_rate_dict/" + h)
            verify(check_learning_rate, lrs[h], "learning_rate_dict/" + h)
        else:
            lrs[h] = shared_lr
    checked["model"]["fitting_net_dict"] = fittings
    _check_mixed_precision(checked)
    checked["model"].pop("fitting_net", None)
    checked["loss_dict"] = losses
    checked.pop("loss", None)
    checked["learning_rate"] = shared_lr
    if lr_dict is not None:
        checked["learning_rate_dict"] = lrs
    else:
        checked.pop("learning_rate_dict", None)
    checked["training"]["data_dict"] = datas
    # "auto" and "not given" are kept as such (the plan and lcurve.out say which rule drew the heads)
    checked["training"]["fitting_weight"] = probabilities if isinstance(weights, dict) else weights
    checked["training"]["fitting_weight_final"] = final
    checked["training"].pop("training_data", None)
    checked["training"].pop("validation_data", None)
    head_configs = {
        h: HeadConfig(
            h,
            fittings[h],
            losses[h],
            lrs[h],
            datas.get(h, {}).get("training_data"),
            datas.get(h, {}).get("validation_data"),
            probabilities[h],
            _best_settings(checked["training"], datas.get(h)),
        )
        for h in heads
    }
    return RunConfig(True, checked, head_configs)


def _check_mixed_precision(checked: dict) -> None:
    """training/mixed_precision: one-line errors for bad values; one warning line naming the
    components whose explicit precision it overrides (mtcore.model.precision)."""
    policy = policy_of(checked.get("training"))
    if policy is not None:
        warn_disagreeing(checked["model"], policy)


def _best_settings(training: dict, entry: Optional[dict]) -> dict:
    """A head's best-model keys: its data_dict entry's value where not null, else training's."""
    own = entry or {}
    return {k: own[k] if own.get(k) is not None else training.get(k) for k in BEST_MODEL_KEYS}


def _default_loss(registry: Registry, fitting: dict, where: str) -> dict:
    registration = registry.get("fitting_net", fitting.get("type", "ener"))
    return check(loss_argument(registry, where.rsplit("/", 1)[-1]), dict(registration.default_loss), where)


def load_config(path: Path, registry: Optional[Registry] = None) -> RunConfig:
    """Read and normalise an input file; data paths resolve against the file's folder."""
    path = Path(path)
    return normalize(read_input(path), path.resolve().parent, registry)


def config_from_document(document: dict, registry: Optional[Registry] = None) -> RunConfig:
    """Rebuild a RunConfig from a stored normalised document (checkpoints, frozen models)."""
    doc = copy.deepcopy(document)
    for key in ("fitting_weight",):
        if doc.get("training", {}).get(key) is None:
            doc.get("training", {}).pop(key, None)
    if doc.get("learning_rate_dict") is None:
        doc.pop("learning_rate_dict", None)
    if doc.get("loss_dict") is None:
        doc.pop("loss_dict", None)
    if doc.get("model", {}).get("fitting_net_dict") is None:
        doc.get("model", {}).pop("fitting_net_dict", None)
    if doc.get("training", {}).get("data_dict") is None:
        doc.get("training", {}).pop("data_dict", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normalize(doc, Path("/"), registry, check_values=False)


def single_task_document(document: dict, head: str) -> dict:
    """The single-task form of a multi-task document for one head (what freezing that head stores)."""
    doc = copy.deepcopy(document)
    model = doc["model"]
    if model.get("fitting_net_dict") is None:
        return doc
    fittings = model.pop("fitting_net_dict")
    model["fitting_net"] = fittings[head]
    base = model["fitting_net"].get("base_head")
    if base and base in fittings:  # a Δ head alone carries its base's settings (mtcore.model.delta)
        model["fitting_net"]["base_fitting_net"] = fittings[base]
    loss_dict = doc.pop("loss_dict", None) or {}
    if head in loss_dict:
        doc["loss"] = loss_dict[head]
    lr_dict = doc.pop("learning_rate_dict", None) or {}
    if head in lr_dict:
        doc["learning_rate"] = lr_dict[head]
    training = doc["training"]
    data = (training.pop("data_dict", None) or {}).get(head, {})
    training["training_data"] = data.get("training_data")
    training["validation_data"] = data.get("validation_data")
    training.pop("fitting_weight", None)
    training.pop("fitting_weight_final", None)
    return doc
