"""The one place pipelines, eval and chat load models and tokenizers: any Hugging Face causal LM, ours by default.

Everything goes through transformers' Auto classes. Importing this module imports ``modeling``, which registers our
DeepSeek-V2 for ``model_type == "deepseek_v2"``, so our checkpoints load as our classes (latent-cache decoding,
balance loss) and every other architecture the pinned transformers knows (Llama, Qwen2, Mistral, ...) loads as
itself: a Llama in, a Llama out. ``trust_remote_code`` is passed through to every loader (vLLM included, see
``pipelines/vllm_engine.py``), never switched on behind the user's back.

What a foreign checkpoint needs and TRL / verl users expect (verl's ``hf_model.yaml`` has the same few knobs):
  * the tokenizer and chat template come from the checkpoint; without a template, an error names the folder and
    the recipe field that sets one (TRL's ``chat_template_path``: ``chatml``, ``deepseek``, a ``.jinja`` file or
    the template text itself); without a pad token, EOS is used and logged. When pad = EOS (SmolLM2, Llama 3), masks must come
    from positions and lengths, never from ``ids != pad_id``, or the EOS that ends each reply is never trained
    (TRL #4970); ``data_prep.packing`` and ``grpo_loss.sequence_logprobs`` build theirs that way.
  * a folder that is not a model, a reward model given where a policy is wanted, and a tokenizer with more tokens
    than the model has embeddings are errors that name the folder and the fix, before anything trains.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import modeling  # noqa: F401  (registers our DeepSeek-V2 with the Auto classes)
from data_prep.tokenizer import CHAT_TEMPLATE as DEEPSEEK_TEMPLATE
from rewards.model import is_local_path

logger = logging.getLogger("models")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "deepseek": DEEPSEEK_TEMPLATE}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_config.json")


class ModelLoadError(ValueError):
    """A checkpoint or tokenizer that cannot be used as asked; the message names the folder and the fix."""


def _config(path, trust_remote_code: bool, what: str):
    """The checkpoint's config, after checking that ``path`` is a model folder (or a hub id)."""
    folder = Path(path)
    if is_local_path(path):
        if not folder.is_dir():
            raise ModelLoadError(f"{what} {path}: no such folder (make sft writes runs/sft/tiny; make smollm2 writes "
                                 "runs/models/smollm2-135m-instruct)")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{what} {path}: not a model folder (no config.json). Give a folder written by "
                                 "save_pretrained, or convert a GGUF file first: python -m pipelines.import_gguf "
                                 "--gguf FILE --output_dir DIR")
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise ModelLoadError(f"{what} {path}: config.json but no weights (model.safetensors or "
                                 "pytorch_model.bin); was the save interrupted?")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as e:  # unknown model_type, or remote code not trusted
        raise ModelLoadError(f"{what} {path}: transformers cannot read its config ({e}). If the checkpoint ships its "
                             "own modeling code, set trust_remote_code: true in the recipe") from e


def chat_template_text(value: str) -> str:
    """A recipe's ``chat_template_path``: a shipped name, a ``.jinja`` file, or the template itself."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ModelLoadError(f"chat_template_path {value!r}: not one of {sorted(CHAT_TEMPLATES)}, not a file, and not "
                             "template text")
    return path.read_text()


def load_tokenizer(path, chat_template: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's tokenizer with its chat template (``chat_template`` replaces it); pad = EOS if it has none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"tokenizer {path}: cannot be loaded ({e}); a model folder needs its tokenizer files "
                             "(tokenizer.json or tokenizer.model) beside the weights") from e
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"tokenizer {path}: no chat template, so conversations cannot be rendered. Set one in "
                             f"the recipe: chat_template_path: chatml (or one of {sorted(CHAT_TEMPLATES)}, a .jinja "
                             "file, or the template text); on the command line --chat_template_path chatml")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer %s has no pad token: using EOS %r (masks come from lengths, so EOS is still trained)",
                    path, tokenizer.eos_token)
    return tokenizer


def check_vocabulary(model, tokenizer, where) -> None:
    """Every token id the tokenizer can produce must have an embedding row: an error otherwise, never a silent
    truncation (ids past the table would index out of range, or be clamped by some kernels)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows. Use the "
            "model's own tokenizer (drop tokenizer_path), or resize and save the model first: "
            "model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(DIR)")


def _architectures(config) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def load_causal_lm(path, dtype: str | torch.dtype | None = "float32", trust_remote_code: bool = False,
                   tokenizer=None, what: str = "policy", **kwargs):
    """A causal LM from a checkpoint folder (or hub id), checked against ``tokenizer`` when given."""
    config = _config(path, trust_remote_code, what)
    classifiers = [a for a in _architectures(config) if a.endswith("ForSequenceClassification")]
    if classifiers:
        raise ModelLoadError(f"{what} {path}: a sequence-classification checkpoint ({classifiers[0]}, a reward model) "
                             "where a causal LM is needed. Give the SFT checkpoint (or any causal LM folder) here; "
                             "reward models go in a stage's rewards: [{name: reward_model, path: ...}]")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{what} {path}: not a causal LM transformers can load ({e})") from e
    if tokenizer is not None:
        check_vocabulary(model, tokenizer, f"{what} {path}")
    return model


def load_sequence_classifier(path, dtype: str | torch.dtype | None = "float32", trust_remote_code: bool = False,
                             tokenizer=None, what: str = "reward model", **kwargs):
    """A scalar-head model (``num_labels=1``) from a reward-model checkpoint, or a fresh head on a causal LM's trunk
    (the paper initialises its reward models from the SFT model)."""
    _config(path, trust_remote_code, what)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{what} {path}: transformers has no sequence-classification class for this "
                             f"architecture ({e})") from e
    if tokenizer is not None:
        check_vocabulary(model, tokenizer, f"{what} {path}")
        if model.config.pad_token_id is None:  # the head reads the last non-pad token: it must know pad
            model.config.pad_token_id = tokenizer.pad_token_id
    return model


def native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (an avx512_bf16 or amx_bf16 flag); None where unknown (not Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def warn_if_bf16_is_emulated(bf16: bool) -> None:
    """bf16 autocast on a CPU without native bf16 (no AVX512-BF16 / AMX) runs emulated: a warning with the fix.
    Measured on an AVX2-only host: the tiny SimPO reward model took 603 s in bf16 and 26 s in fp32."""
    if bf16 and not torch.cuda.is_available() and native_bf16() is False:
        logger.warning("bf16 is on but this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag): autocast "
                       "runs emulated and training is ~20x slower than fp32 here; pass --bf16 false")


def model_type(path) -> str | None:
    """``model_type`` of a checkpoint folder (None when it has no readable config.json)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


@dataclass
class LoraArguments:
    """LoRA for the reward-model and GRPO pipelines, under TRL's ``ModelConfig`` field names (SFT uses TRL's own)."""

    use_peft: bool = field(default=False, metadata={
        "help": "train LoRA adapters on the frozen model; the saved checkpoint is the merged model, the adapter "
                "beside it under adapter/ (GRPO: the reference is the policy with its adapters disabled)"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "none: all linear layers"})

    def lora_config(self, task_type: str):
        """peft's config; a classifier's fresh score head (``SEQ_CLS``) trains in full."""
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          task_type=task_type, target_modules=self.lora_target_modules or "all-linear",
                          modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
