"""Data sources, one module each; `DATASETS` is the registry that `config.dataset` names.

A registry entry says where a source lives (imported lazily, so that the digits quickstart never
pays for importing TensorFlow) and what the rest of the code must know about it without opening
any data: which config key names each split (recorded with every test result), and whether it can
cut the paper's ten evaluation views (checked by `config.validate` before anything runs).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import ml_collections

from alexnet_jax.data.base import Batch, DatasetInfo, Predictor, Source, pad_batch
from alexnet_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Dataset:
    module: str
    cls: str
    split_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> config key
    ten_crops: bool = True  # can make the four corners, the centre and their mirrors

    def source_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.cls)


DATASETS: dict[str, Dataset] = {
    "imagenet2012": Dataset(
        "alexnet_jax.data.imagenet",
        "ImageNetSource",
        {"train": "data.train_split", "val": "data.val_split", "test": "data.test_split"},
    ),
    "folder": Dataset(
        "alexnet_jax.data.folder",
        "FolderSource",
        {
            "train": "data.folder_train_split",
            "val": "data.folder_val_split",
            "test": "data.folder_test_split",
        },
    ),
    # 8x8 digits are not mirror-symmetric and too small for corners: centre crop only.
    "digits": Dataset("alexnet_jax.data.digits", "DigitsSource", ten_crops=False),
    "synthetic": Dataset("alexnet_jax.data.synthetic", "SyntheticSource"),
}


def make_source(config: ml_collections.ConfigDict) -> Source:
    """Builds the data source that `config.dataset` names, checked against the model's classes."""
    source = DATASETS[config.dataset].source_class()(config)
    if source.info.num_classes != config.model.num_classes:
        raise UsageError(
            f"model.num_classes={config.model.num_classes} but dataset {config.dataset!r} "
            f"has {source.info.num_classes} classes"
        )
    return source


def predictor(config: ml_collections.ConfigDict) -> Predictor:
    """(the dataset's evaluation preprocessing of one image file, its class names)."""
    cls = DATASETS[config.dataset].source_class()
    if not hasattr(cls, "file_predictor"):
        raise UsageError(f"--mode predict needs a dataset with named classes, not {config.dataset}")
    return cls.file_predictor(config)


__all__ = [
    "DATASETS",
    "Batch",
    "Dataset",
    "DatasetInfo",
    "Predictor",
    "Source",
    "make_source",
    "pad_batch",
    "predictor",
]
