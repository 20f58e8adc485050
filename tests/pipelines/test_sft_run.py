"""`python -m pipelines.sft` end to end on the miniature recipe: the chat checkpoint it writes, that checkpoint in a
process without this project, a run killed with SIGKILL and started again, and two processes under DDP."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipelines.tracking import final_loss, read_metrics
from tests.conftest import REPO
from tests.pipelines.conftest import ENV, MINI_RECIPE, run, sft_command

KILL_AFTER = "checkpoint-12"  # of the SFT stage's 24 steps: half-way
SAME_LOSS = 1e-4  # the tolerance for a resumed run's final loss


@pytest.fixture(scope="module")
def finished(mini_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "uninterrupted"
    run(sft_command(mini_data, out))
    return out


CHECKPOINT_FILES = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "modeling_deepseek_v2.py", "configuration_deepseek_v2.py",
                    "recipe.yaml", "README.md", "eval.json", "metrics.jsonl", "loss_curve.png"]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_the_run_writes_a_chat_checkpoint(finished, name):
    assert (finished / name).is_file()


def test_the_run_records_both_stages_and_the_balance_loss(finished):
    records = read_metrics(finished / "metrics.jsonl")
    for stage in ("pretrain", "sft"):
        steps = [r for r in records if r["stage"] == stage and "loss" in r]
        assert steps and all(r["aux_loss"] > 0 for r in steps), stage
    sft = [r["loss"] for r in records if r["stage"] == "sft" and "loss" in r]
    assert sum(sft[-4:]) < sum(sft[:4])  # it learned
    assert list(finished.glob("stages/sft/runs/*/events.out.tfevents.*"))  # report_to: tensorboard
    result = json.loads((finished / "eval.json").read_text())
    assert result["eval"]["math_n"] == 8 and result["eval"]["safety_harmful_n"] + result["eval"]["safety_benign_n"] == 8
    card = (finished / "README.md").read_text()
    assert "math exact match" in card and "| sft | assistant replies | 24 |" in card
    # the held-out sets the data build made, each once (heldout/chat repeats their prompts with replies)
    assert "Held-out sets (never trained on; prompts checked for overlap): math 16, safety 16." in card


ALONE = """
import sys
sys.path = [p for p in sys.path if p not in ("", ".") and p.rstrip("/") != {repo!r}]
import importlib.util
assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("modeling") is None
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({ckpt!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({ckpt!r})
text = tokenizer.apply_chat_template([{{"role": "user", "content": "What is 2 + 3?"}}], add_generation_prompt=True,
                                     tokenize=False)
assert text.endswith("User: What is 2 + 3?\\n\\nAssistant:"), text
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8)
print(type(model).__name__, model.generation_config.eos_token_id, out.shape[1] > ids["input_ids"].shape[1])
"""


def test_the_checkpoint_loads_and_chats_without_this_project(finished, tmp_path):
    code = ALONE.format(repo=str(REPO), ckpt=str(finished))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["DeepseekV2ForCausalLM", "1", "True"]


def _wait_for(path, process, timeout=180):
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.01)


def test_a_killed_run_started_again_ends_with_the_same_loss(finished, mini_data, tmp_path):
    out = tmp_path / "killed"
    first = subprocess.Popen(sft_command(mini_data, out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "stages" / "sft" / KILL_AFTER / "trainer_state.json", first)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "stages" / "sft" / "done.json").exists() and (out / "stages" / "pretrain" / "done.json").exists()

    run(sft_command(mini_data, out))
    resumed = json.loads((out / "eval.json").read_text())["stages"]
    assert resumed["pretrain"]["resumed_from"] is None  # done before the kill: not run again
    assert "checkpoint-" in resumed["sft"]["resumed_from"]
    ours = final_loss(read_metrics(out / "metrics.jsonl"), "sft")
    reference = final_loss(read_metrics(finished / "metrics.jsonl"), "sft")
    assert abs(ours - reference) <= SAME_LOSS, (ours, reference)
    a, b = load_file(out / "model.safetensors"), load_file(finished / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_a_different_recipe_in_the_same_folder_is_refused(finished, mini_data):
    done = subprocess.run(sft_command(mini_data, finished, "--learning_rate", "1e-2"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "holds a run of a different recipe (learning_rate" in done.stderr


def test_two_processes_under_ddp(finished, mini_data, tmp_path):
    """DDP over gloo. accelerate 1.15 starts several CPU processes only through mpirun (`--cpu --num_processes 2`
    without it silently starts one); `--multi_gpu` starts them through torch.distributed.run, and with the recipe's
    `use_cpu` they form a gloo group."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "pipelines.sft", str(MINI_RECIPE), "--data_dir", str(mini_data), "--output_dir", str(out)]
    run(launch, timeout=300)
    assert (out / "model.safetensors").is_file() and (out / "eval.json").is_file()
    records = read_metrics(out / "metrics.jsonl")
    sft = [r for r in records if r["stage"] == "sft" and "loss" in r]
    single = [r for r in read_metrics(finished / "metrics.jsonl") if r["stage"] == "sft" and "loss" in r]
    assert len(sft) == 24  # one process logs
    assert sum(r["loss"] for r in sft[-4:]) < sum(r["loss"] for r in sft[:4])  # it learned
    # two ranks: each step read twice the rows of a one-process step
    assert sft[-1]["epoch"] == pytest.approx(2 * single[-1]["epoch"], rel=0.05)
    assert sft[-1]["num_tokens"] == pytest.approx(2 * single[-1]["num_tokens"], rel=0.1)
    assert torch.isfinite(torch.tensor([r["aux_loss"] for r in sft])).all()


def test_pretrain_domains_the_data_lacks_are_refused_before_training(mini_data, tmp_path):
    """A typo or a YAML list given as one string names the missing domains instead of training on the wrong rows."""
    out = tmp_path / "typo"
    done = subprocess.run(sft_command(mini_data, out, "--pretrain_domains", "[math, code]"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "pretrain_domains: ['[math, code]'] not in the data's domains" in done.stderr
    assert not list(out.glob("stages/*/checkpoint-*"))
