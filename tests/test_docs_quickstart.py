"""docs/quickstart.md runs as written: every code block, in order, in a copy of the examples.

Each fenced block follows a `<!-- qs: NAME -->` marker; EXPECT below says what its output must
hold and which files it must leave. Bash blocks run in one working folder that `cd` carries from
block to block; Python blocks run as scripts in that folder with this interpreter. A block added
to the page without an entry here, or an entry whose block is gone, fails the test.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "quickstart.md"
# what the quick start's inputs read (paths relative to examples/); outputs go to the copy only
EXAMPLE_DIRS = ["quickstart", "water/data", "water_multi_task/data_wb97m_stand_in"]
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*qs:\s*([\w-]+)\s*-->\s*$")


@dataclass
class Block:
    name: str
    language: str
    code: str


@dataclass
class Expect:
    lines: list[str] = field(default_factory=list)   # regexes each matching some output line
    files: list[str] = field(default_factory=list)   # relative to the folder the block ends in


EXPECT: dict[str, Expect] = {
    "install": Expect(),  # checked against .ci/run and pyproject.toml, not run (see below)
    "train": Expect(lines=[r"^step\s+0\s+default: rmse=", r"^step\s+100\s+default: rmse=",
                           r"^finished training: 100 steps"],
                    files=["lcurve.out", "model.ckpt-100.pt", "model.ckpt.pt", "checkpoint", "out.json",
                           "model.best.default.pt"]),
    "freeze-test-show": Expect(lines=[r"^wrote model\.pth$", r"model\.pth: 10 frames in 1 system",
                                      r"Energy/atom\W+\d\.\d{4}e[+-]\d\d\W+\d\.\d{4}e", r"Force\W+\d\.\d{4}e",
                                      r"model\.pth \(frozen, head 'default'\)", r"\W default\W+ener\W+energy\b.*\WO H\W",
                                      r"se_e2_a \(rcut 6\.0"],
                               files=["model.pth"]),
    "python-inference": Expect(lines=[r"^type_map: \['O', 'H'\]$",
                                      r"^shapes: .*'energy': \(2,\)", r"^shapes: .*'force': \(2, 192, 3\)",
                                      r"^shapes: .*'virial': \(2, 9\)", r"^shapes: .*'atom_energy': \(2, 192\)",
                                      r"^energy error per atom \(eV\): \[\s*\d"]),
    "ase-md": Expect(lines=[r"^step\s+0  total energy -?\d+\.\d{5} eV  T \d+ K$",
                            r"^step\s+20  total energy -?\d+\.\d{5} eV  T \d+ K$"]),
    "multi-task": Expect(lines=[r"^step\s+0\s+ccsd: rmse=.*\|\s+wb97m: rmse=", r"^finished training: \d+ steps",
                                r"^wrote frozen_model_ccsd\.pth$", r"^wrote frozen_model_wb97m\.pth$",
                                r"frozen_model_wb97m\.pth \(frozen, head 'wb97m'\)", r"\W wb97m\W+ener\W.*\Wl0\W"],
                         files=["frozen_model_ccsd.pth", "frozen_model_wb97m.pth", "lcurve.out"]),
}
NOT_RUN = {"install"}


def page_blocks(text: str) -> list[Block]:
    """Every fenced block with the marker on the line before it (a missing marker is an error)."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        line = text[: match.start()].count("\n") + 1
        assert marker, f"docs/quickstart.md line {line}: code block without a `<!-- qs: NAME -->` marker line before it"
        blocks.append(Block(marker.group(1), match.group(1), match.group(2)))
    return blocks


BLOCKS = page_blocks(PAGE.read_text(encoding="utf-8"))


def test_every_block_is_known_and_every_expectation_has_its_block():
    names = [b.name for b in BLOCKS]
    assert len(names) == len(set(names)), f"marker names repeat: {names}"
    assert set(names) == set(EXPECT), f"page blocks {sorted(names)} vs EXPECT {sorted(EXPECT)}"
    for block in BLOCKS:
        assert block.language in ("bash", "python"), f"block {block.name}: language {block.language!r} is not run"
    assert not _FENCE.sub("", PAGE.read_text(encoding="utf-8")).count("```"), "an unclosed or odd fence"


def _command_lines(code: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in code.splitlines() if line.split("#", 1)[0].strip()]


def test_install_block_is_what_ci_installs():
    """The install block is not run here (it would reinstall the package the tests run from); it
    is tied instead to .ci/run, which every CI run executes, and to the extras pyproject declares."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    (install,) = [b for b in BLOCKS if b.name == "install"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    torch_pin = re.search(r"pip install -q (torch==[\d.]+)", ci)
    assert torch_pin, ".ci/run no longer pins torch: update this test and the quick start together"
    commands = [shlex.split(line) for line in _command_lines(install.code)]
    assert [c[:2] for c in commands] == [["pip", "install"]] * 2, commands
    assert commands[0][2:] == [torch_pin.group(1)], f"quick start installs {commands[0][2:]}, .ci/run {torch_pin.group(1)}"
    spec = re.fullmatch(r"\.\[([\w,]+)\]", commands[1][3]) if commands[1][2] == "-e" else None
    assert spec, f"second command should be `pip install -e \".[extras]\"`: {commands[1]}"
    for extra in spec.group(1).split(","):
        assert extra in extras, f"quick start installs extra {extra!r}; pyproject has {sorted(extras)}"
        for requirement in extras[extra]:  # CI's extra covers it, so CI runs the quick start with it installed
            assert requirement in extras["test"], f"extra {extra}: {requirement!r} is not in the test extra"


def _workspace(tmp_path: Path) -> Path:
    for rel in EXAMPLE_DIRS:
        shutil.copytree(ROOT / "examples" / rel, tmp_path / "examples" / rel,
                        ignore=shutil.ignore_patterns("*.pt", "*.pth", "lcurve.out", "checkpoint", "out.json"))
    return tmp_path


def _environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's mtcore
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(COLUMNS="100", NO_COLOR="1", TERM="dumb", HOME=str(home), MPLBACKEND="Agg")
    for key in ("MTCORE_DEBUG", "MTCORE_PLUGINS", "MTCORE_TRACE_HOOKS", "FORCE_COLOR", "TTY_COMPATIBLE",
                "TTY_INTERACTIVE", "LINES"):  # plain output, as a user's first run gives
        env.pop(key, None)
    return env


def _run(block: Block, cwd: Path, env: dict[str, str], scratch: Path) -> tuple[str, Path]:
    """Runs one block; returns its output and the folder it ended in."""
    if block.language == "bash":
        cwd_file = scratch / f"{block.name}.cwd"
        script = f"trap 'pwd > {shlex.quote(str(cwd_file))}' EXIT\nset -euo pipefail\n{block.code}"
        command = ["bash", "-c", script]
    else:
        script_file = scratch / f"{block.name}.py"
        script_file.write_text(block.code, encoding="utf-8")
        command = [sys.executable, str(script_file)]
    # a session of its own, so that a timeout ends the whole block (bash and the mtcore it started)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"quick start block {block.name!r} ran over {BLOCK_TIMEOUT_S} s:\n{output[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"quick start block {block.name!r} exited {process.returncode}:\n{output[-4000:]}")
    if block.language == "bash":
        cwd = Path(cwd_file.read_text(encoding="utf-8").strip())
    return output, cwd


def _check(block: Block, output: str, cwd: Path) -> None:
    expect = EXPECT[block.name]
    lines = output.splitlines()
    for pattern in expect.lines:
        assert any(re.search(pattern, line) for line in lines), \
            f"quick start block {block.name!r}: no output line matches {pattern!r}:\n{output[-4000:]}"
    for name in expect.files:
        assert (cwd / name).is_file(), f"quick start block {block.name!r}: {name} not written in {cwd}"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _md_energies(output: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"total energy (-?\d+\.\d+) eV", output)]


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    work = _workspace(tmp_path / "repo")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = _environment(scratch)
    cwd, timings = work, {}
    for block in BLOCKS:
        if block.name in NOT_RUN:
            continue
        start, cpu = time.perf_counter(), _children_cpu()
        output, cwd = _run(block, cwd, env, scratch)
        timings[block.name] = (time.perf_counter() - start, _children_cpu() - cpu)
        _check(block, output, cwd)
        if block.name == "ase-md":
            energies = _md_energies(output)
            assert len(energies) == 3, output
            natoms = 192
            drift = (max(energies) - min(energies)) / natoms
            assert drift < 1e-4, f"NVE total energy moved {drift:.2e} eV/atom in 20 steps: {energies}"
            print(f"quick start MD: total energy {energies}, spread {drift:.1e} eV/atom")
    print("quick start blocks, wall/CPU s: " + ", ".join(f"{k} {w:.1f}/{c:.1f}" for k, (w, c) in timings.items()))
