"""GRPO's GPU memory on paper: per-GPU bytes of each thing a run holds, from the model built on the meta device.

    python -m benchmarks.memory_plan deepseek-v2-lite --gpus 8 --gpu_gb 80 recipes/accelerate/deepspeed_zero3.yaml
    python -m benchmarks.memory_plan deepseek-v2 --gpus 64 --gpu_gb 80 recipes/accelerate/fsdp.yaml

What it counts (bf16 mixed precision, as the accelerate configs set it; AdamW):
  * policy weights (bf16), gradients (bf16), optimizer state (fp32 master + 2 moments = 12 bytes a parameter),
    divided over the GPUs as the accelerate config shards them: DDP nothing, ZeRO-1 the optimizer, ZeRO-2 + the
    gradients, ZeRO-3 and FSDP everything;
  * the reference policy (bf16, frozen; sharded like the weights; none with LoRA or β = 0);
  * vLLM: its copy of the weights (bf16, split over ``--vllm_tp`` GPUs) and its KV cache for ``--vllm_seqs``
    sequences of ``--max_len`` tokens; MLA caches one latent of kv_lora_rank + qk_rope_head_dim values per token
    and layer (the latent is not split by tensor parallelism);
  * not counted: activations (they depend on the micro-batch and on gradient checkpointing), the CUDA context and
    allocator slack (budget ~5-10% of the card), NCCL buffers.
Colocated (``backend: vllm``): the trainer's and vLLM's rows share each GPU. A server: vLLM has its own GPUs.
GRPO shards with ``fsdp: true`` (FSDP2, the split recipes/accelerate/fsdp.yaml describes here); ZeRO-3 is not built for
it. It keeps the policy in fp32 (4 + 4 bytes of weights and gradients + 8 of moments: the same 16 a parameter as the
rows below) and an fp32 reference (twice the bf16 row), and a whole fp32 copy in host memory for the sampler (on
the main process only with a vLLM server).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

GIB = 1024 ** 3


def sharding(accelerate_config: str | None) -> tuple[str, set[str]]:
    """(a name, which of weights / grads / optimizer the launch config splits over the GPUs)."""
    if not accelerate_config:
        return "DDP", set()
    config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    kind = config.get("distributed_type", "NO")
    if kind == "FSDP":
        return "FSDP", {"weights", "grads", "optimizer"}
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        split = {1: {"optimizer"}, 2: {"optimizer", "grads"}, 3: {"optimizer", "grads", "weights"}}.get(stage, set())
        return f"ZeRO-{stage}", split
    return "DDP", set()


def plan(model: str, gpus: int, accelerate_config: str | None = None, vllm_tp: int = 1, vllm_seqs: int = 256,
         max_len: int = 2048, reference: bool = True) -> dict:
    """Per-GPU bytes, by item, for the trainer and for one vLLM engine."""
    from modeling import load_model_config
    from modeling.params import count_parameters

    config = load_model_config(model)
    total, active = count_parameters(config)
    name, split = sharding(accelerate_config)

    def per_gpu(bytes_, what):
        return bytes_ / gpus if what in split else bytes_

    trainer = {"policy weights (bf16)": per_gpu(2 * total, "weights"),
               "gradients (bf16)": per_gpu(2 * total, "grads"),
               "AdamW state (fp32 master + m + v)": per_gpu(12 * total, "optimizer")}
    if reference:
        trainer["reference (bf16)"] = per_gpu(2 * total, "weights")
    latent = config.kv_lora_rank + config.qk_rope_head_dim if config.kv_lora_rank else (
        2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads))
    vllm = {"vLLM weights (bf16)": 2 * total / vllm_tp,
            f"vLLM KV cache ({vllm_seqs} seqs x {max_len} tokens)": 2 * latent * config.num_hidden_layers
            * max_len * vllm_seqs}
    return {"model": model, "parameters": total, "activated": active, "gpus": gpus, "sharding": name,
            "trainer": trainer, "vllm": vllm}


def table(result: dict, gpu_gb: float) -> str:
    lines = [f"### {result['model']}: {result['parameters'] / 1e9:.1f}B parameters ({result['activated'] / 1e9:.2f}B "
             f"activated), {result['gpus']} GPUs, {result['sharding']}", "",
             "| per GPU | GiB |", "|---|---:|"]
    for item, value in {**result["trainer"]}.items():
        lines.append(f"| {item} | {value / GIB:.1f} |")
    trainer = sum(result["trainer"].values())
    lines.append(f"| **trainer total** | **{trainer / GIB:.1f}** |")
    for item, value in result["vllm"].items():
        lines.append(f"| {item} | {value / GIB:.1f} |")
    engine = sum(result["vllm"].values())
    lines.append(f"| **vLLM total** | **{engine / GIB:.1f}** |")
    verdict = lambda used: "fits" if used <= 0.9 * gpu_gb * GIB else "does not fit"  # noqa: E731
    lines += ["", f"On {gpu_gb:g} GiB cards (90% usable, activations not counted): trainer alone "
                  f"{verdict(trainer)}; colocated trainer + vLLM {(trainer + engine) / GIB:.1f} GiB "
                  f"{verdict(trainer + engine)}; a vLLM server on its own GPUs {verdict(engine)}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="tiny, deepseek-v2-lite, deepseek-v2, a YAML of config fields or a checkpoint")
    p.add_argument("accelerate_config", nargs="?", help="recipes/accelerate/*.yaml (default: DDP, nothing split)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu_gb", type=float, default=80, help="memory per GPU, GiB")
    p.add_argument("--vllm_tp", type=int, default=1, help="tensor-parallel GPUs of the vLLM engine")
    p.add_argument("--vllm_seqs", type=int, default=256, help="sequences in flight (prompts x G in one batch)")
    p.add_argument("--max_len", type=int, default=2048, help="prompt + completion tokens")
    p.add_argument("--no_reference", action="store_true", help="β = 0 or LoRA: no reference copy")
    args = p.parse_intermixed_args(argv)  # the config may come after the options, as in the examples above
    result = plan(args.model, args.gpus, args.accelerate_config, args.vllm_tp, args.vllm_seqs, args.max_len,
                  not args.no_reference)
    print(table(result, args.gpu_gb))


if __name__ == "__main__":
    main()
