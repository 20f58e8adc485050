import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides):
    """The shipped ``tiny`` model config with a small vocabulary, plus overrides."""
    from modeling import load_model_config

    return load_model_config("tiny", **{"vocab_size": 300, **overrides})
