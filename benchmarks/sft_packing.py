"""SFT effective (non-padding) tokens/s: ours (``pipelines.sft``, data_prep's packed rows) against vanilla TRL
``SFTTrainer`` padding each batch to its longest conversation, with transformers' own DeepseekV2, in one process.

    python -m benchmarks.sft_packing [--steps 12] [--rows 16] [--max-length 256]

Same model weights (a fresh tiny model), same conversations (the tiny mixture's SFT set), bf16 autocast on both
sides where the CPU has native bf16 (fp32 on both where it would be emulated, ~20x slower), and the same number of
conversations per optimizer step: ours packs ``--rows`` rows of ``--max-length`` tokens; the peer's batch holds as
many conversations as those rows carry on average. Both count real tokens the same way (TRL's ``num_tokens`` log:
the attention-mask sum, which for packed rows is every real token), and the rate is measured between the first and
the last logged step (the first step warms up).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks import save



def _rate(records: list[dict]) -> tuple[float, int]:
    steps = [r for r in records if "num_tokens" in r and "loss" in r]
    first, last = steps[0], steps[-1]
    return (last["num_tokens"] - first["num_tokens"]) / (last["time"] - first["time"]), len(steps) - 1


def run_ours(data: Path, policy: Path, args, out: Path) -> dict:
    from pipelines import sft
    from pipelines.tracking import read_metrics

    sft.main(["recipes/sft/tiny.yaml", "--data_dir", str(data), "--model_name_or_path", str(policy),
              "--output_dir", str(out), "--pretrain", "null", "--max_steps", str(args.steps), "--logging_steps", "1",
              "--per_device_train_batch_size", str(args.rows), "--max_length", str(args.max_length),
              "--save_strategy", "no", "--report_to", "none", "--eval_math", "0", "--eval_safety", "0",
              "--bf16", str(args.bf16).lower()])
    rate, steps = _rate(read_metrics(out / "metrics.jsonl"))
    return {"tokens_per_second": rate, "steps_timed": steps}


def run_trl(data: Path, policy: Path, args, out: Path, batch: int) -> dict:
    import time

    import transformers
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from data_prep.tokenizer import load_tokenizer

    records = []

    class Log(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            records.append({"time": time.time(), **(logs or {})})

    tokenizer = load_tokenizer(policy)
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(policy, dtype=torch.float32)
    conversations = load_from_disk(str(data / "sft")).select_columns(["messages"])
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=args.steps,
                       learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                       bf16=args.bf16, packing=False, max_length=args.max_length, dataloader_num_workers=0, seed=0)
    SFTTrainer(model=model, args=config, train_dataset=conversations, processing_class=tokenizer,
               callbacks=[Log()]).train()
    rate, steps = _rate(records)
    return {"tokens_per_second": rate, "steps_timed": steps, "batch_conversations": batch}


def conversations_per_row(data: Path, policy: Path, max_length: int) -> float:
    from datasets import load_from_disk

    from data_prep.packing import tokenize_for_sft
    from data_prep.tokenizer import load_tokenizer

    conversations = load_from_disk(str(data / "sft"))
    rows = tokenize_for_sft(conversations, load_tokenizer(policy), max_length, packing=True,
                            cache_dir=data / "tokenized")
    return len(conversations) / len(rows)


def main(argv=None) -> dict:
    from benchmarks.grpo_step import prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--data-dir", default="runs/data/tiny")
    args = p.parse_args(argv)
    from pipelines.models import native_bf16

    args.bf16 = native_bf16() is not False
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data, policy = prepare(root, args.data_dir)
        per_row = conversations_per_row(data, policy, args.max_length)
        batch = round(per_row * args.rows)
        trl = run_trl(data, policy, args, root / "trl", batch)
        ours = run_ours(data, policy, args, root / "ours")
    result = {"ours_packed": ours, "trl_padded": trl, "conversations_per_packed_row": per_row,
              "ratio": ours["tokens_per_second"] / trl["tokens_per_second"]}
    text = (f"SFT effective tokens/s, tiny model, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.rows} packed rows "
            f"of {args.max_length} "
            f"(~{batch} conversations) vs {batch} padded conversations per step\n\n"
            "| run | real tokens/s | ratio |\n|---|---:|---:|\n"
            f"| TRL SFTTrainer, padding, transformers' DeepseekV2 | {trl['tokens_per_second']:.0f} | 1.00x |\n"
            f"| ours, packed rows (data_prep), our model | {ours['tokens_per_second']:.0f} | "
            f"{result['ratio']:.2f}x |\n")
    save("sft_packing", result, text)
    return result


if __name__ == "__main__":
    main()
