"""The GPU memory plan: what each launch config splits, for the models the project exists for."""

import pytest

from benchmarks.memory_plan import GIB, plan, table


def test_v2_lite_on_8_gpus_splits_what_each_config_shards():
    ddp = plan("deepseek-v2-lite", 8, "recipes/accelerate/ddp.yaml")
    zero3 = plan("deepseek-v2-lite", 8, "recipes/accelerate/deepspeed_zero3.yaml")
    fsdp = plan("deepseek-v2-lite", 8, "recipes/accelerate/fsdp.yaml")
    total = ddp["parameters"]
    assert total == pytest.approx(15.7e9, rel=0.01)  # the paper's 15.7B
    assert ddp["trainer"]["AdamW state (fp32 master + m + v)"] == 12 * total  # DDP: a whole copy on every GPU
    for sharded in (zero3, fsdp):
        assert sharded["trainer"]["policy weights (bf16)"] == 2 * total / 8
        assert sharded["trainer"]["AdamW state (fp32 master + m + v)"] == 12 * total / 8
    assert "trainer alone fits" in table(zero3, 80)
    assert "trainer alone does not fit" in table(ddp, 80)  # 16 bytes a parameter of 15.7B on one card


def test_the_kv_cache_is_mla_latent_per_token_and_layer():
    result = plan("deepseek-v2-lite", 8, None, vllm_seqs=10, max_len=100)
    (kv,) = [v for k, v in result["vllm"].items() if "KV" in k]
    assert kv == 2 * (512 + 64) * 27 * 100 * 10  # bf16 x (d_c + d_h^R) x layers x tokens
    assert result["vllm"]["vLLM weights (bf16)"] / GIB == pytest.approx(2 * result["parameters"] / GIB)
