"""Data sources, one module each; `make_source` picks one by `config.dataset`."""

from __future__ import annotations

import importlib

import ml_collections

from alexnet_jax.data.base import Batch, DatasetInfo, Source, pad_batch
from alexnet_jax.errors import UsageError

# dataset name -> (module, class); imported lazily so that the digits quickstart never pays
# for importing TensorFlow.
SOURCES = {
    "digits": ("alexnet_jax.data.digits", "DigitsSource"),
    "synthetic": ("alexnet_jax.data.synthetic", "SyntheticSource"),
    "imagenet2012": ("alexnet_jax.data.imagenet", "ImageNetSource"),
    "folder": ("alexnet_jax.data.folder", "FolderSource"),
}


def make_source(config: ml_collections.ConfigDict) -> Source:
    """Builds the data source that `config.dataset` names, checked against the model's classes."""
    if config.dataset not in SOURCES:
        raise UsageError(f"unknown dataset {config.dataset!r}; choose one of {sorted(SOURCES)}")
    module, cls = SOURCES[config.dataset]
    source = getattr(importlib.import_module(module), cls)(config)
    if source.info.num_classes != config.model.num_classes:
        raise UsageError(
            f"model.num_classes={config.model.num_classes} but dataset {config.dataset!r} "
            f"has {source.info.num_classes} classes"
        )
    return source


__all__ = ["Batch", "DatasetInfo", "Source", "make_source", "pad_batch"]
