"""Ours vs transformers' own DeepseekV2, side by side in one process, on identical weights and batches.

  python -m benchmarks.modeling_speed [--model tiny] [--contexts 256 1024 2048] [--decode-steps 32]

Measures greedy decode tokens/s (batch 16; prefill untimed, then `--decode-steps` steps through the cache each model
makes by default), training step tokens/s (fwd + bwd, batch 8 x 512) and cache bytes per token, and writes
benchmarks/results/modeling_speed.{json,md}. Both models run the same harness; only the model differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from modeling import DeepseekV2ForCausalLM, load_model_config

RESULTS = Path(__file__).resolve().parent / "results"


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode(model, prompt: torch.Tensor, steps: int) -> tuple[float, int]:
    """(tokens/s over `steps` greedy decode steps, cache bytes per token afterwards)."""
    out = model(prompt, use_cache=True)  # each model starts the cache it generates with by default
    cache, logits = out.past_key_values, out.logits[:, -1]
    start = time.perf_counter()
    for _ in range(steps):
        next_tok = logits.argmax(-1, keepdim=True)
        logits = model(next_tok, past_key_values=cache, use_cache=True).logits[:, -1]
    seconds = time.perf_counter() - start
    tokens_cached = prompt.shape[0] * cache.get_seq_length()
    return prompt.shape[0] * steps / seconds, _cache_bytes(cache) // tokens_cached


def train_steps(models: dict, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """tokens/s of one fwd + bwd, the median over `reps`; the models take turns so drift hits both alike."""
    times = {name: [] for name in models}
    for model in models.values():
        model.train()
        model(ids, labels=ids).loss.backward()  # warm-up
    for _ in range(reps):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            times[name].append(time.perf_counter() - start)
    for model in models.values():
        model.eval()
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--contexts", type=int, nargs="*", default=[256, 1024, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--train-shape", type=int, nargs=2, default=[8, 512])
    parser.add_argument("--train-reps", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg = load_model_config(args.model, vocab_size=args.vocab_size, max_position_embeddings=4096)
    ours = DeepseekV2ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        native = transformers.DeepseekV2ForCausalLM.from_pretrained(folder).eval()
    models = {"ours": ours, "transformers": native}
    print(f"model {args.model}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads, fp32")

    rows = []
    for ctx in args.contexts:
        prompt = torch.randint(3, args.vocab_size, (args.batch, ctx))
        row = {"what": f"decode tok/s, batch {args.batch}, context {ctx}"}
        for name, model in models.items():
            row[name], row[f"{name}_cache_bytes_per_token"] = decode(model, prompt, args.decode_steps)
        rows.append(row)
        print(f"{row['what']}: ours {row['ours']:.0f}  transformers {row['transformers']:.0f}  "
              f"ratio {row['ours'] / row['transformers']:.2f}x", flush=True)

    ids = torch.randint(3, args.vocab_size, tuple(args.train_shape))
    row = {"what": f"train fwd+bwd tok/s, batch {args.train_shape[0]} x {args.train_shape[1]}"}
    row.update(train_steps(models, ids, args.train_reps))
    rows.append(row)
    print(f"{row['what']}: ours {row['ours']:.0f}  transformers {row['transformers']:.0f}  "
          f"ratio {row['ours'] / row['transformers']:.2f}x")

    cache = rows[0] if args.contexts else {}
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    print(f"cache bytes/token: ours {cache.get('ours_cache_bytes_per_token')}  transformers "
          f"{cache.get('transformers_cache_bytes_per_token')}  (Table 1: layers x (d_c + d_h^R) x 4 B = {per_token})")

    RESULTS.mkdir(exist_ok=True)
    for row in rows:
        row["ratio"] = row["ours"] / row["transformers"]
    (RESULTS / "modeling_speed.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    lines = ["| measurement | ours | transformers | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['what']} | {r['ours']:.0f} | {r['transformers']:.0f} | {r['ratio']:.2f}x |" for r in rows]
    (RESULTS / "modeling_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
