"""Datasets for DDPM: sources, preparation into a fingerprinted uint8 file, and batch loading.

Imports neither Prefect nor MLflow (those live in tasks/).
"""
from .errors import DataError
from .loader import BatchLoader
from .prepare import (DataConfig, PreparedDataset, fingerprint, load_prepared, prepare_dataset,
                      prepared_path, read_manifest, split_indices, validate_for_model)
from .sources import SOURCE_KINDS, md5_file, source_identity

__all__ = [
    "BatchLoader", "DataConfig", "DataError", "PreparedDataset", "SOURCE_KINDS", "fingerprint",
    "load_prepared", "md5_file", "prepare_dataset", "prepared_path", "read_manifest",
    "source_identity", "split_indices", "validate_for_model",
]
