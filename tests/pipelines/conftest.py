"""Shared pieces of the pipeline tests: the miniature mixture (built once per session) and SFT launches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent
MINI_RECIPE = HERE / "mini_sft.yaml"
MINI_MODEL = HERE / "mini_model.yaml"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    from data_prep import Builder, load_spec

    out = tmp_path_factory.mktemp("mini_data")
    Builder(load_spec(HERE / "mini_data.yaml"), out).build()
    return out


def sft_command(data_dir, output_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "pipelines.sft", str(MINI_RECIPE), "--data_dir", str(data_dir),
            "--output_dir", str(output_dir), *overrides]


def run(command, timeout=240) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done
