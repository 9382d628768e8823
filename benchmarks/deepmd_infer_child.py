"""Time DeePMD-kit's own inference on one frame size (run by bench_inference.py --deepmd; not a test).

Executed with DeePMD-kit's Python (its own venv), never imported by mtcore:

    DEEPMD_PYTHON deepmd_infer_child.py MODEL.pth COORD.npy BOX.npy TYPE.npy REPEATS

One call is ``deepmd.infer.DeepPot(model).eval(coords, cells, atypes)``: energy, forces and
virial, neighbour list included, exactly as a DeePMD-kit user evaluates a frozen model from
Python. Prints one JSON line: best call time, median call time, this process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time


def main() -> None:
    import numpy as np
    import torch
    from deepmd.infer import DeepPot

    model, coord_path, box_path, type_path, repeats = sys.argv[1:6]
    coord = np.load(coord_path).reshape(1, -1)
    box = np.load(box_path).reshape(1, 9)
    atype = np.load(type_path).astype(np.int64).tolist()
    natoms = len(atype)
    pot = DeepPot(model)
    pot.eval(coord, box, atype)  # warm-up (first call builds and profiles)
    if natoms <= 1536:
        pot.eval(coord, box, atype)
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        energy, force, virial = pot.eval(coord, box, atype)
        times.append(time.perf_counter() - t0)
    assert np.isfinite(energy).all() and np.asarray(force).reshape(-1, 3).shape == (natoms, 3)
    assert np.asarray(virial).size == 9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB → GiB
    print(json.dumps({"ms_per_frame": 1000 * min(times), "median_ms": 1000 * statistics.median(times),
                      "peak_rss_gb": peak, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
