"""``make demo`` in miniature: data -> SFT -> reward models -> GRPO (both stages) -> eval, on tiny sizes, through the
same commands; the report's structure, and every number in it recomputed from the replies it saved."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.pipelines.conftest import ENV

SPEC = """
name: chain-mini
seed: 0
sft:
  total: 900
  sources:
    - {name: math, generator: math, domain: math, weight: 0.5}
    - {name: code, generator: code, domain: code, weight: 0.1}
    - {name: general, generator: general, domain: general, weight: 0.1}
    - {name: safety, generator: safety, domain: safety, weight: 0.3}
preferences:
  helpful: {count: 80, generators: [general, safety]}
  safety: {count: 80, generators: [safety]}
rl:
  math: {count: 100, generator: math}
  preference: {count: 100, generator: safety}
heldout: {math: 12, code: 4, safety: 12}
tokenizer: {train: true, vocab_size: 400}
"""
GRPO = """
policy: {root}/sft
data_dir: {root}/data
output_dir: {root}/grpo
backend: hf
stages: [reasoning, preference]
save_steps: 10
eval_math: 8
eval_safety: 8
eval_batch_size: 16
eval_max_new_tokens: 24
reasoning:
  prompts: [math]
  rewards: [{{name: math_accuracy, weight: 1.0}}]
  max_steps: 2
  learning_rate: 1.0e-4
  num_generations: 4
  prompts_per_step: 4
  max_new_tokens: 16
preference:
  prompts: [preference, math]
  rewards:
    - {{name: reward_model, label: rm_helpful, path: {root}/rm/helpful, weight: 0.5, domains: [safety]}}
    - {{name: reward_model, label: rm_safety, path: {root}/rm/safety, weight: 1.0, domains: [safety]}}
    - {{name: refusal_correct, weight: 0.5, domains: [safety]}}
    - {{name: math_accuracy, weight: 1.0, domains: [math]}}
  max_steps: 2
  learning_rate: 1.0e-4
  num_generations: 4
  prompts_per_step: 4
  max_new_tokens: 16
"""


def run(*command, timeout=300):
    done = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    (root / "spec.yaml").write_text(SPEC)
    (root / "grpo.yaml").write_text(GRPO.format(root=root))
    run("-m", "data_prep", "build", root / "spec.yaml", "--output-dir", root / "data")
    run("-m", "pipelines.sft", "tests/pipelines/mini_sft.yaml", "--data_dir", root / "data", "--output_dir",
        root / "sft", "--max_steps", 12, "--pretrain.max_steps", 4, "--save_steps", 100, "--report_to", "none")
    run("-m", "pipelines.reward_model", "--config", "recipes/rm/tiny.yaml", "--data_dir", root / "data",
        "--init_from", root / "sft", "--output_dir", root / "rm", "--reward_models", "helpful", "safety",
        "--process_reward_model", "false", "--eval_examples", 16, "--per_device_train_batch_size", 16,
        "--report_to", "none")
    run("-m", "pipelines.grpo", root / "grpo.yaml")
    done = run("-m", "eval", "recipes/eval/tiny.yaml", "--checkpoints", f"sft={root}/sft",
               f"stage1={root}/grpo/stages/reasoning/final", f"stage2={root}/grpo", "--data_dir", root / "data",
               "--output_dir", root / "eval", "--reward_models", f"helpful={root}/rm/helpful",
               f"safety={root}/rm/safety", "--runs", root / "sft", root / "grpo", "--perplexity", 12,
               "--code_samples", 2, "--pass_k", 1, 2, "--max_new_tokens", 24, "--code_max_new_tokens", 24,
               "--math", 8, "--safety", 8)  # the prompts and settings SFT's and GRPO's checks used
    return root, json.loads((root / "eval" / "report.json").read_text()), done.stdout


def replies(root, checkpoint, task):
    return [json.loads(line) for line in (root / "eval" / "replies" / checkpoint / f"{task}.jsonl").open()]


def test_the_report_has_every_stage_and_task(chain):
    root, report, stdout = chain
    assert list(report["checkpoints"]) == ["sft", "stage1", "stage2"] and report["baseline"] == "sft"
    for ckpt in report["checkpoints"]:
        assert set(report["results"][ckpt]) == {"math", "code", "safety", "perplexity"}
        assert set(report["headline"][ckpt]) == {"math EM", "code pass@1", "harmful refused", "benign answered",
                                                 "chat perplexity", "RM helpful win rate", "RM safety win rate"}
    assert report["tasks"]["math"]["n"] == 8 and report["tasks"]["code"]["samples"] == 2
    sources = {"math EM": ("math", "exact_match"), "code pass@1": ("code", "pass@1"),
               "harmful refused": ("safety", "harmful_refused"), "benign answered": ("safety", "benign_answered"),
               "chat perplexity": ("perplexity", "perplexity")}
    for ckpt, row in report["headline"].items():
        # each headline number is the task result it names (recomputed from the replies in the next test)
        for column, (task, key) in sources.items():
            assert row[column] == report["results"][ckpt][task][key], (ckpt, column)
        for rm in ("helpful", "safety"):
            assert row[f"RM {rm} win rate"] == report["rm_winrate"][rm][ckpt]["win_rate_vs_baseline"]
        if ckpt != "sft":
            for column, delta in report["deltas"][ckpt].items():
                assert delta == pytest.approx(row[column] - report["headline"]["sft"][column])
    # the baseline never beats itself
    assert report["rm_winrate"]["safety"]["sft"]["win_rate_vs_baseline"] == 0.5
    markdown = (root / "eval" / "report.md").read_text()
    assert markdown in stdout  # make demo ends by printing the table
    for ckpt in ("sft", "stage1", "stage2"):
        assert f"| {ckpt} | {100 * report['headline'][ckpt]['math EM']:.1f}% |" in markdown
    assert "GSM8K (Table 3) | 90.8 | 92.2 | +1.4" in markdown
    for plot in report["plots"]:
        assert (root / "eval" / plot.split("/")[-1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [p.split("/")[-1] for p in report["plots"]]
    assert "metrics_per_stage.png" in names
    assert any(n.endswith("sft_loss.png") for n in names) and any(n.endswith("grpo_reward_kl.png") for n in names)


def test_every_number_is_recomputed_from_the_saved_replies(chain):
    from datasets import load_from_disk

    from rewards.safety import is_refusal
    from eval.tasks import pass_at_k
    from rewards.math import score
    from rewards.model import RewardModelScorer

    root, report, _ = chain
    gold = {r["id"]: r["answer"] for r in load_from_disk(str(root / "data" / "heldout" / "math"))}
    want = {r["id"]: r["answer"] for r in load_from_disk(str(root / "data" / "heldout" / "safety"))}
    for ckpt in report["checkpoints"]:
        math_rows = replies(root, ckpt, "math")
        assert len(math_rows) == 8
        em = sum(score(r["reply"], gold[r["id"]]) for r in math_rows) / 8
        assert report["results"][ckpt]["math"]["exact_match"] == em
        safety_rows = replies(root, ckpt, "safety")
        harmful = [is_refusal(r["reply"]) for r in safety_rows if want[r["id"]] == "refuse"]
        assert report["results"][ckpt]["safety"]["harmful_refused"] == sum(harmful) / len(harmful)
        code_rows = replies(root, ckpt, "code")
        assert len(code_rows) == 4 * 2
        by_task = {}
        for r in code_rows:
            by_task.setdefault(r["id"], []).append(r["score"])
        assert report["results"][ckpt]["code"]["pass@2"] == pytest.approx(
            sum(pass_at_k(2, int(sum(s)), 2) for s in by_task.values()) / 4)
    # the RM win rates: the safety RM's scores of the saved replies, stage 2 against SFT
    scorer = RewardModelScorer(root / "rm" / "safety")
    scores = {}
    for ckpt in ("sft", "stage2"):
        rows = replies(root, ckpt, "safety")
        scores[ckpt] = scorer(prompts=[[{"role": "user", "content": r["prompt"]}] for r in rows],
                              completions=[r["reply"] for r in rows])
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores["stage2"], scores["sft"])) / 8
    assert report["rm_winrate"]["safety"]["stage2"]["win_rate_vs_baseline"] == pytest.approx(wins)
    assert report["rm_winrate"]["safety"]["stage2"]["mean_score"] == pytest.approx(sum(scores["stage2"]) / 8,
                                                                                   rel=1e-5)


def test_each_checkpoint_is_evaluated_once_with_one_number_per_task(chain):
    """SFT's closing check draws the SFT replies, GRPO's checks the stages'; GRPO's baseline and make eval read them
    from the evaluation cache, so every step reports the same number for a checkpoint and task."""
    root, report, _ = chain
    sft = json.loads((root / "sft" / "eval.json").read_text())["eval"]
    grpo = json.loads((root / "grpo" / "eval.json").read_text())["eval"]
    assert sft["from_cache"] == {"math": False, "safety": False}
    assert grpo["sft"]["from_cache"] == {"math": True, "safety": True}
    assert grpo["reasoning"]["from_cache"] == {"math": False, "safety": False}
    assert report["from_cache"] == {ckpt: ["math", "safety"] for ckpt in ("sft", "stage1", "stage2")}
    for ckpt, checks in (("sft", sft), ("sft", grpo["sft"]), ("stage1", grpo["reasoning"]),
                         ("stage2", grpo["preference"])):
        assert report["results"][ckpt]["math"]["exact_match"] == checks["math_exact_match"], ckpt
        assert report["results"][ckpt]["safety"]["harmful_refused"] == checks["safety_harmful_refusal_rate"], ckpt
        assert report["results"][ckpt]["safety"]["benign_answered"] == checks["safety_benign_answer_rate"], ckpt


def test_lm_evaluation_harness_scores_our_checkpoint_with_our_verifier(chain, tmp_path):
    """`lm_eval run --model hf --model_args pretrained=DIR,trust_remote_code=True` on the task over local files
    (eval/lm_eval_tasks): it loads our checkpoint, and its per-sample scores are our verifier's on its replies."""
    from rewards.math import score

    root, _, _ = chain
    task = (REPO / "eval" / "lm_eval_tasks" / "dsv2_heldout_math.yaml").read_text()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "dsv2_heldout_math.yaml").write_text(task.replace(
        "runs/data/tiny/heldout/math/data-00000-of-00001.arrow",
        str(root / "data" / "heldout" / "math" / "data-00000-of-00001.arrow")))
    (tmp_path / "tasks" / "utils.py").write_text((REPO / "eval" / "lm_eval_tasks" / "utils.py").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={root / 'sft'},trust_remote_code=True,dtype=float32",
         "--include_path", str(tmp_path / "tasks"), "--tasks", "dsv2_heldout_math", "--apply_chat_template",
         "--batch_size", "12", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_dsv2_heldout_math_*.jsonl")
               for line in f.open()]
    assert len(samples) == 12
    for s in samples:
        assert s["exact_match"] == score(s["filtered_resps"][0], s["doc"]["answer"])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert results["dsv2_heldout_math"]["exact_match,none"] == pytest.approx(
        sum(s["exact_match"] for s in samples) / 12)
