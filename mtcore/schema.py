"""The dargs input schema, assembled from whatever plugins are registered.

The core owns the sections that are not plugins (``learning_rate``, ``training``, the data
sections); each descriptor, fitting net and loss plugin contributes its own arguments, selected
by ``type`` through a dargs ``Variant``. :func:`check` normalises a section (aliases, defaults,
``_comment`` keys dropped) and checks it strictly, turning dargs' messages into one-line
:class:`~mtcore.errors.MtcoreError` s that name the key path.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from dargs import Argument, Variant

from mtcore.errors import MtcoreError
from mtcore.hookspecs import SchemaContext
from mtcore.plugins import Registry


def _variant(registry: Registry, kind: str, ctx: SchemaContext, default: str = "", exclude: Sequence[str] = ()) -> Variant:
    choices = []
    for entry in registry.choices(kind):  # an ambiguous name is refused only where it is used
        if entry.name in exclude:
            continue
        reg = entry.registration
        choices.append(Argument(reg.name, dict, reg.arguments(ctx), alias=list(reg.aliases), doc=reg.doc))
    return Variant("type", choices, optional=bool(default), default_tag=default, doc=f"the {kind} type")


def schema_context(registry: Registry) -> SchemaContext:
    ctx = SchemaContext(descriptor_variant=lambda exclude: _variant(registry, "descriptor", ctx, exclude=exclude))
    return ctx


def descriptor_argument(registry: Registry) -> Argument:
    ctx = schema_context(registry)
    return Argument("descriptor", dict, [], [_variant(registry, "descriptor", ctx)], doc="the shared descriptor")


def fitting_argument(registry: Registry, name: str = "fitting_net") -> Argument:
    ctx = schema_context(registry)
    delta = [
        # no defaults: unset keys stay absent (a head without a base is the plain head it always was)
        Argument("base_head", [str, None], optional=True,
                 doc="Δ-learning (multi-task): this head's atomic output is the named head's plus this head's own net "
                 "(a scarce high level of theory as a correction to a rich low level; docs/multitask.md)"),
        Argument("base_trainable", bool, optional=True,
                 doc="with base_head: this head's loss also trains the base head's net (default true; false: only the "
                 "correction and the descriptor)"),
        Argument("base_fitting_net", [dict, None], optional=True,
                 doc="written by freeze into a frozen Δ head's input (the base head's fitting settings); not set by hand"),
    ]
    return Argument(name, dict, delta, [_variant(registry, "fitting_net", ctx, default="ener")], doc="one head")


def loss_argument(registry: Registry, name: str = "loss", default: str = "ener") -> Argument:
    ctx = schema_context(registry)
    return Argument(name, dict, [], [_variant(registry, "loss", ctx, default=default)], optional=True, doc="a head's loss")


def learning_rate_argument(name: str = "learning_rate") -> Argument:
    exp = Argument(
        "exp",
        dict,
        [
            Argument("start_lr", float, optional=True, default=1e-3, doc="learning rate at step 0"),
            Argument("stop_lr", float, optional=True, default=1e-8, doc="learning rate reached at numb_steps"),
            Argument("decay_steps", int, optional=True, default=5000, doc="steps between decays"),
        ],
        doc="exponential (staircase) decay: lr(t) = start_lr·r^floor(t/decay_steps), lr(numb_steps) = stop_lr",
    )
    return Argument(
        name,
        dict,
        [Argument("scale_by_worker", str, optional=True, default="linear", doc="accepted for compatibility")],
        [Variant("type", [exp], optional=True, default_tag="exp")],
        optional=True,
        default={},
    )


def data_argument(name: str, validation: bool) -> Argument:
    args = [
        Argument("systems", [list, str], doc="systems (folders, or files for one-file-per-system formats), or one folder searched for systems"),
        Argument("set_prefix", str, optional=True, default="set", doc="prefix of the set folders"),
        Argument("batch_size", [list, int, str], optional=True, default="auto", doc="int, list, 'auto' or 'auto:N'"),
        Argument("auto_prob", str, optional=True, default="prob_sys_size", alias=["auto_prob_style"]),
        Argument("sys_probs", [list, None], optional=True, default=None, alias=["sys_weights"]),
    ]
    if validation:
        args.append(Argument("numb_btch", int, optional=True, default=1, alias=["numb_batch"], doc="batches per display"))
    else:
        args.append(Argument(
            "pseudo_labels", bool, optional=True, default=False,
            doc="with --init-model: label these frames with this head's predictions from the --init-model weights "
            "(energy, forces, virial or tensors; before any step) instead of their label files, so an old head whose "
            "data is gone replays them while new heads train (distillation against forgetting)",
        ))
    return Argument(name, [dict, None] if validation else dict, args, optional=True, default=None)


def best_model_arguments(per_head: bool) -> list[Argument]:
    """Keys of the fixed-set validation that keeps each head's best model (and early stopping).

    Under ``training`` they apply to every head; under ``training/data_dict/<head>`` (multi-task)
    a value other than null overrides the ``training`` one for that head."""
    inherit = " (null: the value under training)" if per_head else ""
    return [
        Argument(
            "validation_freq", [int, None], optional=True, default=None,
            doc="steps between evaluations of the head's fixed validation frames, which decide its best model"
            + (inherit if per_head else " (null: disp_freq)"),
        ),
        Argument(
            "validation_frames", [int, str, None], optional=True, default=None,
            doc="frames of the fixed, seeded subset of validation frames evaluated each time, or \"all\""
            + (inherit if per_head else " (null: as many frames as the display's numb_btch validation batches, "
               "so the default costs what the display's validation costs)"),
        ),
        Argument(
            "best_metric", [str, None], optional=True, default=None,
            doc="metric (a name of the loss's metrics, e.g. rmse_f, rmse_e, rmse_gl) whose improvement writes "
            "<prefix>.best.<head>.pt" + (inherit if per_head else " (null: rmse_f for energy heads, rmse_gl or rmse_lc for tensor heads)"),
        ),
        Argument(
            "patience", [int, None], optional=True, default=None,
            doc="early stopping: a head whose best_metric has not improved for this many evaluations is no longer "
            "drawn; the run ends when no head is left" + (inherit if per_head else " (null: off)"),
        ),
    ]


def data_dict_entry_argument(name: str) -> Argument:
    return Argument(
        name, dict,
        [data_argument("training_data", False), data_argument("validation_data", True), *best_model_arguments(True)],
    )


def training_argument() -> Argument:
    compat = "accepted for compatibility; not used by mtcore"
    return Argument(
        "training",
        dict,
        [
            data_argument("training_data", False),
            data_argument("validation_data", True),
            Argument("data_dict", dict, optional=True, default=None, doc="multi-task: head → its data"),
            Argument("fitting_weight", [dict, str], optional=True, default=None,
                     doc='multi-task: head → sampling weight, or "auto": each head with training data is drawn '
                     "with probability proportional to its number of training frames"),
            Argument("fitting_weight_final", [dict, None], optional=True, default=None,
                     doc="multi-task: head → sampling weight at numb_steps; the draw probabilities move linearly "
                     "from fitting_weight to these (e.g. a scarce head's share ramping up; docs/multitask.md)"),
            Argument("numb_steps", int, alias=["stop_batch"], doc="training steps (all heads together)"),
            Argument("seed", [int, None], optional=True, default=None, doc="seed of data sampling and head draws"),
            Argument("disp_file", str, optional=True, default="lcurve.out"),
            Argument("disp_freq", int, optional=True, default=1000),
            Argument("save_freq", int, optional=True, default=1000),
            Argument("save_ckpt", str, optional=True, default="model.ckpt"),
            Argument("max_ckpt_keep", int, optional=True, default=5, doc="periodic checkpoints kept"),
            Argument("max_nonfinite_steps", int, optional=True, default=5,
                     doc="a step whose loss or gradient is NaN or inf is skipped (a warning names step and head); this "
                     "many in a row stop training, naming the last good checkpoint (docs/reliability.md)"),
            *best_model_arguments(False),
            Argument("disp_training", bool, optional=True, default=True),
            Argument("time_training", bool, optional=True, default=True),
            Argument(
                "mixed_precision",
                dict,
                [
                    Argument("output_prec", str, optional=True, default="float32",
                             doc="float64 or float32: trainable weights, optimiser state, the environment matrix, "
                             "statistics, energy sums, forces, virials and the loss; overrides every component's "
                             "precision"),
                    Argument("compute_prec", str,
                             doc="float32, float16 or bfloat16 (no wider than output_prec): the matrix products and "
                             "activations inside every network layer"),
                ],
                optional=True,
                default=None,
                doc="mixed precision: network layers compute in compute_prec, everything else stays in output_prec "
                "(docs/performance.md, Mixed precision)",
            ),
            Argument("profiling", bool, optional=True, default=False, doc=compat),
            Argument("profiling_file", str, optional=True, default="timeline.json", doc=compat),
            Argument("enable_profiler", bool, optional=True, default=False, doc=compat),
            Argument("tensorboard", bool, optional=True, default=False, doc=compat),
            Argument("tensorboard_log_dir", str, optional=True, default="log", doc=compat),
            Argument("tensorboard_freq", int, optional=True, default=1, doc=compat),
        ],
    )


def model_argument(registry: Registry) -> Argument:
    type_embedding = Argument(
        "type_embedding",
        dict,
        [
            Argument("neuron", list, optional=True, default=[8]),
            Argument("activation_function", str, optional=True, default="tanh"),
            Argument("resnet_dt", bool, optional=True, default=False),
            Argument("precision", str, optional=True, default="default"),
            Argument("trainable", bool, optional=True, default=True),
            Argument("seed", [int, None], optional=True, default=None),
        ],
        optional=True,
        default=None,
    )
    fitting = fitting_argument(registry)
    fitting.optional = True
    return Argument(
        "model",
        dict,
        [
            Argument("type_map", list, optional=True, default=None, doc="element name of each type index"),
            Argument("data_stat_nbatch", int, optional=True, default=10, doc="batches per system for statistics"),
            Argument("data_stat_nframes", int, optional=True, default=1000,
                     doc="the most frames one head's statistics (davg/dstd, output bias) read: data_stat_nbatch batches "
                     "per system while they fit, fewer per system beyond, then a seeded choice of systems "
                     "(docs/performance.md, 'Data larger than memory')"),
            Argument("neighbor_stat_nframes", int, optional=True, default=1000,
                     doc='the most frames sel "auto" reads (all trained heads\' training systems pooled): every frame '
                     "when they hold at most this many, else an even seeded share per system"),
            Argument("data_stat_protect", float, optional=True, default=1e-2),
            type_embedding,
            descriptor_argument(registry),
            fitting,
            Argument("fitting_net_dict", dict, optional=True, default=None, doc="multi-task: head → fitting net"),
        ],
    )


def input_argument(registry: Registry) -> Argument:
    """The whole input document; multi-task dict entries are checked one by one afterwards."""
    return Argument(
        "input",
        dict,
        [
            model_argument(registry),
            learning_rate_argument(),
            Argument("learning_rate_dict", dict, optional=True, default=None),
            loss_argument(registry),
            Argument("loss_dict", dict, optional=True, default=None),
            training_argument(),
            Argument("nvnmd", dict, optional=True, default=None, doc="accepted for compatibility; not used"),
        ],
    )


_LOCATION = re.compile(r"^\[at (?:root location|location `([^`]*)`)\]\s*")


def check(argument: Argument, value: Any, where: Optional[str] = None) -> Any:
    """Normalise and strictly check ``value`` against ``argument``; errors name the key path.

    ``where`` is the path of ``value`` in the input (the root document when None)."""
    try:
        normalized = argument.normalize_value(value, trim_pattern="_*")
        argument.check_value(normalized, strict=True)
    except MtcoreError:
        raise
    except Exception as exc:  # dargs raises its own ArgumentError subclasses, also KeyError/TypeError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        match = _LOCATION.match(message)
        location = match.group(1) if match and match.group(1) else ""
        message = _LOCATION.sub("", message).rstrip(":").rstrip()
        path = "/".join(p for p in (where, location) if p)
        raise MtcoreError(f"{path}: {message}" if path else message) from None
    return normalized
