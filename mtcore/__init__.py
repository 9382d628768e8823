"""mtcore: multi-task training of deep potential models.

The core knows hooks, heads and tensors; every concrete descriptor, fitting net, loss and data
format is a plugin registered through the ``mtcore`` entry-point group (see
:mod:`mtcore.hookspecs`).
"""

from __future__ import annotations

__version__ = "0.1.0"

# before anything loads torch: MKL's choice of kernels is made when torch's library is loaded
from mtcore import mkl_dispatch  # noqa: E402

mkl_dispatch.enable()

from mtcore.errors import MtcoreError  # noqa: E402

__all__ = ["MtcoreError", "__version__"]
