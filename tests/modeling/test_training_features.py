"""What training needs from the model: gradient checkpointing, attention backends, bf16, PEFT LoRA."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling import DeepseekV2ForCausalLM
from tests.conftest import tiny_config


def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = DeepseekV2ForCausalLM(tiny_config()).train()
    ids = torch.randint(3, 300, (2, 32))
    plain = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _grads(model, ids)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_sdpa_and_eager_attention_agree():
    ids = torch.randint(3, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    model = DeepseekV2ForCausalLM(tiny_config(q_lora_rank=64)).eval()
    logits = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(ids, attention_mask=mask).logits
    assert (logits["sdpa"] - logits["eager"]).abs().max().item() <= 1e-5


def test_bf16_forward_and_backward_track_fp32():
    model = DeepseekV2ForCausalLM(tiny_config())
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    model = model.to(torch.bfloat16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - ref).abs().max().item() < 0.1
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None)


LORA_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def lora_model():
    model = DeepseekV2ForCausalLM(tiny_config())
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))


def test_lora_reaches_attention_and_the_routed_experts(lora_model):
    names = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    for layer in range(1, lora_model.config.num_hidden_layers):  # layer 0 is dense
        assert any(f"layers.{layer}.mlp.experts" in n and "lora_A" in n for n in names), layer
    assert any("self_attn.kv_b_proj.lora_B" in n for n in names)
    ids = torch.randint(3, 300, (4, 32))
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    lora_model.train()
    lora_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    moved = [n for n, p in lora_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)


@torch.no_grad()
def test_decoding_with_lora_on_kv_b_proj_matches_a_full_forward(lora_model):
    """The absorbed decode path must use kv_b_proj's effective (base + adapter) weight."""
    lora_model.eval()
    prompt = torch.randint(3, 300, (2, 10))
    out = lora_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=2,
                              eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    full = lora_model(input_ids=out.sequences).logits[:, 9:-1]
    steps = torch.stack(out.scores, dim=1)
    assert (steps - full).abs().max().item() <= 1e-4
