"""mtcore-example-plugin: a template plugin package for mtcore.

One module per entry point (``pyproject.toml``, group ``mtcore``), each declaring
``MTCORE_PLUGIN_API``:

* :mod:`mtcore_example.descriptor` — ``gauss_radial``, a Gaussian radial-basis descriptor
* :mod:`mtcore_example.fitting` — ``gap``, an intensive per-frame scalar (mean of atomic outputs)
* :mod:`mtcore_example.loss` — ``gap``, the per-frame error of that scalar
* :mod:`mtcore_example.loader` — ``npz_system``, one .npz file per system

:mod:`mtcore_example.convert` turns deepmd/npy folders into .npz files.
"""

__version__ = "0.1.0"
