"""Offline quickstart: the paper's recipe, scaled down, on scikit-learn's bundled digits.

Command:
    python launch.py experiments/digits.py

Hardware and runtime: about a minute on a 2-core CPU, no GPU, no download.
Expected result: test top-1 error <= 3 % on the 360 held-out digits (centre crop).

Same network shape as the paper (5 conv layers with LRN and 2 groups, overlapping pooling,
2 dropout fc layers), with widths divided by 4 and 64x64 inputs. Two departures from the
ImageNet recipe, both because this is a 10-minute-old network on 1,257 images: He
initialisation instead of N(0, 0.01), which stalls for hundreds of steps in a narrow network,
and a cosine schedule for a fixed short run instead of waiting for plateaus.
"""

import ml_collections

from experiments import imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg is not None:
        raise ValueError(f"unknown arg {arg!r}; experiments/digits.py takes none")
    c = imagenet.get_config()
    c.dataset = "digits"
    c.batch_size = 64
    c.num_epochs = 30
    c.log_every_steps = 20
    c.eval_every_steps = 50
    c.checkpoint_every_steps = 0

    c.model.num_classes = 10
    c.model.conv_features = (24, 64, 96, 96, 64)
    c.model.dense_features = 256
    c.model.init = "he"

    c.optim.learning_rate = 0.01
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1.0

    c.data.image_size = 64  # 64 survives the stride-4 conv and three 3/2 pools (-> 1x1)
    c.data.resize_size = 72  # upsample 8x8 -> 72x72, then 64x64 crops (the paper: 256 -> 224)
    c.data.split_seed = 0
    c.data.val_fraction = 0.1
    c.data.test_fraction = 0.2

    c.eval.batch_size = 128
    c.eval.crops = 1  # digits are not mirror-symmetric: centre crop only
    return c
