"""The latent cache (c_KV + RoPE key only, paper Table 1) and decoding by weight absorption."""

import pytest
import torch
from transformers import DynamicCache

from modeling import DeepseekV2ForCausalLM
from modeling.modeling_deepseek_v2 import DeepseekV2LatentCache
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(tiny_config(q_lora_rank=64)).eval()


def _decode_step_by_step(model, ids, attention_mask, prefix, cache=None):
    """Prefill ``prefix`` tokens, then one token at a time. ``cache=None``: the cache the model makes itself."""
    first = model(ids[:, :prefix], attention_mask=attention_mask[:, :prefix], past_key_values=cache, use_cache=True)
    cache, logits = first.past_key_values, [first.logits]
    for t in range(prefix, ids.shape[1]):
        step = model(ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1], past_key_values=cache,
                     use_cache=True)
        logits.append(step.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("cache_kind", ["latent (default)", "DynamicCache (user-supplied)"])
@torch.no_grad()
def test_incremental_decoding_matches_a_full_forward(model, cache_kind):
    ids = torch.randint(3, 300, (3, 300))  # past CACHE_SLACK_TOKENS, so the latent cache regrows once
    mask = torch.ones_like(ids)
    cache = DynamicCache() if cache_kind.startswith("Dynamic") else None
    step_logits, cache = _decode_step_by_step(model, ids, mask, prefix=9, cache=cache)
    assert type(cache) is (DynamicCache if cache_kind.startswith("Dynamic") else DeepseekV2LatentCache)
    assert (step_logits - model(ids).logits).abs().max().item() <= 1e-4


@torch.no_grad()
def test_left_padded_batch_decodes_like_each_row_alone(model):
    lengths, total = [30, 21, 12], 30
    rows = [torch.randint(3, 300, (n,)) for n in lengths]
    ids = torch.stack([torch.cat([torch.full((total - len(r),), 2), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(total - len(r)), torch.ones(len(r))]) for r in rows]).long()
    step_logits, _ = _decode_step_by_step(model, ids, mask, prefix=20)
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        got = step_logits[i, total - len(row) :]
        assert (got - alone).abs().max().item() <= 1e-4


@torch.no_grad()
def test_cache_holds_only_the_latent_and_the_rope_key(model):
    cfg = model.config
    batch, n = 2, 37
    _, cache = _decode_step_by_step(model, torch.randint(3, 300, (batch, n)), torch.ones(batch, n).long(), 5)
    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32
    assert nbytes == batch * n * per_token


@torch.no_grad()
def test_decode_steps_never_expand_the_cache(model):
    rows_expanded = []
    hooks = [layer.self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: rows_expanded.append(i[0].shape[-2]))
             for layer in model.model.layers]
    try:
        model.generate(torch.randint(3, 300, (2, 16)), max_new_tokens=10, do_sample=False, pad_token_id=2)
    finally:
        for h in hooks:
            h.remove()
    # kv_b_proj runs once per layer, on the 16 prompt tokens (prefill); decode steps attend over the latent.
    assert rows_expanded == [16] * model.config.num_hidden_layers


@torch.no_grad()
def test_generate_uses_the_latent_cache(model):
    out = model.generate(torch.randint(3, 300, (2, 8)), max_new_tokens=4, do_sample=False, pad_token_id=2,
                         return_dict_in_generate=True)
    assert type(out.past_key_values) is DeepseekV2LatentCache


@torch.no_grad()
def test_generate_greedy_and_sampling(model):
    prompt = torch.randint(3, 300, (4, 8))
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    again = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert greedy.shape == (4, 20) and torch.equal(greedy, again)
    torch.manual_seed(1)
    sampled = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95,
                             pad_token_id=2, eos_token_id=None)
    assert sampled.shape == (4, 20) and not torch.equal(sampled, greedy)
