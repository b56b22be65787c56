"""When is a config "the same run"? One policy, with named allow-lists, for every caller.

A workdir records the config it was trained with (`config.json`, and each checkpoint's
metadata). Resuming a run, skipping or resuming a sweep point and scoring a trained workdir all
compare that record with the config of the command at hand; they differ only in which keys may
differ, so each caller names its allow-list here. Keys ending in '.' allow a whole block.

Only keys that both configs have are compared: a field added to the code since the run started
defaults to the old behaviour, and must not lock old workdirs.
"""

from __future__ import annotations

import json
from typing import Any

from alexnet_jax import keys
from alexnet_jax.errors import UsageError

# Never change a number a run produces: how often it logs and saves, where the data lives.
LOGGING = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval.batch_size",
    "profile_steps",
)
LOCATION = ("data.data_dir", "data.manual_dir", "data.prepared_dir", "data.mean_image_path")
# The length of a run: a resumed run may be extended (checkpoint.resume says how).
LENGTH = ("num_train_steps", "num_epochs")
# What only training reads: a trained model is scored the same whatever these were.
TRAINING_ONLY = (
    "seed",
    "batch_size",
    "optim.",
    "eval_every_steps",
    "data.augment",
    "data.flip",
    "data.pca_std",
    "data.pca_scale",
    "data.pca_eigval",
    "data.pca_eigvec",
    "data.shuffle_buffer",
    "data.train_split",
    "data.folder_train_split",
    "data.use_prepared",
    "data.resize_antialias",
    "data.folder_scan",
    "parallel.",
)

# Fields added since runs were started whose default is not the old behaviour: a record without
# them is compared as if it held the old value (so resuming an old host-augmented run under the
# new device default is refused with the difference, not silently continued on other crops).
OLD_DEFAULTS: dict[str, Any] = {
    "data.augment_on": "host",
    "model.lrn_per_column": False,
    "model.dropout_masks": "device",
}

POLICIES: dict[str, tuple[str, ...]] = {
    # A resumed run continues bit-exactly only under the same recipe.
    "resume": LOGGING + LOCATION + LENGTH,
    # A sweep point is skipped or resumed only when its recipe and its length are unchanged:
    # a finished point would be skipped and the table would mix lengths.
    "sweep": LOGGING + LOCATION,
    # The eval, test, predict and filters modes: the model and every data field that decides
    # which examples a split holds or how they are preprocessed must be the training run's
    # (an eval on other splits would score training images as validation ones).
    "evaluate": LOGGING + LOCATION + LENGTH + TRAINING_ONLY + ("eval.", "data.augment_on"),
}


def as_tree(config: Any) -> dict[str, Any]:
    """A config as the JSON tree that config.json holds (tuples become lists)."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    return json.loads(config.to_json_best_effort())


def differences(saved: Any, config: Any, policy: str) -> list[str]:
    """'key: old -> new' for every difference that `policy` does not allow."""
    allowed = POLICIES[policy]
    old, new = keys.flatten(as_tree(saved)), keys.flatten(as_tree(config))
    if old:  # a real record (not an empty one): fill in the fields it predates
        old = {k: v for k, v in OLD_DEFAULTS.items() if k in new} | old
    return [
        f"{key}: {old[key]!r} -> {new[key]!r}"
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key] and not keys.matches(key, allowed)
    ]


def require_same(saved: Any, config: Any, policy: str, what: str, hint: str) -> None:
    """Raises UsageError ('{what} ... ({diffs}); {hint}') when `policy` refuses the change."""
    diffs = differences(saved, config, policy)
    if diffs:
        raise UsageError(f"{what} ({'; '.join(diffs)}); {hint}")
