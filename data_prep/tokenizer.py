"""The default tokenizer: byte-level BPE trained locally with ``tokenizers``, and DeepSeek-V2's chat template.

Numbers are split into single digits, as DeepSeek's tokenizer does. The special tokens are DeepSeek-V2's, at
ids 0 (bos), 1 (eos) and 2 (pad), which ``recipes/models/tiny.yaml`` assumes. Any Hugging Face tokenizer can be
used instead by path; ``ensure_chat_template`` gives it this template if it has none.

The template renders exactly DeepSeek-V2-Chat's text (``<bos>{system}\\n\\nUser: {u}\\n\\nAssistant: {a}<eos>``).
The ``{% generation %}`` block marks the assistant tokens for loss masking, and it starts at the space after
"Assistant:", so a generation prompt ending in "Assistant:" continues exactly as training taught.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
USER_PREFIX, ASSISTANT_PREFIX, TURN_END = "User: ", "Assistant:", "\n\n"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length, chat_template=CHAT_TEMPLATE)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return ensure_chat_template(tokenizer)


def ensure_chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def conversation_texts(messages_column: Iterable[list[dict]]) -> Iterable[str]:
    """Training text for the tokenizer: each conversation rendered with the chat template's text."""
    for messages in messages_column:
        parts = []
        for m in messages:
            if m["role"] == "user":
                parts.append(f"{USER_PREFIX}{m['content']}{TURN_END}")
            elif m["role"] == "assistant":
                parts.append(f"{ASSISTANT_PREFIX} {m['content']}")
            else:
                parts.append(m["content"] + TURN_END)
        yield "".join(parts)
