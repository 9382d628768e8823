"""Learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtcore.errors import MtcoreError


@dataclass
class ExpDecay:
    """lr(t) = start_lr · r^floor(t / decay_steps), r chosen so that lr(numb_steps) = stop_lr.

    As in DeePMD-kit, a decay_steps not smaller than numb_steps is reduced (to 100, or to
    numb_steps//100 + 1 for short runs) so that the rate still decays.
    """

    start_lr: float
    stop_lr: float
    decay_steps: int
    numb_steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_lr) and math.isfinite(self.stop_lr)) or self.start_lr <= 0 or self.stop_lr <= 0:
            raise MtcoreError("learning_rate: start_lr and stop_lr must be positive numbers")
        if self.stop_lr > self.start_lr:
            raise MtcoreError(f"learning_rate: stop_lr ({self.stop_lr:g}) is larger than start_lr ({self.start_lr:g})")
        if self.numb_steps < 0:
            raise MtcoreError(f"training/numb_steps: must be at least 0, got {self.numb_steps}")
        if self.decay_steps < 1:
            raise MtcoreError("learning_rate/decay_steps: must be at least 1")
        steps = max(1, self.numb_steps)
        if self.decay_steps >= steps:
            self.decay_steps = 100 if steps // 10 > 100 else steps // 100 + 1
        self.decay_rate = math.exp(math.log(self.stop_lr / self.start_lr) / (steps / self.decay_steps))

    @classmethod
    def from_config(cls, section: dict, numb_steps: int) -> "ExpDecay":
        return cls(float(section["start_lr"]), float(section["stop_lr"]), int(section["decay_steps"]), numb_steps)

    def value(self, step: int) -> float:
        return self.start_lr * self.decay_rate ** (step // self.decay_steps)
