"""Shipped model configs: the paper's sizes, vLLM's constraints on `tiny`, and clear errors on bad fields."""

import pytest

from modeling import DeepseekV2Config, count_parameters, load_model_config

# (config, total B, activated B, relative tolerance). The paper prints 2.4B for V2-Lite; we count 2.45B
# (every weight a token computes with, the input embedding lookup excluded), 2.1% above the printed figure.
PAPER_SIZES = [("deepseek-v2", 236, 21, 0.02), ("deepseek-v2-lite", 15.7, 2.4, 0.025)]


@pytest.mark.parametrize("name,total,active,tol", PAPER_SIZES)
def test_parameter_counts_match_the_paper(name, total, active, tol):
    got_total, got_active = count_parameters(load_model_config(name))
    assert got_total / 1e9 == pytest.approx(total, rel=0.02)
    assert got_active / 1e9 == pytest.approx(active, rel=tol)


def test_tiny_satisfies_vllm_cpu_mla_constraints():
    cfg = load_model_config("tiny")
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576  # the only shape vLLM's CPU MLA backend accepts
    assert cfg.n_group and cfg.topk_group  # vLLM asserts without them, even for greedy routing
    assert cfg.rms_norm_eps == 1e-6  # vLLM uses it for the latent norms, where the official code uses 1e-6


def test_yarn_fields_are_read_from_the_official_keys():
    cfg = load_model_config("deepseek-v2")
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40 and rope["mscale_all_dim"] == 0.707
    assert rope["rope_theta"] == 10000.0 and cfg.rope_scaling is rope


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(topk_method="noaux_tc"), "topk_method"),
        (dict(n_routed_experts=6, n_group=4, num_experts_per_tok=2), "n_group"),
        (dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy"), "n_group"),
        (dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4,
              topk_group=5), "topk_group"),
        (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
    ],
)
def test_bad_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        DeepseekV2Config(**fields)


def test_unknown_yaml_field_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nhiden_layers: 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*hiden_layers"):
        load_model_config(bad)
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_model_config("no-such-model")
