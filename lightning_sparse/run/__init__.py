"""Loading a run's model, one way for every command: export, compare and the 2:4 benchmark.

* ``load.py`` — :func:`load_run_model`: a Lightning checkpoint or slim export -> the network its forward used
  (slim shapes, masks checked, N:M baked).
* ``model.py`` — :class:`RunModel` (what loading gives) and :class:`NM` (an N:M pattern, written ``"n:m"``).
* ``resolve.py`` — :func:`resolve_class` (config class paths), :func:`config_image_size` and
  :func:`resolve_image_size` (the input size), :func:`find_config` (the run's ``config.yaml``).
* ``preprocess.py`` — :func:`run_preprocessing`: what the model expects of a raw image (the run's DataModule's
  ``preprocessing()``, else timm's data config).
* ``costs.py`` — :func:`measure_costs`: params, nonzeros and FLOPs of a loaded run and its dense architecture.
"""

from lightning_sparse.run.costs import layer_flops, measure_costs
from lightning_sparse.run.load import load_run_model
from lightning_sparse.run.model import NM, RunModel
from lightning_sparse.run.preprocess import PREPROCESSING_KEYS, run_preprocessing
from lightning_sparse.run.resolve import (
    UnknownImageSize,
    config_image_size,
    find_config,
    resolve_class,
    resolve_image_size,
)

__all__ = [
    "NM",
    "PREPROCESSING_KEYS",
    "RunModel",
    "UnknownImageSize",
    "config_image_size",
    "find_config",
    "layer_flops",
    "load_run_model",
    "measure_costs",
    "resolve_class",
    "resolve_image_size",
    "run_preprocessing",
]
