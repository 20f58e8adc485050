"""The evaluation report: ``report.json`` (everything measured), ``report.md`` (checkpoints × tasks, deltas against
the baseline, the paper's own SFT → RL deltas beside ours) and PNG plots (metrics per stage, the runs' reward / KL
and loss curves)."""

from __future__ import annotations

import math
from pathlib import Path

from pipelines.tracking import plot_loss_curve, plot_reward_curve, read_metrics

# DeepSeek-V2 Chat (SFT) -> DeepSeek-V2 Chat (RL), arXiv 2405.04434 Table 3 (standard benchmarks) and Table 4
# (open-ended generation). For orientation only: a 236B model on real benchmarks, not our tiny model's tasks.
PAPER = {
    "GSM8K": {"table": 3, "sft": 90.8, "rl": 92.2, "ours": "math"},
    "MATH": {"table": 3, "sft": 52.7, "rl": 53.9, "ours": "math"},
    "HumanEval": {"table": 3, "sft": 76.8, "rl": 81.1, "ours": "code"},
    "MBPP": {"table": 3, "sft": 70.4, "rl": 72.0, "ours": "code"},
    "LiveCodeBench": {"table": 3, "sft": 28.7, "rl": 32.5, "ours": "code"},
    "MMLU": {"table": 3, "sft": 78.4, "rl": 77.8, "ours": None},
    "BBH": {"table": 3, "sft": 81.3, "rl": 79.7, "ours": None},
    "MT-Bench": {"table": 4, "sft": 8.62, "rl": 8.97, "ours": "rm_winrate"},
    "AlpacaEval 2.0 (LC win rate)": {"table": 4, "sft": 30.0, "rl": 38.9, "ours": "rm_winrate"},
}

# the paper benchmark's nearest column of ours
OURS = {"math": "math EM", "code": "code pass@1", "rm_winrate": "RM helpful win rate"}

# metric key in results[checkpoint][task] -> (column label, higher is better)
HEADLINE = {
    "math": [("exact_match", "math EM")],
    "code": [("pass@1", "code pass@1")],
    "safety": [("harmful_refused", "harmful refused"), ("benign_answered", "benign answered")],
    "perplexity": [("perplexity", "chat perplexity")],
}


def headline(report: dict) -> dict[str, dict[str, float]]:
    """checkpoint -> {column: value}: the numbers of the main table."""
    table = {}
    for ckpt, tasks in report["results"].items():
        row = {}
        for task, metrics in tasks.items():
            kind = report["tasks"][task]["kind"]
            for key, label in HEADLINE.get(kind, []):
                if key in metrics:
                    row[label if task == kind else f"{task} {label.split(' ', 1)[-1]}"] = metrics[key]
        for rm, per_ckpt in report.get("rm_winrate", {}).items():
            if ckpt in per_ckpt:
                row[f"RM {rm} win rate"] = per_ckpt[ckpt]["win_rate_vs_baseline"]
        table[ckpt] = row
    return table


def deltas(table: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    base = table[baseline]
    return {ckpt: {k: v - base[k] for k, v in row.items() if k in base} for ckpt, row in table.items()
            if ckpt != baseline}


def _fmt(value: float, label: str) -> str:
    if "perplexity" in label:
        return f"{value:.3f}"
    return f"{100 * value:.1f}%"


def _fmt_delta(value: float, label: str) -> str:
    if "perplexity" in label:
        return f"{value:+.3f}"
    return f"{100 * value:+.1f}"


def render_markdown(report: dict) -> str:
    table, baseline = report["headline"], report["baseline"]
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    lines = [f"# Evaluation: {', '.join(report['checkpoints'])}", ""]
    if report.get("oracle"):
        lines += ["Oracle mode: each row's own reference reply scored in place of a model's (checks the scorers).", ""]
    lines += ["| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for ckpt, row in table.items():
        cells = [_fmt(row[c], c) if c in row else "" for c in columns]
        lines.append(f"| {ckpt} | " + " | ".join(cells) + " |")
    if len(table) > 1:
        lines += ["", f"Change against `{baseline}` (points; perplexity in its own units):", "",
                  "| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for ckpt, row in report["deltas"].items():
            lines.append(f"| {ckpt} | " + " | ".join(_fmt_delta(row[c], c) if c in row else "" for c in columns)
                         + " |")
    lines += ["", "Tasks:", ""]
    for task, info in report["tasks"].items():
        if info["kind"] == "perplexity":
            how = f"{info['n']} conversations, reference replies scored"
        elif report.get("oracle"):
            how = f"{info['n']} prompts, reference replies"
        else:
            how = f"{info['n']} prompts, " + (f"{info['samples']} samples each" if info["samples"] > 1 else "greedy")
        lines.append(f"- `{task}` ({info['kind']}): {info['source']}, {how}")
    if report.get("rm_winrate"):
        lines.append(f"- RM win rate: how often the reward model scores a checkpoint's reply to a held-out safety "
                     f"prompt above `{baseline}`'s reply to it (ties half)")
    last = list(table)[-1]
    if last != baseline and not report.get("oracle"):
        lines += ["", f"For orientation, DeepSeek-V2 Chat SFT → RL (arXiv 2405.04434, Tables 3–4: a 236B model on "
                  f"real benchmarks) beside this run's `{baseline}` → `{last}` on its nearest task:", "",
                  "| paper benchmark | SFT | RL | Δ | ours, nearest task | ours Δ |", "|---|---:|---:|---:|---|---:|"]
        for bench, p in PAPER.items():
            column = OURS.get(p["ours"])
            if column in report["deltas"][last]:
                ours = (f"{100 * table[last][column]:.1f}% (50% = no change)" if "win rate" in column
                        else _fmt_delta(report["deltas"][last][column], column))
            else:
                column, ours = "—", "—"
            lines.append(f"| {bench} (Table {p['table']}) | {p['sft']} | {p['rl']} | {p['rl'] - p['sft']:+.1f} | "
                         f"{column} | {ours} |")
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in report["plots"])]
    lines += ["", f"Evaluated in {report['seconds']['total']:.0f} s ({report['backend']} generation)."]
    return "\n".join(lines) + "\n"


def plot_stages(table: dict[str, dict[str, float]], out: Path) -> Path | None:
    """Grouped bars: each rate metric (0–1) per checkpoint, in stage order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in dict.fromkeys(c for row in table.values() for c in row) if "perplexity" not in c]
    if not columns:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns)), 4.5))
    width = 0.8 / len(table)
    for i, (ckpt, row) in enumerate(table.items()):
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(xs, [100 * row.get(c, math.nan) for c in columns], width, label=ckpt)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("held-out metrics per checkpoint (stage order)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_runs(runs: list[str], out_dir: Path) -> list[Path]:
    """The reward / accuracy / KL curves of GRPO run folders and the loss curves of SFT run folders."""
    plots = []
    for run in runs:
        records = read_metrics(Path(run) / "metrics.jsonl")
        if not records:
            continue
        name = f"{Path(run).resolve().parent.name}_{Path(run).name}"  # runs/sft/tiny -> sft_tiny
        if any("reward" in r for r in records):
            plot = plot_reward_curve(records, out_dir / f"{name}_reward_kl.png", title=f"{run}: reward, KL")
        else:
            plot = plot_loss_curve(records, out_dir / f"{name}_loss.png", title=f"{run}: training loss")
        if plot:
            plots.append(plot)
    return plots
