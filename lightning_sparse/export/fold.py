"""BatchNorm folding for the export: :mod:`lightning_sparse.utils.fold`, which compare's timing shares."""

from lightning_sparse.utils.fold import BatchNormFolds, CannotFoldError, batchnorm_folds, fold_batchnorm

__all__ = ["BatchNormFolds", "CannotFoldError", "batchnorm_folds", "fold_batchnorm"]
