"""The paper's recipe on ILSVRC-2012 (Krizhevsky, Sutskever & Hinton, NIPS 2012).

Command:
    python launch.py experiments/imagenet.py --config.data.manual_dir=/path/to/tars

Hardware and runtime: the paper took 5-6 days on two GTX 580s (90 epochs at about 230 img/s).
Expected result: about 40.7 % top-1 / 18.2 % top-5 error with 10-crop evaluation on the official
validation set (our test split), about 42 % / 19.5 % with a centre crop (REFERENCE.md).

Your own images, same recipe (root/<split>/<class>/*.jpg|png; splits train, val and test):
    python launch.py experiments/imagenet.py:folder --config.data.folder_root=ROOT \
        --config.model.num_classes=N

Small local mode (no ImageNet needed, checks the whole recipe end to end in a minute):
    python launch.py experiments/imagenet.py --config.dataset=synthetic \
        --config.batch_size=16 --config.num_train_steps=4 --config.eval_every_steps=0

Every hyper-parameter of the run lives here; library code only reads these fields. Where the
reference implementations disagree, the field says which convention the paper used and the
README's deviations table lists the alternatives.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None for ILSVRC-2012; 'folder' for the same recipe on your own image folders."""
    if arg not in (None, "folder"):
        raise ValueError(f"unknown arg {arg!r}; use experiments/imagenet.py or imagenet.py:folder")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "imagenet2012"  # 'imagenet2012' | 'folder' | 'digits' | 'synthetic'
    c.batch_size = 128  # global, over all devices and processes (paper: 128)
    c.num_epochs = 90  # paper: "roughly 90 cycles"
    c.num_train_steps = 0  # > 0 overrides num_epochs
    c.log_every_steps = 100
    c.eval_every_steps = 10_000  # about one epoch at batch 128; drives the plateau schedule
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3
    # A jax.profiler trace of this many steps, from the step after the first (compiled) one, into
    # <workdir>/profile/ (TensorBoard's profile plugin or Perfetto). 0: off, since tracing slows
    # the traced steps and writes tens of MB; the numbers a run produces do not depend on it.
    c.profile_steps = 0

    c.model = ml_collections.ConfigDict()
    # A preset is a base: --config.model.preset=torchvision writes its architecture fields
    # (single tower, no LRN, 61,100,840 params), and any model field set after it wins.
    c.model.preset = "paper"  # 'paper' | 'torchvision'  (alexnet_jax.model.PRESETS)
    c.model.num_classes = 1000
    c.model.dropout_rate = 0.5  # on the outputs of fc6 and fc7 (paper section 4.2)
    c.model.use_lrn = True
    c.model.groups = 2  # the two GPU columns of conv2, conv4, conv5 (paper figure 2)
    c.model.conv_features = (96, 256, 384, 384, 256)
    c.model.dense_features = 4096
    c.model.conv1_padding = 2  # 224 input -> 55x55 conv1 map; Caffe uses 227 input and 0
    c.model.lrn_size = 5  # n
    c.model.lrn_k = 2.0
    c.model.lrn_alpha = 1e-4
    c.model.lrn_beta = 0.75
    c.model.lrn_scale_alpha_by_size = False  # paper as printed; cc2/Caffe/torch divide by n
    c.model.lrn_before_relu = False  # paper: after ReLU; cc2 normalises conv1 before it
    # paper: each GPU normalised its own column's maps (windows stop at the column boundary);
    # Caffe's and torch's one-tower LRN runs across it (False)
    c.model.lrn_per_column = True
    c.model.dropout_before_dense = False  # paper: on fc6/fc7 outputs; torchvision: on their inputs
    c.model.pool_to_6x6 = False  # torchvision: adaptive 6x6 average pool before fc6
    # 'example': each example's masks keyed by its place in the global batch, the same on any
    # devices and in any parallel.mode; 'device': keyed by (step, device), as runs before 2026-12
    c.model.dropout_masks = "example"
    c.model.init = "paper"  # 'paper' | 'cc2' | 'caffe' | 'he'
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    # 'cpu': split grouped convs + the pooled-grid max-pool gradient (fast on XLA:CPU);
    # 'portable': XLA's native feature_group_count and select_and_scatter; 'auto': by platform.
    c.model.kernels = "auto"

    c.optim = ml_collections.ConfigDict()
    c.optim.update_rule = "paper"  # v <- m v - wd lr w - lr g; w <- w + v. 'optax_sgd': lr outside
    c.optim.learning_rate = 0.01
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.decay_biases = False  # cc2 and Caffe exclude biases; the paper does not say
    c.optim.schedule = "plateau"  # 'plateau' | 'step' | 'cosine' | 'constant'
    c.optim.plateau_patience = 1  # evaluations without improvement before lr /= 10
    c.optim.plateau_factor = 0.1
    c.optim.plateau_max_drops = 3  # paper: "reduced three times prior to termination"
    c.optim.plateau_min_delta = 0.0
    c.optim.step_epochs = (30, 60, 80)  # for schedule='step'
    c.optim.step_factor = 0.1
    c.optim.warmup_epochs = 0.0

    c.data = ml_collections.ConfigDict()
    c.data.augment = True
    # Where the crops, flips, lighting and mean run: 'device' (the host decodes and sends uint8
    # 256x256, the device step augments with keys folded from seed, step and global slot) or
    # 'host' (tf.data augments and sends float32 224x224; four times the bytes per example).
    c.data.augment_on = "device"
    c.data.data_dir = ""  # TFDS data dir; '' = TFDS's default (~/tensorflow_datasets)
    c.data.manual_dir = ""  # holds ILSVRC2012_img_{train,val}.tar; '' = <data_dir>/downloads/manual
    # big_vision's "minival": 1 % of train tunes everything; the official val set is the test set.
    c.data.train_split = "train[:99%]"
    c.data.val_split = "train[99%:]"
    c.data.test_split = "validation"
    c.data.image_size = 224
    c.data.resize_size = 256  # shorter side, then the central square (paper section 2)
    # Antialiased (Pillow-like, as cc2's make-data) downscaling of full-size images; False is plain
    # bilinear, about 2x faster to decode full-size JPEGs. The prepared copy needs no resampling.
    c.data.resize_antialias = True
    # The 256-pixel copy that `python -m alexnet_jax.data.prepare` writes decodes several times
    # faster than full-size JPEGs (scripts/bench_input.py). It is used whenever it exists in
    # prepared_dir ('' = data_dir); use_prepared=False forces the full-size images.
    c.data.prepared_dir = ""
    c.data.use_prepared = True
    # What `prepare` writes (alexnet_jax/data/prepare.py): the central 256x256 square as 'jpeg'
    # at prepare_quality (decodes fast, lossy twice) or 'raw' uint8 (exact; ~250 GB for train);
    # in 'array_record' files (random access: resume reads nothing before its step) or 'tfrecord'.
    c.data.prepare_storage = "jpeg"
    c.data.prepare_quality = 90
    c.data.prepared_file_format = "array_record"
    c.data.shuffle_buffer = 10_000  # encoded images, after the per-epoch shard-file shuffle
    # Training augmentation (paper section 4.1). augment=False gives training the eval centre crop.
    c.data.flip = True
    # PCA lighting noise: eigvec @ (alpha * s), alpha ~ N(0, pca_std^2) once per image.
    # 'eigval': s = eigval on [0,1] pixels (paper as printed, fb.resnet.torch);
    # 'sqrt_eigval': s = sqrt(eigval) on 0-255 pixels (cc2). pca_std=0 turns the noise off.
    c.data.pca_std = 0.1
    c.data.pca_scale = "eigval"
    c.data.pca_eigval = (0.2175, 0.0188, 0.0045)  # fb.resnet.torch ImageNet RGB covariance
    c.data.pca_eigvec = (  # columns are the principal components; rows R, G, B
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    )
    # Pixels stay 0-255 minus a mean: 'channel' (common; mean_rgb), 'pixel' (the paper: the mean
    # 256x256 image, from `prepare --mean_image` or mean_image_path) or 'none'.
    c.data.mean_mode = "channel"
    c.data.mean_rgb = (123.675, 116.28, 103.53)  # ImageNet train mean, 255 * (0.485, 0.456, 0.406)
    c.data.mean_image_path = ""  # .npy [resize_size, resize_size, 3]; '' = next to the copy
    # dataset='folder': root/<split>/<class>/*.jpg|png; set model.num_classes to the class count.
    c.data.folder_root = ""
    c.data.folder_train_split = "train"
    c.data.folder_val_split = "val"
    c.data.folder_test_split = "test"  # optional directory: only the test evaluation needs it
    c.data.folder_scan = "decode"  # 'decode': screen out unreadable images at start; 'none'
    # Before training, every example's content is hashed and exact copies across train, val and
    # test are reported (<workdir>/leakage.csv). 'warn', not 'refuse': a published split (the
    # official ImageNet one) is scored as published, so its copies are reported, not fixed here;
    # 'refuse' (exit 2) suits data you split yourself, where a copy is a mistake to fix first.
    c.data.on_leakage = "warn"  # 'warn' | 'refuse' (alexnet_jax.data.leakage)

    # How the steps are laid out on the devices (alexnet_jax/parallel.py, steps.py).
    c.parallel = ml_collections.ConfigDict()
    # 'data': jax.pmap data parallelism, the state on every device; 'columns': the paper's two
    # columns on a (data, column) mesh; 'owt': convolutions data-parallel, fc6-fc8 split over
    # the devices ("one weird trick", Krizhevsky 2014). README: "Model parallelism".
    c.parallel.mode = "data"

    c.eval = ml_collections.ConfigDict()
    c.eval.crops = 10  # the paper's 10 patches (section 4.1); 1 = centre crop, 10x cheaper
    c.eval.batch_size = 256

    if arg == "folder":
        c.dataset = "folder"  # also set data.folder_root and model.num_classes
    return c
