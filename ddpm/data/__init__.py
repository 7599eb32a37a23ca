"""Datasets for DDPM: sources, preparation into a fingerprinted uint8 file, versions, and batch loading.

Imports neither Prefect nor MLflow (those live in tasks/).
"""
from .errors import DataError
from .loader import BatchLoader
from .prepare import (DataConfig, PreparedDataset, content_hashes, content_split_indices, fingerprint,
                      load_prepared, prepare_dataset, prepared_path, read_manifest, split_indices,
                      validate_for_model)
from .sources import SOURCE_KINDS, md5_file, source_identity
from .versions import dataset_version, lineage_history, record_version

__all__ = [
    "BatchLoader", "DataConfig", "DataError", "PreparedDataset", "SOURCE_KINDS", "content_hashes",
    "content_split_indices", "dataset_version", "fingerprint", "lineage_history", "load_prepared", "md5_file",
    "prepare_dataset", "prepared_path", "read_manifest", "record_version", "source_identity", "split_indices",
    "validate_for_model",
]
