"""What a run reports: the result line, the test ledger, and summary.md.

- Every score says its protocol: `describe` is the one format of a result line (the training
  loop's validation lines, the final lines and the evaluation modes all print it).
- Test once: the test split is for the one final number. Every test evaluation (the one at the
  end of training, and each `--mode test`) is appended to the ledger (`workdir.LEDGER`) and
  written as a `split: "test"` line to metrics.jsonl; a second `--mode test` on a workdir is
  refused unless `--force_test` is given, and then it is recorded like the first.
"""

from __future__ import annotations

import datetime
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from alexnet_jax import classification, keys, workdir
from alexnet_jax.data import DATASETS
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import INPUT_BOUND, MetricWriter

RESULT_KEYS = ("loss", "top1_error", "top5_error", *classification.SCALARS)


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


# --- the test ledger ---------------------------------------------------------------------------


def read_ledger(path: str) -> list[dict[str, Any]]:
    """Every recorded test evaluation of the workdir `path`, oldest first."""
    return workdir.read_jsonl(
        workdir.path(path, workdir.LEDGER), required=("step", "protocol", "result")
    )


def test_history(path: str) -> list[dict[str, Any]]:
    """The ledger; for a workdir from before the ledger, its metrics.jsonl test lines."""
    ledger = read_ledger(path)
    if ledger:
        return ledger
    return [
        {
            "time": "an earlier run",
            "step": m["step"],
            "mode": m.get("mode", "train"),
            "protocol": {"crops": m.get("crops", 1), "num_examples": m.get("num_examples")},
            "result": m,
        }
        for m in workdir.read_metrics(path)
        if m.get("split") == "test"
    ]


def check_test_allowed(path: str, force: bool) -> None:
    """Refuses a second look at the test split unless `force` (exit 2 via UsageError)."""
    history = test_history(path)
    if not history or force:
        return
    last = history[-1]
    top1 = last["result"].get("top1_error")
    score = f", top-1 error {100 * top1:.2f} %" if isinstance(top1, float) else ""
    raise UsageError(
        f"the test split of {path} was already evaluated on {last.get('time', '?')} (step "
        f"{last['step']}, {protocol_name(last['protocol'].get('crops', 1))}{score}; "
        f"{len(history)} time(s) in all); the test split is for one final number: "
        f"use --mode eval for the validation split, or --force_test to evaluate it again "
        f"(recorded in {workdir.LEDGER})"
    )


def record_test(
    path: str,
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
    split_key = DATASETS[config.dataset].split_keys.get("test")
    if split_key:
        protocol["data_split"] = keys.get(config, split_key)  # e.g. the TFDS split string
    entry = {
        "time": _now(),
        "step": int(step),
        "checkpoint": checkpoint,
        "mode": mode,  # 'train': the evaluation at the end of training; 'test': --mode test
        "forced": bool(forced),
        "protocol": protocol,
        "result": {k: float(metrics[k]) for k in RESULT_KEYS if k in metrics},
    }
    writer.write(step, "test", {**metrics, "mode": mode, "forced": bool(forced)})
    if workdir.is_primary():
        workdir.append_jsonl(workdir.path(path, workdir.LEDGER), entry)
    return entry


def final_test(
    run: Callable[[], dict[str, Any]],
    path: str,
    step: int,
    config: ml_collections.ConfigDict,
    writer: MetricWriter,
) -> dict[str, Any]:
    """The test evaluation at the end of training, recorded in the ledger.

    Running a finished run's command again (which resumes at the end) does not look at the test
    split again: the recorded result of this step is returned instead.
    """
    history = test_history(path)
    primary = workdir.is_primary()
    for entry in history:
        if entry["step"] == step and entry.get("mode") == "train":
            if primary:
                print(
                    f"The test split was evaluated at step {step} on {entry.get('time', '?')}; "
                    f"not again (see {workdir.LEDGER}).",
                    flush=True,
                )
            return {
                **entry["result"],
                "num_examples": entry["protocol"].get("num_examples"),
                "crops": entry["protocol"].get("crops", 1),
            }
    if history and primary:
        print(
            f"Warning: the test split of {path} has been evaluated {len(history)} time(s) "
            f"before this one (see {workdir.LEDGER}).",
            flush=True,
        )
    metrics = run()
    record_test(
        path,
        step,
        metrics,
        config,
        mode="train",
        checkpoint="final",
        forced=bool(history),
        writer=writer,
    )
    return metrics


def test_report(
    metrics: dict[str, Any], confusion: Any, path: str, class_names: Sequence[str] | None
) -> dict[str, Any]:
    """The seed's final report of the test split: per_class_test.csv, the confusion matrix
    (.npy; .png up to 50 classes) and the five worst classes by F1, printed. Returns `metrics`."""
    if workdir.is_primary():
        report = classification.save_report(path, "test", confusion, class_names)
        worst = classification.format_classes(
            report, classification.worst_classes(report), class_names
        )
        print(f"The five worst test classes (F1):\n{worst}", flush=True)
    return metrics


def is_finished(path: str) -> bool:
    """Whether the workdir's training ran to its end: its test line came from training."""
    return any(
        m.get("split") == "test" and m.get("mode", "train") == "train"
        for m in workdir.read_metrics(path)
    )


# --- the summary -------------------------------------------------------------------------------


def best_val(path: str, steps: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The training run's validation line with the lowest top-1 error (earliest on a tie),
    among `steps` if given."""
    lines = [
        m
        for m in workdir.read_metrics(path)
        if m.get("split") == "val"
        and "mode" not in m  # written by training, not --mode eval
        and isinstance(m.get("top1_error"), float)
        and (steps is None or m["step"] in steps)
    ]
    return min(lines, key=lambda m: (m["top1_error"], m["step"])) if lines else None


def _score(m: dict[str, Any], step: int) -> str:
    return (
        f"top-1 {100 * m['top1_error']:.2f} %, top-5 {100 * m['top5_error']:.2f} % "
        f"at step {step} ({protocol_name(m.get('crops', 1))}, {m.get('num_examples', '?')} images)"
    )


def _report(m: dict[str, Any]) -> str:
    if not all(k in m for k in classification.SCALARS):
        return "n/a (a test result from before the report)"
    return (
        f"accuracy {100 * m['accuracy']:.2f} %, macro precision {100 * m['precision_macro']:.2f}"
        f" %, recall {100 * m['recall_macro']:.2f} %, F1 {100 * m['f1_macro']:.2f} % "
        f"(per class: {workdir.PER_CLASS.format(split='test')})"
    )


def summary_markdown(
    path: str, *, last_step: int, first_step: int, wall_s: float, test: dict[str, Any]
) -> str:
    """A short Markdown table: best validation, the test result, steps, wall time, images/s."""
    best = best_val(path)
    history = test_history(path)
    times = f"; the test split has been evaluated {len(history)} times ({workdir.LEDGER})"
    rates = [
        m["images_per_sec"]
        for m in workdir.read_metrics(path)
        if m.get("split") == "train" and isinstance(m.get("images_per_sec"), float)
    ]
    rate = f"{statistics.median(rates):,.0f} (median of the logged intervals)" if rates else "n/a"
    waits = [
        m["input_wait_fraction"]
        for m in workdir.read_metrics(path)
        if m.get("split") == "train" and isinstance(m.get("input_wait_fraction"), float)
    ]
    run = f"{last_step}" + (f" (this run: {first_step} -> {last_step})" if first_step else "")
    rows = [
        ("best validation error", _score(best, best["step"]) if best else "n/a (no val line)"),
        ("test error", _score(test, last_step) + (times if len(history) > 1 else "")),
        ("test report", _report(test)),
        ("steps", run),
        ("wall time", f"{wall_s:.1f} s"),
        ("images/s", rate),
        ("input", _input_bound(waits)),
    ]
    lines = [f"# {os.path.basename(os.path.abspath(path))}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _input_bound(waits: list[float]) -> str:
    """Whether the step loop waited for its input more than `INPUT_BOUND` of the time."""
    if not waits:
        return "n/a (no input_wait_fraction logged)"
    wait = statistics.median(waits)
    verdict = "input-bound" if wait > INPUT_BOUND else "not input-bound"
    return f"{verdict}: waited for input {100 * wait:.1f} % of the time (median of the intervals)"


def write_summary(
    path: str, *, last_step: int, first_step: int, wall_s: float, test: dict[str, Any]
) -> str:
    """Prints the summary table and saves it as summary.md (process 0 only)."""
    text = summary_markdown(
        path, last_step=last_step, first_step=first_step, wall_s=wall_s, test=test
    )
    if workdir.is_primary():
        workdir.write_atomic(workdir.path(path, workdir.SUMMARY), text)
        print("\n" + text, flush=True)
    return text
