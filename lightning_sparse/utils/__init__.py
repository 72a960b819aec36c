"""The lower layer every feature package may import: timing, example inputs, module helpers, text tables.

Nothing here imports another ``lightning_sparse`` package.

* ``timing.py`` — :func:`interleaved_times`, :func:`cuda_graph`, :class:`Timing`.
* ``inputs.py`` — :func:`example_inputs`, :func:`default_inputs`.
* ``modules.py`` — :func:`eval_mode`, :func:`first_conv`, :func:`device_inputs`.
* ``tables.py`` — :func:`text_table`.
* ``fold.py`` — :func:`fold_batchnorm`: eval-mode BatchNorm folded into the preceding convs (export and
  compare time the folded network).
"""

from lightning_sparse.utils.inputs import default_inputs, example_inputs
from lightning_sparse.utils.modules import device_inputs, eval_mode, first_conv
from lightning_sparse.utils.tables import text_table
from lightning_sparse.utils.timing import HOST_BOUND_FRACTION, Timing, cuda_graph, interleaved_times

__all__ = [
    "HOST_BOUND_FRACTION",
    "Timing",
    "cuda_graph",
    "default_inputs",
    "device_inputs",
    "eval_mode",
    "example_inputs",
    "first_conv",
    "interleaved_times",
    "text_table",
]
