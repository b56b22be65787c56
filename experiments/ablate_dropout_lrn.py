"""Ablation: dropout rate {0, 0.25, 0.5, 0.75} x local response normalisation {on, off}: 8 runs.

The paper reports both switches as helpful: without dropout the network "exhibits substantial
overfitting" (section 4.2), and LRN lowers top-1/top-5 error by 1.4/1.2 points (section 3.3).
Every point is the base recipe with only `model.dropout_rate` and `model.use_lrn` changed.

Command (ImageNet, the paper's recipe of experiments/imagenet.py):
    python launch.py experiments/ablate_dropout_lrn.py --config.data.manual_dir=/path/to/tars
Hardware and runtime: 8 full AlexNet trainings of 90 epochs; the paper needed 5-6 days on two
GTX 580s for one. Run the points in parallel, one per GPU or node, e.g. a SLURM job array:
    python launch.py experiments/ablate_dropout_lrn.py --sweep_index $SLURM_ARRAY_TASK_ID ...
(`--sweep_list` prints the 8 commands). Expected result, from the paper (not yet run here):
40.7 % top-1 (10 crops) at dropout 0.5 with LRN, about 1.4 points worse without LRN, and
overfitting (a train/val gap that grows) without dropout.

Command (offline, scikit-learn's digits, the recipe of experiments/digits.py):
    python launch.py experiments/ablate_dropout_lrn.py:digits
Hardware and runtime: a 2-core CPU, 8 runs of 570 steps in one process, 1-2 minutes each
(18 minutes in all on a busy shared 2-core machine). Expected result (one seed, centre crop;
one image is 0.56 points of the 180 validation and 0.28 of the 359 test images): dropout 0 to
0.5, with or without LRN, ends at 1-3 % val and 0.8-1.4 % test top-1 error; dropout 0.75 at
about 16 % val and 10-15 % test: a 256-unit fc layer that keeps a quarter of its units learns
too slowly for 570 steps. LRN makes no difference beyond a few images: digits are too easy.
`--sweep_seeds 3` adds error bars. Smoke test: add `--config.num_train_steps=20` (5 minutes on
the same busy machine; the errors are then 57-90 %).

Results land in runs/ablate_dropout_lrn[_digits]/: one sub-workdir per point, sweep.csv,
sweep.png (val error against dropout rate, one line per LRN setting; learning curves).
"""

import ml_collections

from alexnet_jax.errors import UsageError
from alexnet_jax.sweep import axis, product
from experiments import digits, imagenet

BASES = {None: imagenet.get_config, "digits": digits.get_config}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The base recipe every point starts from: ImageNet by default, `digits` for the quickstart."""
    if arg not in BASES:
        raise UsageError(f"unknown argument {arg!r}; use no argument (ImageNet) or ':digits'")
    return BASES[arg]()


def sweep(arg: str | None = None) -> list[dict]:
    del arg  # the same grid on either base
    return product(
        axis("model.dropout_rate", [0.0, 0.25, 0.5, 0.75]),
        axis("model.use_lrn", [True, False]),
    )
