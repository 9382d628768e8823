"""Where ``--init-model`` weights come from: a checkpoint, a united frozen model, or one frozen head.

All three become ``{"model": state_dict}`` with MultiHeadModel's key layout (``descriptor.*``,
``heads.<head>.*``), which the trainer maps onto the new model by head name (or ``--head``).
"""

from __future__ import annotations

from pathlib import Path

from mtcore.errors import MtcoreError
from mtcore.freeze import load_frozen
from mtcore.train.checkpoint import FORMAT, load_checkpoint


def _frozen(path: Path):
    try:
        return load_frozen(path)
    except Exception:  # noqa: BLE001 - not TorchScript
        return None, None


def load_init_source(path: Path) -> dict:
    path = Path(path)
    if path.is_file():
        module, meta = _frozen(path)
        if module is not None:
            if meta.get("format") != "mtcore-frozen":
                raise MtcoreError(f"{path}: a TorchScript file, but not a frozen mtcore model")
            from mtcore.plugins import get_registry
            from mtcore.provenance import check

            check(meta.get("provenance"), get_registry(), str(path))  # names a missing plugin package
            state = dict(module.state_dict())
            if meta.get("kind") == "united":
                return {"format": FORMAT, "model": state, "config": meta["config"], "path": str(path)}
            head = meta["head"]
            mapped = {}
            for key, value in state.items():
                if key.startswith("fitting."):
                    mapped[f"heads.{head}." + key[len("fitting."):]] = value
                else:
                    mapped[key] = value
            return {"format": FORMAT, "model": mapped, "config": meta["config"], "path": str(path)}
    state = load_checkpoint(path)
    if state.get("format") != FORMAT:
        raise MtcoreError(f"{path}: not a checkpoint or frozen mtcore model")
    return state
