"""Run records beside the checkpoints: metrics as JSON lines, and a loss-curve PNG drawn from them.

TensorBoard and W&B come from ``report_to`` (transformers' own callbacks); the JSONL file is the record that needs no
viewer, and the one tests and the model card read. One line per logging step:
``{"stage": "sft", "step": 40, "time": ..., "loss": ..., "aux_loss": ..., "learning_rate": ..., ...}``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

class JsonlMetrics(TrainerCallback):
    """Appends every ``Trainer`` log (training steps and the final summary) to ``path``, tagged with the stage.

    Appending keeps the lines of an interrupted run; a resumed run repeats the steps after its checkpoint, and
    ``read_metrics`` keeps the last line of each (stage, step)."""

    def __init__(self, path: str | Path, stage: str):
        self.path, self.stage = Path(path), stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"stage": self.stage, "step": state.global_step, "time": round(time.time(), 3), **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``path``, one per (stage, step, kind): a resumed run's repeat of a step replaces the first."""
    path = Path(path)
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            kind = r.get("event") or ("summary" if "train_runtime" in r else "step")  # events keep their own line
            records[(r.get("stage"), r.get("step"), kind)] = r
    return list(records.values())


def final_loss(records: list[dict], stage: str) -> float | None:
    """The last logged training loss of ``stage``."""
    steps = [r for r in records if r.get("stage") == stage and "loss" in r]
    return steps[-1]["loss"] if steps else None


def plot_loss_curve(records: list[dict], out: str | Path, title: str = "") -> Path | None:
    """Training loss (and the balance loss, right axis) against optimizer steps, stages one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r and "train_runtime" not in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    aux_ax, offset, stages = None, 0, []
    for r in steps:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    for stage in stages:
        rows = sorted((r for r in steps if r["stage"] == stage), key=lambda r: r["step"])
        xs = [offset + r["step"] for r in rows]
        ax.plot(xs, [r["loss"] for r in rows], label=f"{stage} loss")
        aux = [(x, r["aux_loss"]) for x, r in zip(xs, rows) if isinstance(r.get("aux_loss"), float)]
        if aux and all(math.isfinite(a) for _, a in aux):
            aux_ax = aux_ax or ax.twinx()
            aux_ax.plot(*zip(*aux), linestyle=":", label=f"{stage} aux_loss")
        if offset:
            ax.axvline(offset, color="grey", linewidth=0.8)
        offset = xs[-1]
    ax.set_xlabel("optimizer step (stages in sequence)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    return _finish(fig, ax, aux_ax, "balance loss (aux_loss)", out, title, loc="upper right")


def _finish(fig, ax, right_ax, right_label: str, out, title: str, **legend) -> Path:
    """Grid, one legend for both axes, title; saved to ``out``."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right_ax is not None:
        right_ax.set_ylabel(right_label)
        more = right_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, **legend)
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_reward_curve(records: list[dict], out: str | Path, keys=("reward", "accuracy", "kl"), title: str = "") -> Path | None:
    """GRPO: reward (and accuracy, KL on a right axis) against steps, stages one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "reward" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    kl_ax = ax.twinx() if "kl" in keys else None
    for i, r in enumerate(steps):
        r["_x"] = i + 1
    for stage in dict.fromkeys(r["stage"] for r in steps):
        rows = [r for r in steps if r["stage"] == stage]
        xs = [r["_x"] for r in rows]
        for key in keys:
            values = [(x, r[key]) for x, r in zip(xs, rows) if isinstance(r.get(key), (int, float))]
            if values:
                target = kl_ax if key == "kl" else ax
                target.plot(*zip(*values), linestyle=":" if key == "kl" else "-", label=f"{stage} {key}")
    ax.set_xlabel("GRPO step (stages in sequence)")
    ax.set_ylabel("reward / accuracy")
    return _finish(fig, ax, kl_ax, "KL to the reference (k3)", out, title, loc="upper left", fontsize=8)
