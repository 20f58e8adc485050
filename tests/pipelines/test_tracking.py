"""Run records: JSON lines per logging step (a resumed run's repeats replace the first), and the loss curve."""

import json

from pipelines.tracking import final_loss, plot_loss_curve, read_metrics


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [
        {"stage": "pretrain", "step": 2, "loss": 5.0, "aux_loss": 0.01},
        {"stage": "sft", "step": 2, "loss": 3.0, "aux_loss": 0.01},
        {"stage": "sft", "step": 4, "loss": 2.5, "aux_loss": 0.01},  # then killed; resumed from step 2
        {"stage": "sft", "step": 4, "loss": 2.4, "aux_loss": 0.01},
        {"stage": "sft", "step": 6, "loss": 2.0, "aux_loss": 0.01},
        {"stage": "sft", "step": 6, "train_runtime": 1.0, "train_loss": 2.2},
    ])
    records = read_metrics(path)
    assert [(r["stage"], r["step"]) for r in records if "loss" in r] == [("pretrain", 2), ("sft", 2), ("sft", 4),
                                                                          ("sft", 6)]
    assert [r["loss"] for r in records if r["step"] == 4] == [2.4]
    assert final_loss(records, "sft") == 2.0 and final_loss(records, "pretrain") == 5.0
    assert final_loss(records, "rm") is None


def test_the_loss_curve_is_a_png(tmp_path):
    records = [{"stage": s, "step": i, "loss": 5.0 / i, "aux_loss": 0.01} for s in ("pretrain", "sft")
               for i in range(1, 6)]
    out = plot_loss_curve(records, tmp_path / "loss.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss_curve([], tmp_path / "none.png") is None
