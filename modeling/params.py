"""Model configs from ``recipes/models/*.yaml`` and parameter counts (total and activated per token)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .configuration_deepseek_v2 import DeepseekV2Config

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "models"


def load_model_config(name_or_path: str | Path, **overrides) -> DeepseekV2Config:
    """A config from a shipped name (``tiny``, ``deepseek-v2-lite``, ``deepseek-v2``), a YAML file, or a
    checkpoint folder / ``config.json``."""
    path = Path(name_or_path)
    if not path.exists():
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"model config {name_or_path!r}: no such file, and not one of {shipped}")
    if path.is_dir() or path.suffix == ".json":
        return DeepseekV2Config.from_pretrained(path, **overrides)
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    known = set(DeepseekV2Config.__dataclass_fields__) | {"rope_theta", "rope_scaling"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown DeepseekV2Config field(s) {unknown}")
    return DeepseekV2Config(**{**values, **overrides})


def count_parameters(config: DeepseekV2Config) -> tuple[int, int]:
    """(total, activated per token) parameters, built on the meta device so any size is free to count.

    Activated counts what a token computes with: every weight except the routed experts it was not sent to
    (``n_routed_experts - num_experts_per_tok`` per MoE layer) and the input embedding table (a row lookup).
    This gives 235.7B / 20.9B for DeepSeek-V2 (paper: 236B / 21B) and 15.7B / 2.45B for V2-Lite (2.4B)."""
    from .modeling_deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV2MoE

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = model.get_input_embeddings().weight.numel()
    for module in model.modules():
        if isinstance(module, DeepseekV2MoE):
            per_expert = sum(p[0].numel() for p in module.experts.parameters())
            inactive += per_expert * (module.experts.num_experts - module.top_k)
    return total, total - inactive
