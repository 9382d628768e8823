"""``mtcore show``: what a checkpoint or frozen model holds, so nobody guesses a head index."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional


from mtcore.errors import MtcoreError
from mtcore.freeze import load_frozen
from mtcore.provenance import lines


def _heads_from_document(document: dict) -> dict[str, dict]:
    model = document["model"]
    return model.get("fitting_net_dict") or {"default": model["fitting_net"]}


def _summary(document: dict, kind: str, outputs: dict[str, str]) -> dict:
    heads = _heads_from_document(document)
    descriptor = document["model"]["descriptor"]
    names_of = {h: [n for n in (f.get("layer_name") or []) if n] for h, f in heads.items()}
    users: dict[str, list[str]] = {}
    for h, names in names_of.items():
        for n in names:
            users.setdefault(n, []).append(h)
    return {
        "kind": kind,
        "type_map": document["model"].get("type_map") or [],
        "descriptor": f"{descriptor['type']} (rcut {descriptor.get('rcut')}, sel {descriptor.get('sel')})",
        "heads": [
            {
                "name": h,
                # a Δ head: its base head's output plus its own net (mtcore.model.delta)
                "fitting_type": f.get("type", "ener") + (f" (Δ on head '{f['base_head']}')" if f.get("base_head") else ""),
                "output": outputs.get(h, ""),
                "shared_layers": [f"{n} (with {', '.join(u for u in users[n] if u != h)})" if len(users[n]) > 1 else n
                                  for n in dict.fromkeys(names_of[h])],
            }
            for h, f in heads.items()
        ],
    }


def _output(output: dict) -> str:
    """The head's output as shown: its name and how the frame value is made (``energy (sum)``,
    ``band_gap (mean)``, ``charge (per atom only)``); files frozen before reductions sum."""
    reduction = output.get("reduction") or "sum"
    return f"{output['name']} ({'per atom only' if reduction == 'none' else reduction})"


def _checkpoint_outputs(document: dict) -> dict[str, str]:
    """Each head's output as :func:`_output` shows it, from the heads a checkpoint's input builds
    (untrained: only ``output_def`` is read); empty when its plugins are not installed, since
    ``show`` must work without them."""
    try:
        from mtcore.config import config_from_document
        from mtcore.model.build import build_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(config_from_document(document))
        return {h: _output({"name": f.output_def().name, "reduction": getattr(f.output_def(), "reduction", "sum")})
                for h, f in model.heads.items()}
    except Exception:  # noqa: BLE001 - a missing plugin or an old input: the column stays empty
        return {}


def describe(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MtcoreError(f"{path}: file not found")
    try:
        meta = load_frozen(path)[1]
    except Exception:  # noqa: BLE001 - not TorchScript: try a checkpoint
        from mtcore.train.checkpoint import load_checkpoint

        state = load_checkpoint(path, check_plugins=False)  # show works without the plugins installed
        kind = f"checkpoint, step {state['step']}, {'multi' if state.get('multi_task') else 'single'}-task"
        return dict(_summary(state["config"], kind, _checkpoint_outputs(state["config"])),
                    provenance=lines(state.get("provenance")), notes=_notes(state.get("best_of"), None))
    if meta.get("format") != "mtcore-frozen":
        raise MtcoreError(f"{path}: a TorchScript file, but not a frozen mtcore model")
    notes = _notes(meta.get("best"), meta.get("compressed"))
    if meta.get("kind") == "united":
        outputs = {h: _output(m["output"]) for h, m in meta["heads"].items()}
        return dict(_summary(meta["config"], "frozen, united (all heads)", outputs), provenance=lines(meta.get("provenance")),
                    notes=notes)
    summary = _summary(meta["config"], f"frozen, head '{meta['head']}'", {})
    summary["provenance"] = lines(meta.get("provenance"))
    summary["notes"] = notes
    for head in summary["heads"]:
        head["name"] = meta["head"]
        head["output"] = _output(meta["output"])
    return summary


def _notes(best: Optional[dict], compressed: Optional[dict]) -> list[str]:
    """What else a user should know about the file: the best-model record it came from (``freeze
    --best``, or a ``model.best.<head>.pt`` itself) and whether its embeddings are tabulated."""
    notes = []
    if isinstance(best, dict) and best.get("head") is not None:
        source = f" ({best['file']})" if best.get("file") else ""
        value = best.get("value")
        shown = f"{value:.6g}" if isinstance(value, (int, float)) else str(value)
        notes.append(f"best model of head '{best['head']}': {best.get('metric')} = {shown} at step {best.get('step')}{source}")
    if isinstance(compressed, dict):
        notes.append(f"compressed: {len(compressed.get('tables') or [])} embedding table(s), step "
                     f"{compressed.get('step')}, extrapolate {compressed.get('extrapolate')} (inference only)")
    return notes
