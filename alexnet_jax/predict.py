"""`--mode predict --image PATH...`: the top classes of image files under a trained workdir.

Each file goes through its dataset's evaluation preprocessing (`data.predictor`: the dataset's
source knows how it turns a file into the model's input, and its class names), so a prediction
is made on exactly what the validation split would have shown the network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from alexnet_jax import data, records
from alexnet_jax.errors import UsageError
from alexnet_jax.evaluate import load_params
from alexnet_jax.model import from_config


def top_k(probs: np.ndarray, names: Sequence[str], k: int = 5) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


def run_predict(
    config: ml_collections.ConfigDict,
    path: str,
    images: Sequence[str],
    *,
    checkpoint: str = "latest",
    k: int = 5,
) -> list[list[tuple[str, float]]]:
    """Prints the top-k classes and probabilities of each image; returns them."""
    if not images:
        raise UsageError("--mode predict needs --image PATH [PATH ...]")
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"no such image: {', '.join(missing)}")
    preprocess, names = data.predictor(config)
    if len(names) != config.model.num_classes:
        raise UsageError(
            f"model.num_classes={config.model.num_classes} but {config.dataset!r} names "
            f"{len(names)} classes"
        )
    step, params, label = load_params(config, path, checkpoint)
    model = from_config(config.model)

    @jax.jit
    def probabilities(x):  # [views, H, W, C] -> softmax averaged over the views
        return jax.nn.softmax(model.apply({"params": params}, x, train=False)).mean(axis=0)

    results = []
    for image in images:
        x = preprocess(image)
        views = x if x.ndim == 4 else x[None]
        probs = np.asarray(probabilities(views))
        best = top_k(probs, names, k)
        results.append(best)
        print(f"{image}  (step {step}, {label} checkpoint, {records.protocol_name(len(views))})")
        for name, p in best:
            print(f"  {100 * p:6.2f} %  {name}")
    return results
