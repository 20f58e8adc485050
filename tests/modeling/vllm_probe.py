"""Run as a script by test_vllm.py: score a fixed sequence and greedy-decode with our vLLM engine settings.

Usage: python vllm_probe.py CHECKPOINT_DIR   (reads probe_ids.json there, writes vllm_out.json)
"""

import json
import sys
from pathlib import Path

from pipelines.vllm_engine import make_llm

PREFIX, NEW_TOKENS = 16, 32

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    ids = json.loads((folder / "probe_ids.json").read_text())
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = make_llm(str(folder), skip_tokenizer_init=True, max_model_len=512, seed=0)
    scored = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                          SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False))[0]
    prompt_lp = [next(iter(d.values())).logprob for d in scored.prompt_logprobs[1:]]
    decoded = llm.generate([TokensPrompt(prompt_token_ids=ids[:PREFIX])],
                           SamplingParams(max_tokens=NEW_TOKENS, logprobs=0, temperature=0.0, detokenize=False,
                                          ignore_eos=True))[0].outputs[0]
    tokens = list(decoded.token_ids)
    decode_lp = [step[t].logprob for step, t in zip(decoded.logprobs, tokens)]
    (folder / "vllm_out.json").write_text(json.dumps({"prompt_lp": prompt_lp, "tokens": tokens,
                                                      "decode_lp": decode_lp}))
