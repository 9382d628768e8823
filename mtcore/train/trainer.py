"""The trainer: one code path for one head or many.

Per step one trained head is drawn with its fitting_weight probability (from the seeded RNG),
one batch of that head's training data is drawn, and that head's Adam optimiser takes one step
on that head's loss (the shared descriptor and any shared layers move with it). Each head has its
own optimiser (its own moment estimates and bias-correction count, as DeePMD-kit v2) and its own
learning-rate schedule evaluated at the global step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.console import Console

import mtcore
from mtcore.config import RunConfig, config_from_document
from mtcore.data.dataset import Batch, DataSet
from mtcore.data.loading import load_dataset, pooled_neighbor_stat
from mtcore.data.neighbors import NeighborCache
from mtcore.data.statsample import DATA_STAT_NFRAMES, NEIGHBOR_STAT_NFRAMES
from mtcore.errors import MtcoreError
from mtcore.model import tangent_embedding
from mtcore.model.delta import DeltaFitting
from mtcore.model.build import build_losses, build_model, head_requirements, update_sel
from mtcore.model.loss import Loss
from mtcore.model.model import MultiHeadModel
from mtcore.plugins import Registry, get_registry
from mtcore.train.best import BestTracker, fixed_frames, pooled_rmse
from mtcore.train.checkpoint import FORMAT, CheckpointManager, atomic_text, read_checkpoint_file, split_save_ckpt
from mtcore.train import distributed
from mtcore.train.display import TrainingDisplay, best_summary_table, print_table
from mtcore.train.forgetting import forgetting_table
from mtcore.train.lcurve import LcurveWriter, truncate_after
from mtcore.train.outdir import ensure_writable, locked, remove_leftovers
from mtcore.train.lr import ExpDecay
from mtcore.train.plan import plan_table
from mtcore.train.pseudo_labels import label_frames, loading_requirements, teacher_state


def model_inputs(batch: Batch, device: torch.device) -> dict:
    """Keyword arguments of MultiHeadModel.forward for a batch."""
    return {
        "coord": batch.coord.to(device),
        "atype": batch.atype.to(device),
        "box": None if batch.box is None else batch.box.to(device),
        "center": batch.center.to(device),
        "neighbor": batch.neighbor.to(device),
        "image": batch.image.to(device),
        **{k: batch.labels[k].to(device) for k in ("fparam", "aparam") if k in batch.labels},
    }


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors an optimiser updates, in its own order (the order its state is saved in)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def labels_on(batch: Batch, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.labels.items()}


def pooled_over_ranks(parts: list[tuple[dict, float]]) -> dict[str, float]:
    """The metrics of one summed batch from its ranks' slices. Unlike pooling batches (where NaN
    means "no label here" and is left out), a slice's inf or NaN makes the summed batch's metric
    non-finite too, as one process evaluating all the frames would report it."""
    pooled = pooled_rmse(parts)
    for key in pooled:
        bad = [metrics[key] for metrics, _ in parts if not math.isfinite(metrics[key])]
        if bad:
            pooled[key] = math.nan if any(math.isnan(v) for v in bad) else math.inf
    return pooled


#: the forgetting report of a run started with --init-model, beside lcurve.out
FORGETTING_FILE = "forgetting.json"

#: consecutive steps with a non-finite loss or gradient after which training stops (the default
#: of training/max_nonfinite_steps; docs/reliability.md)
MAX_NONFINITE_STEPS = 5


class _StopOnInterrupt:
    """Ctrl-C or SIGTERM during training: finish the current step, save a checkpoint, stop
    (job schedulers send SIGTERM some time before SIGKILL). A second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


@dataclass
class HeadRuntime:
    """What the trainer holds per head."""

    loss: Loss
    schedule: ExpDecay
    train: Optional[DataSet]
    valid: Optional[DataSet]
    numb_btch: int
    optimizer: Optional[torch.optim.Optimizer] = None


def _timing(event: str) -> None:
    """MTCORE_TIMING=1 (benchmarks): one stderr line with the wall-clock time of ``event`` and the
    process's CPU time so far, so a parent can measure the time to the first training step from
    its own start (CPU time: the same on a machine shared with other work)."""
    if os.environ.get("MTCORE_TIMING"):
        print(f"MTCORE_TIMING {event} {time.time():.3f} {time.process_time():.3f}", file=sys.stderr, flush=True)


def new_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel over all tensors) where torch has the fused kernel for them.

    torch's default on the CPU is a loop of eight element-wise operators per tensor: 5.6 ms a
    step for water se_e2_a's 44 tensors against 1.9 ms fused (2-core AMD EPYC, one thread), a
    tenth of an se_e2_r step. The two agree to rounding (9e-16 after a few steps)."""
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True) if fusable else torch.optim.Adam(params, lr=lr)


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        workdir: Path = Path("."),
        console: Optional[Console] = None,
        restart: Optional[dict] = None,
        init_model: Optional[dict] = None,
        init_head: Optional[str] = None,
        registry: Optional[Registry] = None,
        device: Optional[str] = None,
        init_optimizer: bool = False,
    ):
        self.registry = registry or get_registry()
        self.console = console or Console()
        self.workdir = Path(workdir)
        self.device = torch.device(device or os.environ.get("MTCORE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        #: data-parallel place (rank 0 of 1 without torchrun): rank 0 computes statistics and writes files
        self.group = distributed.current()
        self._stop_agreed = False
        if restart is not None:
            if restart.get("best_of") is not None:
                raise MtcoreError(
                    f"--restart {restart.get('path', '')}: a best-model file (no optimiser state) cannot be restarted; "
                    "restart from a periodic checkpoint, or start a new run from it with --init-model"
                )
            config = config_from_document(restart["config"], self.registry)
        self.config = config
        training = config.training
        if training.get("seed") is None:
            training["seed"] = int(np.random.SeedSequence().entropy % (2**31))
            training["seed"] = distributed.broadcast_object(training["seed"], "agreeing on the seed")
        self.seed = int(training["seed"])
        torch.manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.numb_steps = int(training["numb_steps"])
        self.step = 0
        self.restart = restart
        fresh = restart is None and init_model is None
        if not config.type_map:
            raise MtcoreError('model/type_map: required (the element of each type index, e.g. ["O", "H"])')
        if init_optimizer and init_model is None:
            raise MtcoreError("--init-optimizer only applies with --init-model")
        #: heads of the --init-model source (their validation error before/after: the forgetting report)
        self.source_heads = sorted({k.split(".")[1] for k in init_model["model"] if k.startswith("heads.")}) \
            if init_model is not None else []
        if init_model is not None and init_model.get("config"):
            self._inherit_descriptor(init_model["config"], extending=init_head is None and config.multi_task
                                     and any(h in self.source_heads for h in config.heads))
        # old heads kept without training data: their validation frames are still read (forgetting)
        measured = set((restart or {}).get("forgetting_before") or {}) if restart is not None else \
            (set(self.source_heads) if init_head is None else set())
        if fresh:
            self._resolve_sel()
        self.model: MultiHeadModel = build_model(config, self.registry)
        self.cache = NeighborCache(self.model.rcut)
        losses = build_losses(config, self.model, self.registry)
        self.heads: dict[str, HeadRuntime] = {}
        for name, head in config.heads.items():
            reqs = head_requirements(self.model, losses[name], name)
            where = f"training/data_dict/{name}" if config.multi_task else "training"
            train = valid = None
            if head.trained:
                pseudo = bool(head.training_data.get("pseudo_labels"))
                if pseudo and init_model is None and not ((restart or {}).get("pseudo_teachers") or {}).get(name):
                    raise MtcoreError(
                        f"{where}/training_data/pseudo_labels: needs --init-model (the model whose predictions "
                        "of this head become the labels)"
                    )
                train = load_dataset(head.training_data, config.type_map, loading_requirements(reqs) if pseudo else reqs,
                                     self.cache, self.registry, where + "/training_data")
            if head.validation_data is not None and (head.trained or name in measured):
                # an old head kept without training data still gets its forgetting measured
                valid = load_dataset(head.validation_data, config.type_map, reqs, self.cache, self.registry, where + "/validation_data")
            self.heads[name] = HeadRuntime(
                losses[name],
                ExpDecay.from_config(head.learning_rate, self.numb_steps),
                train,
                valid,
                int(head.validation_data.get("numb_btch", 1)) if head.validation_data else 0,
            )
        if self.group.enabled:
            self._set_ranks()
        self.trained = config.trained_heads()
        self.weight_rule = self._resolve_weights()
        if config.training.get("fitting_weight_final"):
            self.weight_rule += ", moving linearly to fitting_weight_final"
        self.weights = np.array([config.heads[h].weight for h in self.trained])
        self.weights = self.weights / self.weights.sum()
        self.best = BestTracker.build(
            config.heads, self.trained, {h: self.heads[h].valid for h in self.trained},
            {h: self.heads[h].loss.metric_names() for h in self.trained},
            int(training["disp_freq"]), self.seed, config.multi_task,
            {h: self.heads[h].numb_btch * self.group.world for h in self.trained},  # the summed batches' frames
        )
        self._warned_nan_metric: set[str] = set()
        #: --restart: head → (value, step) of a best file the continued run wrote after the restart
        #: checkpoint; only a better model replaces it (a deterministic replay: from that step on)
        self._best_ahead: dict[str, tuple[float, int]] = {}
        if restart is not None:
            self.best.load_state_dict(restart.get("best"))
        if restart is not None:
            self._load_restart(restart)
            self.bias_source = {h: "restart checkpoint" for h in self.trained}
        elif init_model is not None:
            self._load_init_model(init_model, init_head)
            self.init_path = str(init_model.get("path", ""))
            self.bias_source = {
                h: f"--init-model head '{self.init_mapping[h]}'" if h in self.init_mapping else "own training data"
                for h in self.trained
            }
        else:
            self._statistics()
            self.bias_source = {h: "own training data" for h in self.trained}
        self.model.to(self.device)  # statistics run on the CPU copies of the data
        distributed.broadcast_module(self.model, "receiving the statistics from rank 0")
        self.pseudo_teachers = self._pseudo_label(restart, losses)
        self._make_optimizers()
        self.carried_optimizers: list[str] = []
        if init_optimizer:
            self._carry_optimizers(init_model)
        #: old head → its validation metrics with the --init-model weights (before any step)
        self.forgetting_before: dict[str, dict] = dict((restart or {}).get("forgetting_before") or {})
        if restart is not None:
            self.init_path = str(restart.get("init_model_path") or "")
        self.forgetting_heads = [h for h in self.forgetting_before if self.heads[h].valid is not None] \
            if restart is not None else [
            h for h in getattr(self, "init_mapping", {}) if self.heads[h].valid is not None
        ]
        if restart is not None and "optimizers" in restart:
            for name, state in restart["optimizers"].items():
                if self.heads.get(name) and self.heads[name].optimizer is not None:
                    self.heads[name].optimizer.load_state_dict(state)

    # setup ---------------------------------------------------------------------------------
    def _resolve_sel(self) -> None:
        """Pool every trained head's training systems for the neighbour statistics (sel "auto").
        Data-parallel: rank 0 computes them and sends the resolved descriptor (sel changes the
        architecture, so every rank must build the same model)."""
        if not self.group.is_main:
            self.config.model["descriptor"] = distributed.broadcast_object(None, "receiving sel from rank 0")
            return
        systems, scratch = [], NeighborCache(0.0, budget_bytes=0)
        for name in self.config.trained_heads():
            head = self.config.heads[name]
            where = f"training/data_dict/{name}" if self.config.multi_task else "training"
            ds = load_dataset(head.training_data, self.config.type_map, [], scratch, self.registry, where + "/training_data")
            systems.extend(ds.systems)
        stat = pooled_neighbor_stat(systems, len(self.config.type_map), seed=self.seed,
                                    max_frames=int(self.config.model.get("neighbor_stat_nframes", NEIGHBOR_STAT_NFRAMES)))
        #: (frames read, frames in all) by the neighbour statistics (plan table)
        self.neighbor_stat_frames = (stat.frames_read, stat.frames_total)
        update_sel(self.config, stat, self.registry)
        distributed.broadcast_object(self.config.model["descriptor"], "sending sel")

    def _resolve_weights(self) -> str:
        """Each trained head's drawing weight; returns the rule in words (plan table, lcurve.out).

        ``"auto"``: probability ∝ the head's number of training frames, so that every head goes
        through its data at the same rate (epochs) when batch sizes are equal, as DeePMD-kit's
        ``prob_sys_size`` balances systems within one data set."""
        training = self.config.training
        if self.config.auto_weights:
            frames = {h: sum(s.nframes for s in self.heads[h].train.systems) for h in self.trained}
            total = float(sum(frames.values()))
            for h in self.trained:
                self.config.heads[h].weight = frames[h] / total
            return "auto (∝ training frames)"
        if training.get("fitting_weight") is None or not self.config.multi_task:
            return "equal (no fitting_weight)" if self.config.multi_task else "single head"
        return "fitting_weight (normalised)"

    #: descriptor keys that do not change what the descriptor computes from given weights
    _NOT_ARCHITECTURE = ("trainable", "sel", "seed")

    def _inherit_descriptor(self, source: dict, extending: bool = False) -> None:
        """--init-model: the descriptor (and type_map) come from the source model, as DeePMD-kit's
        initialisation does; only ``trainable`` is kept from the new input. Extending a multi-task
        model (old heads kept by name) needs the same descriptor: old heads were fitted to its
        output, so a different one is an error rather than a silent replacement."""
        source_model = source["model"]
        if list(source_model.get("type_map") or []) != list(self.config.type_map):
            raise MtcoreError(
                f"model/type_map {self.config.type_map} differs from the --init-model source's "
                f"{source_model.get('type_map')}"
            )
        mine = self.config.model["descriptor"]
        inherited = dict(source_model["descriptor"])
        if "trainable" in mine:
            inherited["trainable"] = mine["trainable"]
        differs = {k for k in set(mine) | set(inherited) if k not in ("trainable", "sel") and mine.get(k) != inherited.get(k)}
        architecture = sorted(k for k in differs if k not in self._NOT_ARCHITECTURE)
        if extending and architecture:
            key = architecture[0]
            raise MtcoreError(
                f"model/descriptor/{key}: {mine.get(key)!r} here but {inherited.get(key)!r} in the --init-model source; "
                "extending a model with new heads needs the same descriptor architecture"
                + (f" (also differing: {', '.join(architecture[1:])})" if len(architecture) > 1 else "")
            )
        if differs:
            self.console.print(
                "--init-model: model/descriptor is taken from the source model "
                f"({', '.join(sorted(differs))} differed from this input)"
            )
        self.config.model["descriptor"] = inherited

    def _set_ranks(self) -> None:
        """Data-parallel: each data set draws the summed batch and keeps this rank's slice."""
        short = []
        for name, runtime in self.heads.items():
            for ds in (runtime.train, runtime.valid):
                if ds is None:
                    continue
                ds.set_ranks(self.group.rank, self.group.world)
                short += [f"{s.path} ({s.nframes} frames, batch {bs} x {self.group.world} ranks)"
                          for s, bs in zip(ds.systems, ds.batch_sizes) if s.nframes < bs * self.group.world]
        if short and self.group.is_main:
            warnings.warn(
                f"{len(short)} system(s) have fewer frames than the summed batch of all ranks, e.g. {short[0]}: "
                "there the ranks' batches overlap (docs/distributed.md)"
            )

    def _stat_cap(self) -> int:
        """model/data_stat_nframes: the most frames one head's statistics read (and the place
        ``self.stat_frames``, head → frames read, starts: the plan table shows it)."""
        if not hasattr(self, "stat_frames"):
            self.stat_frames = {}
        return int(self.config.model.get("data_stat_nframes", DATA_STAT_NFRAMES))

    def _statistics(self) -> None:
        """Descriptor statistics from all trained heads' frames; each head's bias from its own.
        Data-parallel: rank 0 only (broadcast afterwards), from the summed batches."""
        if not self.group.is_main:
            return
        nbatch = int(self.config.model.get("data_stat_nbatch", 10))
        stat_rng = np.random.default_rng([self.seed, 1])
        pooled, per_head = [], {}
        for name in self.trained:
            batches = self.heads[name].train.stat_batches(nbatch, stat_rng, self._stat_cap())
            self.stat_frames[name] = sum(b.nframes for b in batches)  # plan table
            per_head[name] = [b.stat_sample() for b in batches]
            pooled.extend(per_head[name])
        self.model.descriptor.compute_input_stats(pooled)
        for name in sorted(per_head, key=lambda h: isinstance(self.model.heads[h], DeltaFitting)):  # bases first
            self.model.heads[name].compute_output_stats(per_head[name])

    def _pseudo_label(self, restart: Optional[dict], losses: dict) -> dict[str, dict]:
        """Label the training frames of heads with ``pseudo_labels`` by their --init-model weights
        (on --restart: by those weights, kept in the checkpoint). Returns head → teacher weights."""
        teachers: dict[str, dict] = {}
        for name in self.trained:
            section = self.config.heads[name].training_data
            if not section.get("pseudo_labels"):
                continue
            where = (f"training/data_dict/{name}" if self.config.multi_task else "training") + "/training_data"
            if restart is not None:
                teachers[name] = restart["pseudo_teachers"][name]
                teacher = copy.deepcopy(self.model)
                teacher.load_state_dict(teachers[name], strict=False)
            else:
                if name not in getattr(self, "init_mapping", {}):
                    raise MtcoreError(
                        f"{where}/pseudo_labels: head '{name}' is not a head of the --init-model source; only a trained "
                        "head can label frames with its own predictions"
                    )
                teachers[name] = teacher_state(self.model.state_dict(), name)
                teacher = self.model

            def predict(batch: Batch, model: MultiHeadModel = teacher, head: str = name) -> dict:
                conservative = model.heads[head].output_def().conservative
                return model(head, **model_inputs(batch, self.device), want_force=conservative,
                             want_virial=conservative and batch.box is not None, create_graph=False)

            reqs = head_requirements(self.model, losses[name], name)
            keys = label_frames(predict, self.heads[name].train, reqs, where)
            nframes = sum(s.nframes for s in self.heads[name].train.systems)
            self.console.print(
                f"head '{name}': {nframes} training frames pseudo-labelled ({', '.join(keys)}) by its --init-model weights",
                highlight=False, soft_wrap=True,
            )
        return teachers

    def _load_restart(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        for name, sets in state.get("datasets", {}).items():
            runtime = self.heads.get(name)
            if runtime is None:
                continue
            if runtime.train is not None and sets.get("train"):
                runtime.train.load_state_dict(sets["train"])
            if runtime.valid is not None and sets.get("valid"):
                runtime.valid.load_state_dict(sets["valid"])

    def _load_init_model(self, state: dict, init_head: Optional[str]) -> None:
        """Start from a checkpoint's weights: the descriptor, and heads matched by name (or the
        one head chosen with ``init_head``). Heads without a source get fresh statistics."""
        source = state["model"]
        source_heads = sorted({k.split(".")[1] for k in source if k.startswith("heads.")})
        mapping: dict[str, str] = {}
        if init_head is not None:
            if init_head not in source_heads:
                raise MtcoreError(f"--head {init_head}: the checkpoint has heads {', '.join(source_heads)}")
            if len(self.model.heads) != 1 and init_head not in self.model.heads:
                raise MtcoreError(f"--head {init_head}: the input has several heads; name them like the checkpoint's instead")
            target = init_head if init_head in self.model.heads else next(iter(self.model.heads))
            mapping[target] = init_head
        else:
            for name in self.model.heads:
                if name in source_heads:
                    mapping[name] = name
        wanted = {}
        for key, value in source.items():
            if key.startswith("descriptor."):
                wanted[key] = value
        for target, src in mapping.items():
            prefix = f"heads.{src}."
            for key, value in source.items():
                if key.startswith(prefix):
                    wanted[f"heads.{target}." + key[len(prefix):]] = value
        own = self.model.state_dict()
        for key, value in wanted.items():
            if key not in own:
                raise MtcoreError(f"--init-model: '{key}' of the checkpoint has no place in this model (different architecture)")
            if own[key].shape != value.shape:
                raise MtcoreError(
                    f"--init-model: '{key}' has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} here"
                )
        self.model.load_state_dict(wanted, strict=False)
        fresh_heads = [h for h in self.trained if h not in mapping]
        if fresh_heads and self.group.is_main:  # data-parallel: broadcast from rank 0 afterwards
            nbatch = int(self.config.model.get("data_stat_nbatch", 10))
            stat_rng = np.random.default_rng([self.seed, 1])
            for name in sorted(fresh_heads, key=lambda h: isinstance(self.model.heads[h], DeltaFitting)):
                batches = self.heads[name].train.stat_batches(nbatch, stat_rng, self._stat_cap())
                self.stat_frames[name] = sum(b.nframes for b in batches)  # plan table
                samples = [b.stat_sample() for b in batches]
                self.model.heads[name].compute_output_stats(samples)
        self.init_mapping = mapping

    def _carry_optimizers(self, state: dict) -> None:
        """--init-optimizer: each old head (matched by name, or the --head choice) continues with
        its Adam moments and step count from the checkpoint; new heads start fresh. The parameter
        lists must match one to one (same descriptor, same fitting net, same sharing)."""
        stored = state.get("optimizers")
        if not stored:
            raise MtcoreError(
                f"--init-optimizer: {state.get('path') or 'the --init-model source'} holds no optimiser state "
                "(a frozen model or a best-model file); give a periodic checkpoint"
            )
        for target, src in self.init_mapping.items():
            if target not in self.trained or src not in stored:
                continue
            optimizer = self.heads[target].optimizer
            mine = optimizer_params(optimizer)
            theirs = stored[src]
            their_ids = [i for group in theirs["param_groups"] for i in group["params"]]
            shapes = [tuple(theirs["state"][i]["exp_avg"].shape) if i in theirs["state"] else None for i in their_ids]
            if len(mine) != len(their_ids) or any(s is not None and s != tuple(p.shape) for s, p in zip(shapes, mine)):
                raise MtcoreError(
                    f"--init-optimizer: head '{src}' of the checkpoint optimised {len(their_ids)} tensors, head "
                    f"'{target}' here has {len(mine)} (or other shapes): its fitting net or layer sharing changed"
                )
            optimizer.load_state_dict(theirs)
            for slot in optimizer.state.values():  # a checkpoint from a GPU run, resumed on the CPU or back
                for key, value in slot.items():
                    if torch.is_tensor(value) and key != "step":
                        slot[key] = value.to(self.device)
            self.carried_optimizers.append(target)

    def _make_optimizers(self) -> None:
        descriptor_params = [p for p in self.model.descriptor.parameters() if p.requires_grad]
        for name in self.trained:
            params = descriptor_params + [p for p in self.model.heads[name].trained_parameters() if p.requires_grad]
            unique = list({id(p): p for p in params}.values())
            if not unique:
                raise MtcoreError(f"head '{name}': nothing is trainable (descriptor and fitting net both frozen)")
            self.heads[name].optimizer = new_adam(unique, self.heads[name].schedule.start_lr)

    # stepping ------------------------------------------------------------------------------
    @property
    def active(self) -> list[str]:
        """Trained heads still drawn (early stopping removes heads)."""
        stopped = self.best.stopped()
        return [h for h in self.trained if h not in stopped]

    def draw_weights(self) -> np.ndarray:
        """Draw probabilities of the trained heads at this step: fitting_weight, moving linearly to
        fitting_weight_final (when given) by numb_steps."""
        final = self.config.training.get("fitting_weight_final")
        if not final:
            return self.weights
        f = min(1.0, self.step / max(1, self.numb_steps))
        weights = (1.0 - f) * self.weights + f * np.array([final[h] for h in self.trained])
        return weights / weights.sum()

    def draw_head(self) -> str:
        active = self.active
        if len(active) == len(self.trained):
            if len(self.trained) == 1:
                return self.trained[0]
            return self.trained[int(self.rng.choice(len(self.trained), p=self.draw_weights()))]
        if len(active) == 1:
            return active[0]
        now = self.draw_weights()
        weights = np.array([now[self.trained.index(h)] for h in active])
        if weights.sum() <= 0:  # the heads still drawn all ramp to 0: draw them equally
            weights = np.ones(len(active))
        return active[int(self.rng.choice(len(active), p=weights / weights.sum()))]

    def _predict(self, head: str, batch: Batch, create_graph: bool) -> dict:
        loss = self.heads[head].loss
        want_virial = loss.needs_virial() and batch.find.get("virial", 0.0) > 0
        return self.model(
            head,
            **model_inputs(batch, self.device),
            want_force=loss.needs_force(),
            want_virial=want_virial,
            create_graph=create_graph,
        )

    def train_step(self, head: str) -> bool:
        """One optimiser step on one batch of ``head``. A non-finite loss or gradient skips the
        update (returns False): one bad frame must not turn every weight into NaN."""
        runtime = self.heads[head]
        batch = runtime.train.sample(self.rng)
        lr = runtime.schedule.value(self.step)
        for group in runtime.optimizer.param_groups:
            group["lr"] = lr
        # the loss needs first derivatives in the coordinates only: the embedding nets may carry
        # their input derivative forward instead of being differentiated twice (tangent_embedding.py)
        with tangent_embedding.force_training(runtime.loss.needs_force() or runtime.loss.needs_virial()):
            pred = self._predict(head, batch, create_graph=True)
        atype = batch.atype.to(self.device)
        loss, _ = runtime.loss(pred, labels_on(batch, self.device), batch.find, atype, lr / runtime.schedule.start_lr)
        what = None
        if not bool(torch.isfinite(loss.detach())):
            what = f"loss {float(loss.detach())}"
        else:
            # only toward this head's trainable parameters: a plain backward() also runs the
            # whole first-order graph back to the coordinates (their .grad is never read),
            # 7-10 % of a force-trained step (benchmarks/ab_step.py)
            trainable = [p for p in optimizer_params(runtime.optimizer) if p.requires_grad]
            if trainable:
                loss.backward(inputs=trainable)
        if self.group.enabled:  # every rank takes the same decision (one all_reduce)
            what = self._average_gradients(runtime, what)
        if what is None:
            grads = [p.grad for p in optimizer_params(runtime.optimizer) if p.grad is not None]
            # one fused norm per tensor instead of three element-wise passes each: a NaN or inf
            # anywhere makes its norm non-finite (so does a component above ~1e154, already garbage)
            if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                what = "gradient"
        if what is not None:
            self.model.zero_grad(set_to_none=True)  # also gradients outside this optimiser (a Δ head's fixed base)
            warnings.warn(f"step {self.step + 1}, head '{head}': non-finite {what}; this step's update is skipped")
            return False
        runtime.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return True

    def _average_gradients(self, runtime: HeadRuntime, what: Optional[str]) -> Optional[str]:
        """Data-parallel: average this head's gradients over the ranks; the same message says
        whether any rank had a non-finite loss and whether any rank was asked to stop."""
        params = optimizer_params(runtime.optimizer)
        interrupt = getattr(self, "_interrupt", None)
        flags = distributed.average_gradients(
            params, [0.0 if what is None else 1.0, 1.0 if interrupt is not None and interrupt.requested else 0.0],
            f"averaging the gradients of step {self.step + 1}",
        )
        self._stop_agreed = flags[1] > 0
        if what is None and flags[0] > 0:
            what = "loss on another rank"
        return what

    def _stop_requested(self, stop: _StopOnInterrupt) -> bool:
        """Data-parallel: the stop agreed in the last step's all_reduce (a rank that left the loop
        alone would leave the others waiting)."""
        return self._stop_agreed if self.group.enabled else stop.requested

    def evaluate_batch(self, head: str, batch: Batch) -> tuple[dict, float]:
        runtime = self.heads[head]
        lr = runtime.schedule.value(self.step)
        pred = self._predict(head, batch, create_graph=False)
        pred = {k: v.detach() for k, v in pred.items()}
        atype = batch.atype.to(self.device)
        _, metrics = runtime.loss(pred, labels_on(batch, self.device), batch.find, atype, lr / runtime.schedule.start_lr, metrics=True)
        weight = runtime.loss.metric_weight(atype, pred)
        if self.group.enabled:  # the metrics of the summed batch, pooled over the ranks' slices
            metrics = pooled_over_ranks(distributed.gather_objects((metrics, batch.nframes * weight), "pooling display metrics"))
        return metrics, weight

    def display_values(self) -> dict[str, tuple[dict, Optional[dict], float]]:
        """Per trained head: metrics on one fresh training batch and on numb_btch validation batches."""
        values = {}
        for head in self.trained:
            runtime = self.heads[head]
            trn, _ = self.evaluate_batch(head, runtime.train.sample(self.rng))
            val = None
            if runtime.valid is not None:
                # weighted by atoms as DeePMD-kit, but a batch whose system lacks a label does not
                # turn that metric into NaN: it is averaged over the batches that have the label
                sums: dict[str, float] = {}
                weights: dict[str, float] = {}
                for _ in range(runtime.numb_btch):
                    metrics, weight = self.evaluate_batch(head, runtime.valid.sample(self.rng))
                    for key, value in metrics.items():
                        if math.isfinite(value):
                            sums[key] = sums.get(key, 0.0) + value * weight
                            weights[key] = weights.get(key, 0.0) + weight
                val = {k: sums[k] / weights[k] if weights.get(k) else math.nan for k in metrics}
            values[head] = (trn, val, runtime.schedule.value(self.step))
        return values

    def fixed_set_metrics(self, head: str) -> dict[str, float]:
        """The head's metrics on its fixed validation frames, pooled over all of them. A
        non-finite prediction makes every metric NaN (never a best model)."""
        return self.pooled_metrics(head, self.best.heads[head].chunks)

    def pooled_metrics(self, head: str, chunks: list) -> dict[str, float]:
        """The head's loss metrics on the validation frames ``chunks`` (system index, frames),
        pooled over all of them (√(Σ atoms·rmse²/Σ atoms))."""
        runtime = self.heads[head]
        parts = []
        diverged = False
        if self.group.enabled:  # each rank evaluates every world-th chunk; the parts are pooled
            chunks = chunks[self.group.rank :: self.group.world]
        for index, frames in chunks:
            batch = runtime.valid.batch(index, frames)
            lr = runtime.schedule.value(self.step)
            pred = {k: v.detach() for k, v in self._predict(head, batch, create_graph=False).items()}
            if not all(bool(torch.isfinite(v).all()) for v in pred.values() if v.is_floating_point()):
                diverged = True
                break
            atype = batch.atype.to(self.device)
            _, metrics = runtime.loss(pred, labels_on(batch, self.device), batch.find, atype,
                                      lr / runtime.schedule.start_lr, metrics=True)
            parts.append((metrics, batch.nframes * runtime.loss.metric_weight(atype, pred)))
        if self.group.enabled:
            gathered = distributed.gather_objects((diverged, parts), f"pooling head '{head}' validation metrics")
            diverged = any(bad for bad, _ in gathered)
            parts = [part for _, rank_parts in gathered for part in rank_parts]
        if diverged:
            return {name: math.nan for name in runtime.loss.metric_names()}
        return pooled_rmse(parts)

    def forgetting_metrics(self) -> dict[str, dict]:
        """Each old head's metrics on ALL its validation frames (the forgetting report)."""
        out = {}
        for head in self.forgetting_heads:
            chunks, total = fixed_frames(self.heads[head].valid, None, self.seed, head)
            out[head] = {"validation_frames": total, "metrics": self.pooled_metrics(head, chunks)}
        return out

    def write_forgetting(self, path: Path) -> Optional[Path]:
        """forgetting.json beside lcurve.out and a table: each old head's validation error with the
        --init-model weights and now. A file of that name this run did not write is kept (the
        report then goes to forgetting.<run id>.json)."""
        if not self.forgetting_heads:
            return None
        after = self.forgetting_metrics()
        if not self.group.is_main:
            return None
        report = {
            "init_model": getattr(self, "init_path", ""),
            "run_id": self.best.run_id,
            "step": self.step,
            "heads": {
                h: {
                    "trained": h in self.trained,
                    "fitting_weight": float(self.config.heads[h].weight),
                    "validation_frames": after[h]["validation_frames"],
                    "before": self.forgetting_before[h]["metrics"],
                    "after": after[h]["metrics"],
                }
                for h in self.forgetting_heads
            },
        }
        if path.exists() or path.is_symlink():
            try:
                ours = json.loads(path.read_text()).get("run_id") == self.best.run_id
            except (OSError, ValueError, AttributeError):
                ours = False
            if not ours:
                path = path.with_name(f"{path.stem}.{self.best.run_id[:8]}{path.suffix}")
        atomic_text(path, json.dumps(report, indent=2, allow_nan=True) + "\n")
        print_table(self.console, forgetting_table(report, path.name))
        return path

    def validate(self, checkpoints: CheckpointManager) -> list[str]:
        """Evaluate the heads due at this step; write the best file of each that improved.
        Returns the heads that early stopping stopped now."""
        newly_stopped = []
        for head, best in self.best.heads.items():
            if not best.due(self.step):
                continue
            metrics = self.fixed_set_metrics(head)
            previous = best.metric
            if best.revise_default(metrics) is not None:
                self.console.print(
                    f"head '{head}': its validation frames have no label for {previous}; its best model is judged by "
                    f"{best.metric} (set best_metric to choose)", highlight=False, soft_wrap=True,
                )
            value = float(metrics.get(best.metric, math.nan))
            bad = next((k for k, v in self.model.state_dict().items()
                        if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
            if bad is not None and math.isfinite(value) and value < best.value:
                warnings.warn(f"step {self.step}, head '{head}': parameter {bad} is not finite; not taken as its best model")
                value = math.nan
            if not math.isfinite(value) and head not in self._warned_nan_metric:
                self._warned_nan_metric.add(head)
                warnings.warn(
                    f"step {self.step}, head '{head}': {best.metric} is not finite on its validation frames (a label "
                    "missing from the validation data, or a diverged model); such an evaluation is never its best"
                )
            improved = best.update(self.step, value)
            if improved and head in self._best_ahead and value < self._best_ahead[head][0]:
                del self._best_ahead[head]  # better than the newer file a killed attempt left: replace it
            if improved and head not in self._best_ahead and self.group.is_main:  # data-parallel: rank 0 writes
                state = {k: v for k, v in self.state_dict().items() if k != "optimizers"}
                state["best_of"] = {"head": head, "metric": best.metric, "value": best.value, "step": self.step,
                                    "run_id": self.best.run_id, "validation_frames": best.nframes}
                _, best.digest = checkpoints.save_best(state, head)
            elif best.stopped is not None:
                newly_stopped.append(head)
                self.console.print(
                    f"head '{head}': {best.metric} did not improve in {best.patience} evaluations (best {best.value:.3e} "
                    f"at step {best.step}); no longer trained from step {self.step}", highlight=False, soft_wrap=True,
                )
        return newly_stopped

    def _adopt_best_files(self, checkpoints: CheckpointManager, continuing: bool) -> None:
        """--restart: keep comparing against the best files the continued run wrote (same run
        id). A newer one (written after the restart checkpoint) is adopted with its value; a
        missing or foreign one restarts that head's comparison (a foreign file is moved aside
        at the first write, never overwritten). Data-parallel: rank 0 decides, the others follow."""
        if not self.group.is_main:
            self.best.load_state_dict(distributed.broadcast_object(None, "receiving the best-model state"))
            return
        self._adopt_best_files_here(checkpoints, continuing)
        if self.group.enabled:
            distributed.broadcast_object(self.best.state_dict(), "sending the best-model state")

    def _adopt_best_files_here(self, checkpoints: CheckpointManager, continuing: bool) -> None:
        for head, best in self.best.heads.items():
            path = checkpoints.best_path(head)
            found = None
            if continuing and path.is_file():
                try:
                    found = read_checkpoint_file(path).get("best_of")
                except MtcoreError:
                    found = None
                if not isinstance(found, dict) or found.get("run_id") != self.best.run_id or found.get("head") != head \
                        or found.get("metric") != best.metric:
                    found = None
            if found is not None:
                checkpoints.adopt_best(head)
                if int(found["step"]) > self.step:
                    # written after the restart checkpoint (a kill before the next save): the replay
                    # keeps the checkpoint's record, so that its decisions (the patience count) are
                    # those of an uninterrupted run; the file is replaced only by a better model
                    self._best_ahead[head] = (float(found["value"]), int(found["step"]))
                    self.console.print(f"head '{head}': {path.name} (step {found['step']}) adopted as its best model so far "
                                       "(newer than the restart checkpoint: kept unless the continued run does better)",
                                       highlight=False, soft_wrap=True)
                elif found.get("step") != best.step or found.get("value") != best.value:
                    best.value, best.step = float(found["value"]), int(found["step"])
                    self.console.print(f"head '{head}': {path.name} (step {best.step}) adopted as its best model so far")
            elif best.step is not None:
                self.console.print(
                    f"head '{head}': {path.name} is not the best model this run wrote; its best model is chosen again "
                    "from the next evaluation", highlight=False, soft_wrap=True,
                )
                best.reset()

    # checkpoints ---------------------------------------------------------------------------
    def non_finite_parameter(self) -> Optional[str]:
        """The first model parameter/buffer or optimiser moment holding NaN or inf, if any."""
        for name, value in self.model.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name
        for head in self.trained:
            for slot in self.heads[head].optimizer.state.values():
                for key, value in slot.items():
                    if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        return f"optimizer of head '{head}' ({key})"
        return None

    def save_checkpoint(self, checkpoints: CheckpointManager) -> Path:
        """Save unless something is non-finite: a NaN checkpoint never replaces a good one."""
        bad = self.non_finite_parameter()
        if bad is not None:
            last = checkpoints.owned[0] if checkpoints.owned else None
            raise MtcoreError(
                f"step {self.step}: {bad} is not finite; no checkpoint written"
                + (f" (the last good one is {checkpoints.folder / last})" if last else "")
            )
        if not self.group.is_main:  # data-parallel: rank 0 writes; the others learn that it did
            distributed.broadcast_object(None, f"waiting for rank 0's checkpoint of step {self.step}")
            return checkpoints.path_for(self.step)
        path = checkpoints.save(self.state_dict(), self.step)
        distributed.broadcast_object(None, f"confirming the checkpoint of step {self.step}")  # then a lost rank names it
        return path

    def state_dict(self) -> dict:
        from mtcore.provenance import of_trainer

        return {
            "format": FORMAT,
            "mtcore_version": mtcore.__version__,
            "provenance": of_trainer(self),  # which package provided each component (checked on load)
            "config": self.config.document,
            "multi_task": self.config.multi_task,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizers": {h: self.heads[h].optimizer.state_dict() for h in self.trained},
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "best": self.best.state_dict(),
            "forgetting_before": self.forgetting_before,
            "init_model_path": getattr(self, "init_path", None),
            "pseudo_teachers": self.pseudo_teachers,
            "datasets": {
                h: {
                    "train": self.heads[h].train.state_dict() if self.heads[h].train else None,
                    "valid": self.heads[h].valid.state_dict() if self.heads[h].valid else None,
                }
                for h in self.trained
            },
        }

    # the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to numb_steps; returns a summary (steps, seconds per step)."""
        training = self.config.training
        ckpt_folder, prefix = split_save_ckpt(self.workdir, training["save_ckpt"])
        if not self.group.is_main:  # data-parallel: only rank 0 touches the folders
            return self._run_locked(CheckpointManager(ckpt_folder, prefix, training.get("max_ckpt_keep", 5)))
        ensure_writable(self.workdir)
        ensure_writable(ckpt_folder, create=True)
        with locked([self.workdir, ckpt_folder]):
            return self._run_locked(CheckpointManager(ckpt_folder, prefix, training.get("max_ckpt_keep", 5)))

    def _prepare_folder(self, checkpoints: CheckpointManager, lcurve_path: Path) -> bool:
        """Clean what a killed run left, and keep an earlier run's files out of harm's way.
        Returns True when this run continues the run whose files are in the folder."""
        removed = checkpoints.remove_leftovers()
        forgetting = lcurve_path.with_name(FORGETTING_FILE)
        removed += remove_leftovers(self.workdir, [lcurve_path.name, "out.json", forgetting.name])
        if removed:
            self.console.print(f"removed {len(removed)} temporary file(s) left by an interrupted run")
        if self.restart is None or not checkpoints.continue_run(self.restart.get("path"), self.best.run_id):
            backup = checkpoints.backup_previous_run([lcurve_path] + ([forgetting] if self.forgetting_heads else []))
            if backup is not None:
                self.console.print(f"an earlier run's checkpoints and {lcurve_path.name} were moved to {backup}")
            return False
        dropped = truncate_after(lcurve_path, self.step)
        if dropped:
            self.console.print(f"{lcurve_path.name}: {dropped} line(s) after step {self.step} removed (they are trained again)")
        return True

    def _run_locked(self, checkpoints: CheckpointManager) -> dict:
        training = self.config.training
        disp_freq = max(1, int(training["disp_freq"]))
        save_freq = int(training["save_freq"])
        show = bool(training.get("disp_training", True))
        lcurve_path = self.workdir / training["disp_file"]
        appending = self.restart is not None
        main = self.group.is_main
        continuing = self._prepare_folder(checkpoints, lcurve_path) if main else False
        self._adopt_best_files(checkpoints, continuing)
        if main:
            atomic_text(self.workdir / "out.json", json.dumps(self.config.document, indent=2))
        columns = {
            h: (self.heads[h].loss.metric_names(), self.heads[h].valid is not None) for h in self.trained
        }
        notes = []
        if self.config.multi_task:
            shares = ", ".join(f"{h} {p:.6g}" for h, p in zip(self.trained, self.weights))
            notes.append(f"head draw probabilities, {self.weight_rule}: {shares}")
        lcurve = LcurveWriter(lcurve_path, columns, self.config.multi_task, append=appending, notes=notes) if show and main else None
        if self.forgetting_heads and not self.forgetting_before:
            self.forgetting_before = self.forgetting_metrics()  # the --init-model weights, before step 1
        if main:
            print_table(self.console, plan_table(self, self.bias_source))
        _timing("setup_done")
        timings: list[float] = []
        last_saved = -1
        skipped_in_a_row = 0
        max_nonfinite = int(training.get("max_nonfinite_steps") or MAX_NONFINITE_STEPS)
        stop = self._interrupt = _StopOnInterrupt()
        try:
            with stop, TrainingDisplay(self.console, self.numb_steps, self.step) as display:
                if not appending and self.step == 0:
                    if show:
                        values = self.display_values()
                        if lcurve is not None:
                            lcurve.write(self.step, values)
                        display.metrics(self.step, values)
                    if self.numb_steps > 0:
                        self.validate(checkpoints)
                while self.step < self.numb_steps and not self._stop_requested(stop) and self.active:
                    start = time.perf_counter()
                    head = self.draw_head()
                    updated = self.train_step(head)
                    timings.append(time.perf_counter() - start)
                    self.step += 1
                    if len(timings) == 1:
                        _timing("first_step_done")
                    skipped_in_a_row = 0 if updated is not False else skipped_in_a_row + 1
                    if skipped_in_a_row >= max_nonfinite:
                        last = checkpoints.owned[0] if checkpoints.owned else None
                        raise MtcoreError(
                            f"training stopped at step {self.step}: {skipped_in_a_row} steps in a row had a non-finite "
                            f"loss or gradient (last on head '{head}'); check the labels of its data"
                            + (f"; the last good checkpoint is {checkpoints.folder / last}" if last else "")
                        )
                    display.advance(self.step, float(np.mean(timings[-20:])))
                    if show and self.step % disp_freq == 0:
                        values = self.display_values()
                        if lcurve is not None:
                            lcurve.write(self.step, values)
                        display.metrics(self.step, values)
                    self.validate(checkpoints)
                    if save_freq > 0 and self.step % save_freq == 0:
                        self.save_checkpoint(checkpoints)
                        last_saved = self.step
                if last_saved != self.step:
                    self.save_checkpoint(checkpoints)
        except distributed.PeerLost as exc:
            distributed.stand_down()
            if self.group.is_main and checkpoints.owned:  # rank 0 knows what it wrote
                last = checkpoints.folder / checkpoints.owned[0]
            else:  # the others: the last one rank 0 confirmed
                last = checkpoints.path_for(last_saved) if last_saved >= 0 else (self.restart or {}).get("path")
            raise MtcoreError(
                f"rank {exc.rank} of {exc.world} lost its peers at step {self.step} ({exc.detail}); the job stops; "
                + (f"the last checkpoint is {last} (continue with mtcore train --restart {last})" if last
                   else "no checkpoint was written")
            ) from None
        finally:
            if lcurve is not None:
                lcurve.close()
        skip = min(len(timings) - 1, 10) if timings else 0
        per_step = float(np.mean(timings[skip:])) if timings else math.nan
        if self._stop_requested(stop):
            name = signal.Signals(stop.signum).name if stop.signum else "interrupt"
            shown = os.path.relpath(checkpoints.path_for(self.step), self.workdir)
            self.console.print(
                f"interrupted ({name}) at step {self.step}: checkpoint saved; continue with "
                f"mtcore train --restart {shown}"
            )
        else:
            if not self.active:
                self.console.print(f"every head stopped early (patience) by step {self.step}: training ended, checkpoint saved")
            if timings:
                self.console.print(f"finished training: {len(timings)} steps, {per_step * 1000:.1f} ms/step (first {skip} excluded)")
        if main and (self.best.heads or self.best.without_validation):
            print_table(self.console, best_summary_table(self.best, checkpoints, self.workdir))
        self.write_forgetting(lcurve_path.with_name(FORGETTING_FILE))
        return {"steps": len(timings), "seconds_per_step": per_step, "interrupted": self._stop_requested(stop),
                "signal": stop.signum or (signal.SIGTERM if self._stop_requested(stop) else None),
                "best": {h: b.state_dict() for h, b in self.best.heads.items()}}
