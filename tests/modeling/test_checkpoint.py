"""Checkpoints: official DeepSeek-V2 names on disk, save/load round trips, loading without our code."""

import json
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling import DeepseekV2ForCausalLM, DeepseekV2ForSequenceClassification
from tests.conftest import REPO, tiny_config


def official_names(cfg):
    """Parameter names of the official deepseek-ai/DeepSeek-V2 checkpoints (their modeling_deepseek.py)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        attn = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
        attn += ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
        names += [f"{p}self_attn.{n}.weight" for n in attn]
        mlp = ["gate_proj", "up_proj", "down_proj"]
        if i >= cfg.first_k_dense_replace:
            names.append(p + "mlp.gate.weight")
            names += [f"{p}mlp.experts.{e}.{n}.weight" for e in range(cfg.n_routed_experts) for n in mlp]
            names += [f"{p}mlp.shared_experts.{n}.weight" for n in mlp]
        else:
            names += [f"{p}mlp.{n}.weight" for n in mlp]
    return sorted(names)


def test_saved_checkpoints_use_the_official_names(tmp_path):
    for i, cfg in enumerate((tiny_config(), tiny_config(q_lora_rank=64, first_k_dense_replace=2))):
        DeepseekV2ForCausalLM(cfg).save_pretrained(tmp_path / str(i))
        with safe_open(tmp_path / str(i) / "model.safetensors", "pt") as f:
            assert sorted(f.keys()) == official_names(cfg)


def test_an_official_layout_checkpoint_loads_with_nothing_missing_or_unexpected(tmp_path):
    cfg = tiny_config(q_lora_rank=64)
    shapes = {}  # official name -> shape, from the official modeling code's module sizes
    for name in official_names(cfg):
        if ".experts." in name:
            inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
            shapes[name] = (hidden, inter) if name.endswith("down_proj.weight") else (inter, hidden)
    ref = DeepseekV2ForCausalLM(cfg).state_dict()
    tensors = {n: torch.randn(shapes[n] if n in shapes else ref[n].shape) for n in official_names(cfg)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(tmp_path)
    model, info = DeepseekV2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[3, : cfg.moe_intermediate_size],
                       tensors["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(experts.gate_up_proj[3, cfg.moe_intermediate_size :],
                       tensors["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert torch.equal(experts.down_proj[5], tensors["model.layers.1.mlp.experts.5.down_proj.weight"])
    for name, value in loaded.items():
        if ".experts." not in name:
            assert torch.equal(value, tensors[name]), name


def test_save_and_load_round_trip(tmp_path):
    model = DeepseekV2ForCausalLM(tiny_config(q_lora_rank=64)).eval()
    model.save_pretrained(tmp_path)
    loaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():  # same weights; loaded tensors may sit at other alignments, hence not bit-equal
        assert (model(ids).logits - loaded(ids).logits).abs().max().item() <= 1e-6
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert (tmp_path / "modeling_deepseek_v2.py").exists() and (tmp_path / "configuration_deepseek_v2.py").exists()


ALONE = """
import sys
sys.path = [p for p in sys.path if p not in ("", ".") and p.rstrip("/") != {repo!r}]
import importlib.util
assert importlib.util.find_spec("modeling") is None, "the project is still importable"
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
ids, want_lm, want_rm = torch.load({ref!r})
lm = AutoModelForCausalLM.from_pretrained({lm!r}, trust_remote_code=True).eval()
rm = AutoModelForSequenceClassification.from_pretrained({rm!r}, trust_remote_code=True).eval()
with torch.no_grad():
    print((lm(ids).logits - want_lm).abs().max().item(), (rm(ids).logits - want_rm).abs().max().item())
"""


def test_checkpoint_loads_by_trust_remote_code_without_this_project(tmp_path):
    cfg = tiny_config()
    lm = DeepseekV2ForCausalLM(cfg).eval()
    rm = DeepseekV2ForSequenceClassification(tiny_config(num_labels=1)).eval()
    lm.save_pretrained(tmp_path / "lm")
    rm.save_pretrained(tmp_path / "rm")
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        torch.save((ids, lm(ids).logits, rm(ids).logits), tmp_path / "ref.pt")
    code = ALONE.format(repo=str(REPO), ref=str(tmp_path / "ref.pt"), lm=str(tmp_path / "lm"), rm=str(tmp_path / "rm"))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lm_diff, rm_diff = map(float, run.stdout.split())
    assert lm_diff <= 1e-6 and rm_diff <= 1e-6


def test_reward_head_reads_the_last_real_token_under_any_padding():
    model = DeepseekV2ForSequenceClassification(tiny_config(num_labels=1)).eval()
    row = torch.randint(3, 300, (1, 10))
    pad = torch.full((1, 4), 2)
    with torch.no_grad():
        alone = model(row).logits
        right = model(torch.cat([row, pad], 1), attention_mask=torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1))
        left = model(torch.cat([pad, row], 1), attention_mask=torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], 1))
    assert torch.allclose(right.logits, alone, atol=1e-5) and torch.allclose(left.logits, alone, atol=1e-5)
