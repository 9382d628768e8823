"""Make this example's .npz data from mtcore's water data (examples/water/data, deepmd/npy).

    python make_data.py [--out DIR]        (default DIR: data/ beside this script)

Water has no band-gap labels, so the ``gap`` label is a stand-in for an intensive property,
derived from the DFT energy per atom of each frame:

    gap = 5 eV + 100 · (E / N − E_REF),     E_REF = −155.956 eV (about the mean energy per atom)

It is intensive (it does not grow with N) and learnable by a mean-reduced head on a radial
descriptor, which is all the example needs; its numbers mean nothing physically. Only the
structure and this label go into the files (no forces), to keep them small (~100 kB each).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtcore_example.convert import read_deepmd_npy, write_npz

HERE = Path(__file__).resolve().parent
WATER = HERE.parents[1] / "water" / "data"
E_REF = -155.956
SCALE = 100.0
OFFSET = 5.0
#: (source system, frames, output file)
FILES = (("data_0", slice(0, 24), "water_gap_train.npz"), ("data_3", slice(0, 8), "water_gap_valid.npz"))


def gap_arrays(system: Path, frames: slice) -> dict:
    arrays = read_deepmd_npy(system, frames, labels=["energy"])
    natoms = arrays["coord"].shape[1]
    arrays["gap"] = OFFSET + SCALE * (arrays.pop("energy") / natoms - E_REF)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "data")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for source, frames, name in FILES:
        write_npz(out / name, gap_arrays(WATER / source, frames))
        print(out / name)


if __name__ == "__main__":
    main()
