"""Ours against transformers' own DeepseekV2 on identical weights (our checkpoint loaded by their class)."""

import pytest
import torch
import transformers

from modeling import DeepseekV2ForCausalLM
from tests.conftest import tiny_config

YARN = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "plain-q-greedy": dict(),
    "q-lora": dict(q_lora_rank=96),
    "group-limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
                          routed_scaling_factor=2.5),
    "yarn": dict(rope_scaling=YARN, max_position_embeddings=512, q_lora_rank=64),
    "dense-first-2": dict(first_k_dense_replace=2, n_shared_experts=2),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ours = DeepseekV2ForCausalLM(tiny_config(**CONFIGS[request.param])).eval()
    path = tmp_path_factory.mktemp(request.param)
    ours.save_pretrained(path)
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(path).eval()
    return ours, theirs


def test_logits_match_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(3, 300, (2, 96))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_tokens_match_transformers(pair):
    ours, theirs = pair
    prompt = torch.randint(3, 300, (2, 12))
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=2, eos_token_id=None,
                  attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        assert ours.generate(prompt, **kwargs).tolist() == theirs.generate(prompt, **kwargs).tolist()
