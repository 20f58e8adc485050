"""`python -m pipelines.import_gguf` / `make smollm2`: a real pretrained chat model as a plain fp32 checkpoint."""

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.import_gguf import MARKER, ImportGGUFError, convert, ensure_smollm2
from tests.conftest import REPO
from tests.pipelines.conftest import ENV


def test_the_folder_is_an_unquantized_llama(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    # fp32 weights, tied embeddings: 134.5M parameters * 4 bytes, no second copy of the 49152 x 576 head
    assert 530e6 < (smollm2 / "model.safetensors").stat().st_size < 545e6


def test_the_tokenizer_is_chatml_and_pads_with_eos(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_it_knows_the_capital_of_france(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_a_second_run_does_nothing(smollm2):
    marker = smollm2 / MARKER
    before = marker.stat().st_mtime_ns
    start = time.time()
    assert ensure_smollm2(smollm2) == smollm2
    assert time.time() - start < 2
    assert marker.stat().st_mtime_ns == before


def test_a_missing_gguf_is_named(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    done = subprocess.run([sys.executable, "-m", "pipelines.import_gguf", "--gguf", str(missing), "--output_dir",
                           str(tmp_path / "out")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"GGUF file not found: {missing}" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreadable_gguf_is_named_and_leaves_no_folder(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ImportGGUFError, match="cannot read .*garbage.gguf"):
        convert(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.gguf"]
