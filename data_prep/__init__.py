"""Data for DeepSeek-V2 alignment (§4.1): readers for common formats, the generated default mixture, the
chat template and tokenizer, SFT tokenization with packing, deduplication and decontamination."""

from .errors import DataError, SkipReport
from .mixture import Builder, ensure_built, load_spec
from .packing import tokenize_for_sft
from .readers import detect_format, load
from .schema import FEATURES, KINDS
from .tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

__all__ = ["load", "detect_format", "DataError", "SkipReport", "FEATURES", "KINDS", "Builder", "ensure_built", "load_spec",
           "tokenize_for_sft", "CHAT_TEMPLATE", "load_tokenizer", "train_tokenizer"]
