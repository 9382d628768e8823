"""The ``mtcore`` command line: train, freeze, test, show, list-plugins, doc-train-input.

Every user error becomes one line on stderr (``error: <key or file>: <what was expected>``) and a
non-zero exit; warnings are printed as ``warning: ...`` lines. An unexpected exception (a bug) is
one line too (``internal error: ...``); ``mtcore --debug ...`` or ``MTCORE_DEBUG=1`` shows the
traceback of either kind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mtcore.errors import MtcoreError
from mtcore.runtime import tune_allocator

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Multi-task training of deep potential models.")
console = Console()
errors = Console(stderr=True)


_debug = {"on": False}


def _debugging() -> bool:
    return _debug["on"] or os.environ.get("MTCORE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error (also MTCORE_DEBUG=1)"),
) -> None:
    """Multi-task training of deep potential models."""
    _debug["on"] = debug


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines[:1]) + (" ..." if len(lines) > 1 else "")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    errors.print(Text.assemble(("warning:", "yellow"), f" {message}"), highlight=False, soft_wrap=True)


def _run(func, *args, **kwargs):
    """Run a command body: MtcoreError → one line and exit 1; warnings → one line each."""
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    tune_allocator()  # reuse freed tensor memory instead of page-faulting fresh pages each step
    try:
        return func(*args, **kwargs)
    except MtcoreError as exc:
        if _debugging():
            errors.print(Text(traceback.format_exc().rstrip()), highlight=False, soft_wrap=True)
        errors.print(Text.assemble(("error:", "red"), f" {_one_line(exc)}"), highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback only with --debug
        if _debugging():
            errors.print(Text(traceback.format_exc().rstrip()), highlight=False, soft_wrap=True)
            errors.print(Text.assemble(("internal error:", "red"), f" {type(exc).__name__}: {_one_line(exc)}"),
                         highlight=False, soft_wrap=True)
        else:
            line = f" {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)"
            errors.print(Text.assemble(("internal error:", "red"), line), highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = previous


@app.command()
def train(
    input_file: Optional[Path] = typer.Argument(None, help="input JSON (DeePMD-kit v2 keys); optional with --restart"),
    restart: Optional[str] = typer.Option(
        None, "--restart", "-r", help="continue this checkpoint's run; a folder: its newest complete checkpoint; 'auto' "
        "(with the input file): the newest complete one in save_ckpt's folder, or a fresh run when there is none"
    ),
    init_model: Optional[Path] = typer.Option(
        None, "--init-model", "-i", help="start a new run from the weights of a checkpoint or a frozen (united) model"
    ),
    head: Optional[str] = typer.Option(None, "--head", help="with --init-model: the checkpoint head to start from"),
    init_optimizer: bool = typer.Option(
        False, "--init-optimizer", help="with --init-model CHECKPOINT: old heads also keep their Adam state (moments, step count)"
    ),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu)"),
) -> None:
    """Train a model (single- or multi-task, detected from the input)."""

    def body():
        import signal

        from mtcore.config import load_config
        from mtcore.train.checkpoint import load_checkpoint, split_save_ckpt
        from mtcore.train.init_source import load_init_source
        from mtcore.train.outdir import ensure_writable, locked
        from mtcore.train.trainer import Trainer
        from mtcore.train import distributed

        if restart is not None and restart != RESTART_AUTO and init_model is not None:
            raise MtcoreError("--restart and --init-model exclude each other (except --restart auto: --init-model then "
                              "starts the run when there is no checkpoint to continue)")
        if head is not None and init_model is None:
            raise MtcoreError("--head only applies with --init-model")
        if init_optimizer and init_model is None:
            raise MtcoreError("--init-optimizer only applies with --init-model")
        if restart is None and input_file is None:
            raise MtcoreError("give an input file (or --restart CHECKPOINT)")
        auto = restart == RESTART_AUTO  # a folder named auto: --restart ./auto
        if auto and input_file is None:
            raise MtcoreError("--restart auto: give the input file too (its training/save_ckpt says where the checkpoints are)")
        workdir = Path(".")
        group, train_device = distributed.setup(device)  # torchrun: join the process group (docs/distributed.md)
        own = distributed.main_only  # data-parallel: rank 0 alone checks, locks and writes the folders
        if not group.is_main:  # rank 0 says it once (errors still print on every rank)
            console.quiet = True
            warnings.simplefilter("ignore")
        if group.is_main:
            ensure_writable(workdir)  # before anything is loaded: a read-only folder fails at once

        def terminated(signum, frame):  # until the trainer's loop takes SIGTERM over: exit cleanly
            raise SystemExit(143)

        import threading

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminated) if main else None
        try:
            with own(locked([workdir])):  # a second run here refuses now, naming this one
                restart_state = load_checkpoint(Path(restart), data_loaders=True) if restart is not None and not auto else None
                config = None
                if restart_state is not None:
                    if input_file is not None:
                        console.print(f"--restart uses the configuration stored in {restart_state['path']}; {input_file} is not read")
                    save_ckpt = restart_state["config"]["training"].get("save_ckpt", "model.ckpt")
                else:
                    config = load_config(input_file)
                    save_ckpt = config.training.get("save_ckpt", "model.ckpt")
                ckpt_folder, prefix = split_save_ckpt(workdir, save_ckpt)
                if group.is_main:
                    ensure_writable(ckpt_folder, create=True)
                with own(locked([ckpt_folder])):
                    if auto:  # picked with the folder locked: no run of ours writes there meanwhile
                        restart_state = _pick_restart_auto(ckpt_folder, prefix, input_file, config.document)
                        config = None if restart_state is not None else config
                    if restart_state is not None and init_model is not None:  # --restart auto found one
                        console.print(f"--init-model {init_model}: not used (the run continues from {restart_state['path']})",
                                      highlight=False, soft_wrap=True)
                    use_init = init_model is not None and restart_state is None
                    init_state = load_init_source(init_model) if use_init else None
                    trainer = Trainer(config, workdir, console, restart=restart_state, init_model=init_state,
                                      init_head=head if use_init else None, device=train_device,
                                      init_optimizer=init_optimizer and use_init)
                    summary = trainer.run()
            distributed.wait_for_peers()  # locks released, files written: now all ranks may leave
        finally:
            distributed.shutdown()
            if main and not distributed.peers_lost():  # else SIGTERM stays ignored until the error is printed
                signal.signal(signal.SIGTERM, previous)
        if summary.get("interrupted"):
            # 143 = 128 + SIGTERM (what a scheduler sent), 130 = 128 + SIGINT (Ctrl-C)
            raise typer.Exit(143 if summary.get("signal") == signal.SIGTERM else 130)

    try:
        _run(body)
    except typer.Exit as exc:
        _leave_now_if_distributed(exc.exit_code)
        raise
    _leave_now_if_distributed(0)


def _leave_now_if_distributed(code: int) -> None:
    """A torchrun rank ends its process here, with the exit code the user was promised, once
    its locks are released and its files written: after the ordered departure of a clean end
    (distributed.wait_for_peers), or after the one line of a rank whose peers died. Letting the
    interpreter tear torch's process group down then can abort in gloo's C++ destructors
    ("terminate called without an active exception", exit -6 instead of 0 or 1; seen under
    load)."""
    from mtcore.train import distributed

    if distributed.peers_lost() or distributed.departure_arranged():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


#: ``--restart auto``: continue from the newest complete checkpoint, or start fresh when there is none
RESTART_AUTO = "auto"


def _config_differences(mine, stored, path: str = "") -> list[str]:
    """Keys set in both documents with different values (``input`` vs a checkpoint's config).
    Keys only one has (defaults added by a newer version) and values resolved at the start of a
    run (``sel: "auto"``, a null seed) are not differences."""
    if isinstance(mine, dict) and isinstance(stored, dict):
        return [d for key in mine if key in stored for d in _config_differences(mine[key], stored[key], f"{path}/{key}")]
    if mine is None or (isinstance(mine, str) and mine.startswith("auto")) or mine == stored:
        return []
    return [f"{path.lstrip('/')} {json.dumps(mine, default=str)} (checkpoint: {json.dumps(stored, default=str)})"]


def _pick_restart_auto(folder: Path, prefix: str, input_file: Path, document: Optional[dict] = None) -> Optional[dict]:
    """``--restart auto``: the newest complete checkpoint of save_ckpt, or None (a fresh run).

    Under torchrun rank 0 alone picks (it holds the folder lock) and broadcasts the path, so
    every rank continues from the same file even if a save lands in between."""
    from mtcore.train import distributed
    from mtcore.train.checkpoint import check_provenance, newest_complete, read_checkpoint_file

    group = distributed.current()
    state = None
    if group.is_main:
        state, why = newest_complete(folder, prefix)
        if state is None:
            console.print(f"--restart auto: {why}; starting a fresh run from {input_file}", highlight=False, soft_wrap=True)
        else:
            console.print(f"--restart auto: continuing from {state['path']} (step {state['step']}) with the configuration "
                          f"stored there; {input_file} gave only save_ckpt", highlight=False, soft_wrap=True)
            stored = dict(state.get("config") or {})
            if state.get("init_model_path"):  # its descriptor came from the --init-model source, not the input
                stored["model"] = {k: v for k, v in (stored.get("model") or {}).items() if k != "descriptor"}
            changed = _config_differences(document or {}, stored)
            if changed:  # e.g. numb_steps raised in the input: a job script would end at once without a word
                warnings.warn(f"{input_file} differs from the checkpoint's configuration, which the run continues with: "
                              + "; ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                              + "; to train with the input's, start a new run (without --restart, or --init-model)")
    path = distributed.broadcast_object(state["path"] if state is not None else None, "choosing the --restart auto checkpoint")
    if path is None:
        return None
    if state is None:
        state = read_checkpoint_file(Path(path))
    check_provenance(state, data_loaders=True)
    return state


@app.command()
def freeze(
    checkpoint: Path = typer.Option(Path("."), "--checkpoint", "-c", help="checkpoint file, or folder with a 'checkpoint' index"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output file (default frozen_model.pth)"),
    head: Optional[str] = typer.Option(None, "--head", help="multi-task: 'all' (default, one file per head) or one head"),
    united: bool = typer.Option(False, "--united", help="multi-task: every head in one file"),
    best: bool = typer.Option(
        False, "--best", help="each head from its own best model (model.best.<head>.pt, lowest validation metric)"
    ),
) -> None:
    """Write self-contained TorchScript model file(s)."""

    def body():
        from mtcore.freeze import freeze as do_freeze
        from mtcore.freeze import freeze_best
        from mtcore.train.checkpoint import load_checkpoint
        from mtcore.train.outdir import ensure_can_create

        ensure_can_create(output or Path("frozen_model.pth"))  # before the checkpoint is read
        state = load_checkpoint(checkpoint)
        if best:
            for path, mark in freeze_best(state, output, head, united):
                console.print(f"wrote {path} (head {mark['head']}: best {mark['metric']} {mark['value']:.3e} at step "
                              f"{mark['step']})", highlight=False, soft_wrap=True)
            return
        for path in do_freeze(state, output, head, united):
            console.print(f"wrote {path}")

    _run(body)


@app.command()
def compress(
    input_: Path = typer.Option(Path("frozen_model.pth"), "--input", "-i", help="frozen model file (mtcore freeze)"),
    output: Path = typer.Option(Path("frozen_model_compressed.pth"), "--output", "-o", help="compressed model file"),
    step: float = typer.Option(0.01, "--step", "-s", help="table step in the embedding nets' input (extrapolation region: 10x)"),
    extrapolate: float = typer.Option(5.0, "--extrapolate", "-e", help="the table spans this many times the training data's input range"),
    check_frequency: int = typer.Option(-1, "--check-frequency", "--frequency", "-f", help="warn every N evaluations about inputs outside the training range (-1: never)"),
    training_script: Optional[Path] = typer.Option(None, "--training-script", "-t", help="input whose training data gives the range (default: the one recorded in -i)"),
) -> None:
    """Tabulate the embedding nets of a frozen model (as dp compress): faster inference, same results."""

    def body():
        from mtcore.compress import compress as do_compress
        from mtcore.train.outdir import ensure_can_create

        ensure_can_create(output)  # before the model is read
        info = do_compress(input_, output, step, extrapolate, training_script, check_frequency)
        console.print(f"wrote {output}: {len(info['tables'])} embedding net(s) tabulated "
                      f"(step {step:g}, min neighbour distance {info['min_distance']:.3f} Å)", highlight=False)

    _run(body)


@app.command("test")
def test_cmd(
    model: Path = typer.Option(Path("frozen_model.pth"), "--model", "-m", help="frozen model file"),
    system: List[str] = typer.Option([], "--system", "-s", help="system folder(s) or file(s), or a folder searched for systems (default .)"),
    datafile: Optional[Path] = typer.Option(None, "--datafile", "-f", help="a text file listing systems (folders or files), one per line"),
    set_prefix: str = typer.Option("set", "--set-prefix", "-S", help="prefix of the set folders"),
    all_sets: bool = typer.Option(False, "--all-sets", help="test every set folder, not only the last one (dp test's choice)"),
    numb_test: int = typer.Option(0, "--numb-test", "-n", help="frames per system (0: all)"),
    head: Optional[str] = typer.Option(None, "--head", help="head of a united model"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    detail_file: Optional[Path] = typer.Option(
        None, "--detail-file", "-d", help="write label and prediction side by side to PREFIX.e.out, .f.out, ... (as dp test -d)"
    ),
) -> None:
    """Errors (MAE, RMSE) of a frozen model on labelled data."""

    def body():
        from mtcore.evaluate import run_test

        if numb_test < 0:
            raise MtcoreError(f"-n/--numb-test: must be 0 (all frames) or a positive number of frames, got {numb_test}")
        systems = list(system)
        if datafile is not None:
            try:
                listed = [line.strip() for line in datafile.read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise MtcoreError(f"-f/--datafile {datafile}: cannot read ({exc.strerror})") from None
            systems += listed  # relative to the working folder, as dp test reads them
        results, combined = run_test(model, systems or ["."], numb_test, head, detail_file, all_sets, set_prefix)
        if as_json:
            payload = {
                "systems": [
                    {"system": r.system, "nframes": r.nframes, "errors": {k: _json_stat(v) for k, v in r.stats.items()}}
                    for r in results
                ],
                "combined": {k: _json_stat(v) for k, v in combined.items()},
            }
            sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")
            return
        table = Table(title=f"{model}: {sum(r.nframes for r in results)} frames in {len(results)} system(s)")
        table.add_column("quantity")
        table.add_column("MAE", justify="right")
        table.add_column("RMSE", justify="right")
        for title, stat in combined.items():
            table.add_row(title, f"{stat.mae:.4e}", f"{stat.rmse:.4e}")
        console.print(table)

    _run(body)


def _json_stat(stat) -> dict:
    """MAE/RMSE for JSON: a non-finite value (not JSON) is written as null with the reason."""
    out: dict = {"mae": stat.mae, "rmse": stat.rmse}
    bad = [k for k in ("mae", "rmse") if not math.isfinite(out[k])]
    for key in bad:
        out[key] = None
    if bad:
        out["why"] = (
            "no values were compared" if not getattr(stat, "count", 1)
            else "not finite: the model predicted NaN or inf for some frame (labels are checked for NaN/inf on load)"
        )
    return out


@app.command("list-plugins")
def list_plugins() -> None:
    """Registered descriptors, fitting nets, losses and data loaders."""

    def body():
        from mtcore.plugins import get_registry

        registry = get_registry()
        table = Table(title="mtcore plugins")
        for column in ("kind", "name", "aliases", "package", "version", "api", "note"):
            table.add_column(column)
        for entry in registry.entries():
            note = registry.clash_note(entry)  # a name two packages register: listed, refused only where used
            table.add_row(entry.kind, entry.name + (" (!)" if note else ""), ", ".join(entry.aliases),
                          entry.source.distribution, entry.source.version, f"v{entry.source.api}", note)
        console.print(table)

    _run(body)


@app.command("doc-train-input")
def doc_train_input(
    as_json: bool = typer.Option(False, "--json", help="print the reference as JSON instead of markdown"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="write to this file (only a new file or one this command wrote is replaced)"
    ),
    only: List[str] = typer.Option([], "--only", help="document only the plugins of this distribution (repeatable), e.g. --only mtcore"),
) -> None:
    """The input reference: every key with its type, default, aliases and doc, from the installed plugins' schemas."""

    def body():
        from mtcore.doc_input import generate, only_distributions, write_reference
        from mtcore.plugins import get_registry

        text = generate(only_distributions(get_registry(), only), as_json)
        if output is None:
            sys.stdout.write(text)
            return
        write_reference(output, text)
        console.print(f"wrote {output}")

    _run(body)


@app.command()
def show(path: Path = typer.Argument(..., help="checkpoint or frozen model")) -> None:
    """The heads of a model or checkpoint: name, fitting type, type_map, descriptor, shared layers."""

    def body():
        from mtcore.show import describe

        info = describe(path)
        table = Table(title=f"{path} ({info['kind']})")
        for column in ("head", "fitting", "output", "type_map", "descriptor", "shared layers"):
            table.add_column(column)
        for head in info["heads"]:
            table.add_row(head["name"], head["fitting_type"], head["output"], " ".join(info["type_map"]),
                          info["descriptor"], ", ".join(head["shared_layers"]) or "-")
        console.print(table)
        for line in info.get("provenance", []):
            console.print(f"provided by: {line}", highlight=False)
        for line in info.get("notes", []):
            console.print(line, highlight=False)

    _run(body)


@app.command("model-devi")
def model_devi(
    models: List[Path] = typer.Option(..., "--models", "-m", help="two or more frozen models (or checkpoints) of one ensemble"),
    more: Optional[List[Path]] = typer.Argument(None, help="more models: '-m a.pth b.pth c.pth' works as in dp model-devi", show_default=False),
    system: List[str] = typer.Option([], "--system", "-s", help="system folder(s) or file(s), or a folder searched for systems (default .)"),
    output: Path = typer.Option(Path("model_devi.out"), "--output", "-o", help="output file (DeePMD-kit's model_devi.out layout)"),
    head: Optional[str] = typer.Option(None, "--head", help="the head of multi-head (united) models"),
    set_prefix: str = typer.Option("set", "--set-prefix", "-S", help="prefix of the set folders"),
    frequency: int = typer.Option(1, "--frequency", "-f", help="MD steps between frames: step = frame index x frequency"),
    relative: Optional[float] = typer.Option(None, "--relative", help="relative force deviation with this level: eps_F,i / (|<F_i>| + level)"),
    relative_v: Optional[float] = typer.Option(None, "--relative-v", "--relative_v", help="relative virial deviation with this level"),
) -> None:
    """Model deviation of an ensemble (max/min/avg force and virial deviation per frame), as dp model-devi."""

    def body():
        from mtcore.model_devi import make_model_devi

        ensemble = list(models) + list(more or [])
        done = make_model_devi(ensemble, list(system) or ["."], output, head, set_prefix, frequency, relative, relative_v)
        console.print(f"wrote {output}: {sum(n for _, n in done)} frames of {len(done)} system(s), {len(ensemble)} models")

    _run(body)


@app.command()
def plot(
    lcurve: Path = typer.Argument(Path("lcurve.out"), help="lcurve.out written by mtcore train"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="image file (.png, .pdf, .svg; needs matplotlib)"),
    terminal: bool = typer.Option(False, "--terminal", help="draw in the terminal (the default without -o)"),
) -> None:
    """Learning curves: one panel per metric, one line per head (training dashed, validation solid), log scale."""

    def body():
        from mtcore.plot import plot_lcurve

        written = plot_lcurve(lcurve, output, terminal, console)
        if written is not None:
            console.print(f"wrote {written}")

    _run(body)


@app.command("change-bias")
def change_bias_cmd(
    model: Path = typer.Argument(..., help="checkpoint or frozen (single-head) model"),
    system: List[str] = typer.Option([], "--system", "-s", help="labelled system folder(s) or file(s), or a folder searched for systems"),
    head: Optional[str] = typer.Option(None, "--head", help="the head of a multi-task checkpoint"),
    mode: str = typer.Option("change", "--mode", help="change: shift the bias by the fit to (label - prediction); set: fit it to the labels alone"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="new file (default <stem>_bias<suffix>; never replaces a file)"),
    set_prefix: str = typer.Option("set", "--set-prefix", "-S", help="prefix of the set folders"),
    numb_test: int = typer.Option(0, "--numb-test", "-n", help="frames per system (0: all)"),
) -> None:
    """Refit a head's per-type output bias (energy per element) to new data, as dp change-bias."""

    def body():
        from mtcore.change_bias import change_bias

        if not system:
            raise MtcoreError("-s/--system: give the labelled data to fit the bias to")
        path, info = change_bias(model, list(system), head, mode, output, set_prefix, numb_test)
        table = Table(title=f"{model} head '{info['head']}': {info['key']} bias ({mode}) from {info['frames']} frames")
        for column in ("type", "old bias", "new bias", "shift"):
            table.add_column(column, justify="right")
        for t, name in enumerate(info["type_map"]):
            old, new = info["old"][t], info["new"][t]
            table.add_row(name, " ".join(f"{v:.6f}" for v in old), " ".join(f"{v:.6f}" for v in new),
                          " ".join(f"{v:+.6f}" for v in new - old))
        console.print(table)
        what = f"{info['key']}/atom" if info["per_atom"] else info["key"]
        console.print(f"RMSE of {what}: {info['rmse_before']:.4e} before, {info['rmse_after']:.4e} after")
        if info["absent_types"]:
            console.print(f"not in the data (bias kept): {', '.join(info['absent_types'])}")
        console.print(f"wrote {path}")

    _run(body)


app.add_typer(__import__("mtcore.md.cli", fromlist=["app"]).app, name="md")  # mtcore md lammps ...


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
