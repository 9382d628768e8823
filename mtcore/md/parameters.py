"""fparam / aparam checks shared by the MD front ends: a missing or unwanted parameter is
caught when the calculator or the LAMMPS fix is made, not at the first force call."""

from __future__ import annotations

from typing import Any

import numpy as np

from mtcore.errors import MtcoreError


def check_parameters(potential, fparam: Any, aparam: Any, where: str = "MtcoreCalculator") -> None:
    head = potential.head
    for key, value, size in (("fparam", fparam, potential.numb_fparam), ("aparam", aparam, potential.numb_aparam)):
        if size == 0 and value is not None:
            raise MtcoreError(f"{key}: head '{head}' was trained without {key}; drop {key}=")
        if size > 0 and value is None:
            per = "frame" if key == "fparam" else "atom"
            raise MtcoreError(f"{key}: head '{head}' needs {key} ({size} per {per}); pass {key}= to {where}")
    if fparam is not None and np.size(fparam) != potential.numb_fparam:
        raise MtcoreError(f"fparam: head '{head}' takes {potential.numb_fparam} value(s), got {np.size(fparam)}")
    if aparam is not None and np.shape(aparam)[-1:] != (potential.numb_aparam,) and np.ndim(aparam) == 2:
        raise MtcoreError(f"aparam: head '{head}' takes {potential.numb_aparam} value(s) per atom, got {np.shape(aparam)[-1]}")
