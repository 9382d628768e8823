"""`dp` with a CPU-time average next to DeePMD-kit's own wall-time one (run by bench.py; not a test).

Executed with DeePMD-kit's Python (its own venv), never imported by mtcore:

    DEEPMD_PYTHON deepmd_train_child.py --pt train input.json

Exactly ``dp --pt train input.json``, except that DeePMD-kit's TrainingTimer also sums the
process's CPU time over the intervals its "average training time" counts, and one more line is
printed at the end: ``MTCORE_BENCH average training CPU time: X s/batch``. Why: on a machine
shared with other work, wall time measures the competition; CPU time much less so, and mtcore's
benchmark reports both. If this DeePMD-kit's timer lacks the private members used here (another
version), nothing is patched and only DeePMD-kit's own line appears.
"""

from __future__ import annotations

import sys
import time


def patch_timer() -> bool:
    try:
        from deepmd.dpmodel.train.timing import TrainingTimer
    except ImportError:
        return False
    if not all(hasattr(TrainingTimer, name) for name in ("_counts_toward_average", "record", "format_average")):
        return False
    init, record, average = TrainingTimer.__init__, TrainingTimer.record, TrainingTimer.format_average

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._bench_cpu_start = time.process_time()
        self._bench_cpu = 0.0

    def patched_record(self, display_step):
        now = time.process_time()
        if self._counts_toward_average(display_step):  # the same intervals as DeePMD-kit's own average
            self._bench_cpu += now - self._bench_cpu_start
        self._bench_cpu_start = now
        return record(self, display_step)

    def patched_average(self):
        message = average(self)
        steps = getattr(self, "_timed_steps", 0)
        if message is not None and steps:
            print(f"MTCORE_BENCH average training CPU time: {self._bench_cpu / steps:.6f} s/batch", flush=True)
        return message

    TrainingTimer.__init__, TrainingTimer.record, TrainingTimer.format_average = patched_init, patched_record, patched_average
    return True


def main() -> int:
    patch_timer()
    from deepmd.main import main as dp_main

    sys.argv = ["dp", *sys.argv[1:]]
    return dp_main()


if __name__ == "__main__":
    sys.exit(main())
