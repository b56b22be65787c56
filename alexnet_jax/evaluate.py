"""Evaluation the paper's way and the honest way: centre / 10-crop scores, the test ledger,
the end-of-training summary, and the `eval`, `test` and `predict` modes.

- Crops: `eval.crops=1` scores the centre crop; `eval.crops=10` the paper's ten views (four
  corners and the centre, and their mirrors) with the softmax averaged (section 4.1). The
  sources make the views; `train.eval_step` averages them. Every score says its protocol.
- Exact counting: sources pad the last batch and mask the padding (`data.base`), and processes
  with fewer examples add fully masked batches, so every example counts exactly once.
- Test once: the test split is for the one final number. Every test evaluation (the one at the
  end of training, and each `--mode test`) is appended to `<workdir>/test_ledger.jsonl` and
  written as a `split: "test"` line to metrics.jsonl; a second `--mode test` on a workdir is
  refused unless `--force_test` is given, and then it is recorded like the first.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import MetricWriter, read_metrics

LEDGER_FILE = "test_ledger.jsonl"
SUMMARY_FILE = "summary.md"
CHECKPOINT_CHOICES = "'latest', 'best' or a step number"


def protocol_name(crops: int) -> str:
    return "centre crop" if crops == 1 else f"{crops} crops (corners + centre, mirrored)"


def describe(step: int, split: str, m: dict[str, Any]) -> str:
    """One line: step, split, loss, errors, how many examples and which protocol."""
    return (
        f"step {step} {split}: loss {m['loss']:.4f}  top-1 error {100 * m['top1_error']:.2f} %  "
        f"top-5 error {100 * m['top5_error']:.2f} %  ({m['num_examples']} examples, "
        f"{protocol_name(m['crops'])})"
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _primary() -> bool:
    return jax.process_index() == 0


# --- the test ledger ---------------------------------------------------------------------------


def read_ledger(workdir: str) -> list[dict[str, Any]]:
    """Every recorded test evaluation of `workdir`, oldest first."""
    path = os.path.join(workdir, LEDGER_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_history(workdir: str) -> list[dict[str, Any]]:
    """The ledger; for a workdir from before the ledger, its metrics.jsonl test lines."""
    ledger = read_ledger(workdir)
    if ledger:
        return ledger
    return [
        {
            "time": "an earlier run",
            "step": m["step"],
            "protocol": {"crops": m.get("crops", 1)},
            "result": m,
        }
        for m in read_metrics(workdir)
        if m.get("split") == "test"
    ]


def check_test_allowed(workdir: str, force: bool) -> None:
    """Refuses a second look at the test split unless `force` (exit 2 via UsageError)."""
    history = test_history(workdir)
    if not history or force:
        return
    last = history[-1]
    top1 = last["result"].get("top1_error")
    score = f", top-1 error {100 * top1:.2f} %" if isinstance(top1, float) else ""
    raise UsageError(
        f"the test split of {workdir} was already evaluated on {last['time']} (step "
        f"{last['step']}, {protocol_name(last['protocol'].get('crops', 1))}{score}; "
        f"{len(history)} time(s) in all); the test split is for one final number: "
        f"use --mode eval for the validation split, or --force_test to evaluate it again "
        f"(recorded in {LEDGER_FILE})"
    )


def record_test(
    workdir: str,
    step: int,
    metrics: dict[str, Any],
    config: ml_collections.ConfigDict,
    *,
    mode: str,
    checkpoint: str,
    forced: bool,
    writer: MetricWriter,
) -> dict[str, Any]:
    """Appends one test evaluation to the ledger and a `test` line to metrics.jsonl."""
    protocol = {
        "dataset": config.dataset,
        "split": "test",
        "crops": int(metrics["crops"]),
        "num_examples": int(metrics["num_examples"]),
    }
    if config.dataset == "imagenet2012":
        protocol["data_split"] = config.data.test_split  # the TFDS split string
    entry = {
        "time": _now(),
        "step": int(step),
        "checkpoint": checkpoint,
        "mode": mode,  # 'train': the evaluation at the end of training; 'test': --mode test
        "forced": bool(forced),
        "protocol": protocol,
        "result": {k: float(metrics[k]) for k in ("loss", "top1_error", "top5_error")},
    }
    writer.write(step, "test", {**metrics, "mode": mode, "forced": bool(forced)})
    if _primary():
        with open(os.path.join(workdir, LEDGER_FILE), "a") as f:
            f.write(json.dumps(entry) + "\n")
    return entry


def final_test(
    run: Callable[[], dict[str, Any]],
    workdir: str,
    step: int,
    config: ml_collections.ConfigDict,
    writer: MetricWriter,
) -> dict[str, Any]:
    """The test evaluation at the end of training, recorded in the ledger.

    Running a finished run's command again (which resumes at the end) does not look at the test
    split again: the recorded result of this step is returned instead.
    """
    history = test_history(workdir)
    for entry in history:
        if entry["step"] == step and entry.get("mode") == "train":
            if _primary():
                print(
                    f"The test split was evaluated at step {step} on {entry['time']}; "
                    f"not again (see {LEDGER_FILE}).",
                    flush=True,
                )
            return {
                **entry["result"],
                "num_examples": entry["protocol"]["num_examples"],
                "crops": entry["protocol"]["crops"],
            }
    if history and _primary():
        print(
            f"Warning: the test split of {workdir} has been evaluated {len(history)} time(s) "
            f"before this one (see {LEDGER_FILE}).",
            flush=True,
        )
    metrics = run()
    record_test(
        workdir,
        step,
        metrics,
        config,
        mode="train",
        checkpoint="final",
        forced=bool(history),
        writer=writer,
    )
    return metrics


# --- the summary -------------------------------------------------------------------------------


def best_val(workdir: str, steps: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The training run's validation line with the lowest top-1 error (earliest on a tie),
    among `steps` if given."""
    lines = [
        m
        for m in read_metrics(workdir)
        if m.get("split") == "val"
        and "mode" not in m  # written by training, not --mode eval
        and (steps is None or m["step"] in steps)
    ]
    return min(lines, key=lambda m: (m["top1_error"], m["step"])) if lines else None


def summary_markdown(
    workdir: str, *, last_step: int, first_step: int, wall_s: float, test: dict[str, Any]
) -> str:
    """A short Markdown table: best validation, the test result, steps, wall time, images/s."""
    best = best_val(workdir)
    best_row = "n/a (no validation line)"
    if best:
        best_row = (
            f"top-1 {100 * best['top1_error']:.2f} %, top-5 {100 * best['top5_error']:.2f} % "
            f"at step {best['step']} ({protocol_name(best.get('crops', 1))}, "
            f"{best.get('num_examples', '?')} images)"
        )
    history = test_history(workdir)
    times = f"; the test split has been evaluated {len(history)} times ({LEDGER_FILE})"
    test_row = (
        f"top-1 {100 * test['top1_error']:.2f} %, top-5 {100 * test['top5_error']:.2f} % "
        f"at step {last_step} ({protocol_name(test['crops'])}, {test['num_examples']} images)"
        + (times if len(history) > 1 else "")
    )
    rates = [
        m["images_per_sec"]
        for m in read_metrics(workdir)
        if m.get("split") == "train" and isinstance(m.get("images_per_sec"), float)
    ]
    rate = f"{statistics.median(rates):,.0f} (median of the logged intervals)" if rates else "n/a"
    run = f"{last_step}" + (f" (this run: {first_step} -> {last_step})" if first_step else "")
    rows = [
        ("best validation error", best_row),
        ("test error", test_row),
        ("steps", run),
        ("wall time", f"{wall_s:.1f} s"),
        ("images/s", rate),
    ]
    lines = [f"# {os.path.basename(os.path.abspath(workdir))}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_summary(
    workdir: str, *, last_step: int, first_step: int, wall_s: float, test: dict[str, Any]
) -> str:
    """Prints the summary table and saves it as `<workdir>/summary.md` (process 0 only)."""
    text = summary_markdown(
        workdir, last_step=last_step, first_step=first_step, wall_s=wall_s, test=test
    )
    if _primary():
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            f.write(text)
        print("\n" + text, flush=True)
    return text


# --- a trained model ---------------------------------------------------------------------------


def check_config_matches(
    config: ml_collections.ConfigDict, trained: dict[str, Any], workdir: str
) -> None:
    """The model and dataset must be those the checkpoint was trained with (`trained`)."""
    now = json.loads(config.to_json_best_effort())
    keys = [("dataset",)] + [
        ("model", k) for k in sorted(set(trained.get("model", {})) | set(now.get("model", {})))
    ]
    keys.append(("data", "image_size"))

    def get(tree, key):
        for k in key:
            tree = tree.get(k, "<unset>") if isinstance(tree, dict) else "<unset>"
        return tree

    diff = [
        f"{'.'.join(k)}={get(trained, k)!r} (now {get(now, k)!r})"
        for k in keys
        if get(trained, k) != get(now, k)
    ]
    if diff:
        raise UsageError(
            f"{workdir} was trained with {', '.join(diff)}: give the training run's "
            f"experiment and --config overrides ({workdir}/config.json lists them all)"
        )


def open_checkpoints(workdir: str):
    """The workdir's Checkpointer; a UsageError when it has no checkpoint (nothing is created)."""
    from alexnet_jax import checkpoint

    directory = os.path.join(workdir, "checkpoints")
    if os.path.isdir(directory):
        ckpt = checkpoint.Checkpointer(workdir)
        if ckpt.all_steps():
            return ckpt
        ckpt.close()
    raise UsageError(f"no checkpoint in {directory}: train first")


def choose_step(ckpt, which: str, workdir: str) -> tuple[int, str]:
    """(step, label) of the checkpoint that `which` names: latest, best (validation) or a step."""
    steps = ckpt.all_steps()
    if which == "latest":
        return max(steps), "latest"
    if which == "best":
        best = ckpt.best_step()  # the lowest validation top-1 error saved with a checkpoint
        if best is None:  # else the training run's val lines at the kept steps
            line = best_val(workdir, steps)
            best = None if line is None else int(line["step"])
        if best is None:
            raise UsageError(
                f"none of the kept checkpoints {steps} has a validation result; "
                "use --checkpoint latest"
            )
        return best, "best"
    if which.isdigit() and int(which) in steps:
        return int(which), which
    raise UsageError(f"--checkpoint must be {CHECKPOINT_CHOICES}; kept steps: {steps}")


def load_params(
    config: ml_collections.ConfigDict,
    workdir: str,
    which: str = "latest",
    image_shape: tuple[int, int, int] | None = None,
) -> tuple[int, Any, str]:
    """(step, host params, label) of a workdir's checkpoint, restored through the TrainState."""
    from alexnet_jax import train
    from alexnet_jax.model import from_config

    size = config.data.image_size
    shape = image_shape or (size, size, 3)
    model = from_config(config.model)
    ckpt = open_checkpoints(workdir)
    try:
        step, label = choose_step(ckpt, which, workdir)
        check_config_matches(config, ckpt.restore_meta(step)["config"], workdir)
        # The structure only: nothing is initialised, the checkpoint fills in the values.
        abstract = jax.eval_shape(lambda: train.create_state(config, model, shape)[0])
        state = ckpt.restore(abstract, step)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"cannot restore the checkpoint at step {step} of {workdir} for this config ({e}); "
            "give the training run's --config overrides"
        ) from None
    finally:
        ckpt.close()
    return step, state.params, label


# --- the modes ---------------------------------------------------------------------------------


@functools.cache
def _pmapped_eval(model) -> Callable[..., dict[str, Any]]:
    from alexnet_jax import parallel, train

    step = functools.partial(train.eval_step, model=model, axis_name=parallel.AXIS)
    return jax.pmap(step, axis_name=parallel.AXIS)


def _score(config, source, params: Any, split: str) -> dict[str, Any]:
    """`train.evaluate` (padded, masked, exact) with the pmapped eval step alone."""
    from alexnet_jax import parallel, train
    from alexnet_jax.model import from_config

    steps = train.Steps(train=None, eval=_pmapped_eval(from_config(config.model)))
    try:
        return train.evaluate(steps, parallel.replicate(params), source, split, config)
    except ValueError as e:  # e.g. a source without 10-crop views
        raise UsageError(str(e)) from None


def _writer(workdir: str) -> MetricWriter:
    return MetricWriter(workdir, enabled=_primary())  # appends; keeps the training log whole


def _source(config):
    from alexnet_jax.data import make_source

    return make_source(config)


def run_eval(
    config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = "latest"
) -> dict[str, Any]:
    """Scores the validation split; appends a `val` line with `mode: eval` to metrics.jsonl."""
    source = _source(config)
    step, params, label = load_params(config, workdir, checkpoint, source.info.image_shape)
    metrics = _score(config, source, params, "val")
    writer = _writer(workdir)
    writer.write(step, "val", {**metrics, "mode": "eval", "checkpoint": label})
    writer.close()
    if _primary():
        print(describe(step, "val", metrics) + f"  [{label} checkpoint]", flush=True)
    return metrics


def run_test(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    force: bool = False,
    checkpoint: str = "latest",
) -> dict[str, Any]:
    """Scores the test split once per workdir (again only with `force`), and records it."""
    check_test_allowed(workdir, force)
    source = _source(config)
    step, params, label = load_params(config, workdir, checkpoint, source.info.image_shape)
    metrics = _score(config, source, params, "test")
    writer = _writer(workdir)
    record_test(
        workdir,
        step,
        metrics,
        config,
        mode="test",
        checkpoint=label,
        forced=force and bool(test_history(workdir)),
        writer=writer,
    )
    writer.close()
    if _primary():
        print(describe(step, "test", metrics) + f"  [{label} checkpoint]", flush=True)
        print(f"Recorded in {os.path.join(workdir, LEDGER_FILE)}.", flush=True)
    return metrics


# --- predict -----------------------------------------------------------------------------------

Preprocess = Callable[[str], np.ndarray]  # image path -> [H, W, 3] or [crops, H, W, 3]


def _tf_preprocessor(config: ml_collections.ConfigDict) -> Preprocess:
    """The eval transform of the TensorFlow sources (`data.augment.eval_image`) on a file."""
    from alexnet_jax.data import augment, imagenet, tfds_common

    tf = tfds_common.import_tf()
    default = None
    if config.dataset == "imagenet2012":
        default = imagenet.prepared_path(config.data).parent / imagenet.MEAN_IMAGE_FILE
    mean_image = imagenet.load_mean_image(config.data, default)
    cfg = augment.AugmentConfig.from_config(config.data, mean_image)

    def preprocess(path: str) -> np.ndarray:
        with open(path, "rb") as f:
            data = f.read()
        try:
            return augment.eval_image(tf.constant(data), cfg, config.eval.crops).numpy()
        except tf.errors.InvalidArgumentError as e:
            raise UsageError(f"cannot decode {path}: {e.message.splitlines()[0]}") from None

    return preprocess


def _array_preprocessor(source) -> Preprocess:
    """A source's own `preprocess(pixels)`, on a file decoded with PIL."""
    from PIL import Image, UnidentifiedImageError

    def preprocess(path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"cannot decode {path}: {e}") from None
        return source.preprocess(pixels)

    return preprocess


def predictor(config: ml_collections.ConfigDict) -> tuple[Preprocess, tuple[str, ...]]:
    """(the dataset's eval preprocessing of one image file, the class names)."""
    if config.dataset == "imagenet2012":  # no need for the prepared dataset to name its classes
        from alexnet_jax import imagenet_classes

        return _tf_preprocessor(config), imagenet_classes.class_names()
    if config.dataset == "folder":
        from alexnet_jax.data import make_source

        listing = ml_collections.ConfigDict(config.to_dict())
        listing.data.folder_scan = "none"  # the names only: do not decode every image
        return _tf_preprocessor(config), tuple(make_source(listing).info.class_names)
    if config.dataset == "digits":
        source = _source(config)
        if config.eval.crops != 1:
            raise UsageError("the digits source evaluates centre crops only (eval.crops=1)")
        return _array_preprocessor(source), tuple(source.info.class_names)
    raise UsageError(f"--mode predict needs a dataset with named classes, not {config.dataset!r}")


def top_k(probs: np.ndarray, names: Sequence[str], k: int = 5) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


def run_predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: Sequence[str],
    *,
    checkpoint: str = "latest",
    k: int = 5,
) -> list[list[tuple[str, float]]]:
    """Prints the top-k classes and probabilities of each image; returns them."""
    from alexnet_jax.model import from_config

    if not images:
        raise UsageError("--mode predict needs --image PATH [PATH ...]")
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"no such image: {', '.join(missing)}")
    preprocess, names = predictor(config)
    if len(names) != config.model.num_classes:
        raise UsageError(
            f"model.num_classes={config.model.num_classes} but {config.dataset!r} names "
            f"{len(names)} classes"
        )
    step, params, label = load_params(config, workdir, checkpoint)
    model = from_config(config.model)

    @jax.jit
    def probabilities(x):  # [views, H, W, C] -> softmax averaged over the views
        return jax.nn.softmax(model.apply({"params": params}, x, train=False)).mean(axis=0)

    results = []
    for path in images:
        x = preprocess(path)
        views = x if x.ndim == 4 else x[None]
        probs = np.asarray(probabilities(views))
        best = top_k(probs, names, k)
        results.append(best)
        print(f"{path}  (step {step}, {label} checkpoint, {protocol_name(len(views))})")
        for name, p in best:
            print(f"  {100 * p:6.2f} %  {name}")
    return results
