"""SFT tokenization: chat template, loss on assistant tokens only, a stated truncation policy, and packing.

* Each conversation is rendered as segments of the chat template and tokenized segment by segment, which gives
  the same ids as tokenizing the whole rendered text (segments end where the byte-level pre-tokenizer splits
  anyway; a test checks this against ``apply_chat_template``) and gives the loss mask for free: labels are -100
  except on each assistant reply and its end-of-sentence token.
* Any other chat template (a checkpoint's own: ChatML, Llama 3, ...) is rendered by ``apply_chat_template`` and its
  assistant replies are found by rendering: reply k is the text that the conversation up to it adds to the
  conversation before it with the generation prompt. The tokens whose characters fall in a reply are trained,
  with the end-of-turn token the template puts after it. Positions, not ``ids != pad_id``: when pad = EOS
  (SmolLM2) the EOS that ends a reply is still trained, so the model learns to stop (TRL #4970).
* Over-length conversations (more than ``max_seq_len`` tokens): ``overlong="raise"`` (default) names the row,
  ``"skip"`` drops and counts them, ``"truncate"`` keeps the first ``max_seq_len`` tokens (the loss then covers
  only the assistant tokens that remain).
* Packing puts several conversations in one row (best-fit decreasing). ``position_ids`` restart at 0 for each
  conversation; the model infers the conversation boundaries from them, so attention stays inside each one.
* Results are cached on disk under a fingerprint of the data, the tokenizer and these settings.
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path

from datasets import Dataset, load_from_disk

from .errors import DataError, SkipReport, handle, logger
from .tokenizer import ASSISTANT_PREFIX, CHAT_TEMPLATE, TURN_END, USER_PREFIX

IGNORE_INDEX = -100
OVERLONG = ("raise", "skip", "truncate")


def render_segments(messages: list[dict], bos: str, eos: str) -> list[tuple[str, bool]]:
    """The chat template's text as (segment, is_trained) pieces; their concatenation is the rendered text."""
    segments = [(bos, False)]
    for m in messages:
        if m["role"] == "system":
            segments.append((m["content"] + TURN_END, False))
        elif m["role"] == "user":
            segments.append((USER_PREFIX + m["content"] + TURN_END, False))
        else:
            segments.append((ASSISTANT_PREFIX, False))
            segments.append((" " + m["content"] + eos, True))
    return segments


def encode_batch(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for each conversation."""
    if getattr(tokenizer, "chat_template", None) not in (None, CHAT_TEMPLATE):
        return [encode_with_template(tokenizer, messages) for messages in conversations]
    rendered = [render_segments(m, tokenizer.bos_token, tokenizer.eos_token) for m in conversations]
    flat = [text for segments in rendered for text, _ in segments]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for segments in rendered:
        input_ids, labels = [], []
        for _, trained in segments:
            piece = ids[k]
            k += 1
            input_ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        out.append((input_ids, labels))
    return out


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply (with its end-of-turn text)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("chat template", "messages", "the tokenizer's chat template does not render a conversation as the "
                            "concatenation of its turns (it rewrites earlier turns), so the assistant replies cannot "
                            "be located for the loss mask; set chat_template in the recipe to one that does")
        spans.append((len(before), len(through)))
    return text, spans


def encode_with_template(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation under the tokenizer's own chat template: labels on the tokens that
    start inside an assistant reply's span."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, j = encoded["input_ids"], [], 0
    for token, (start, _) in zip(ids, encoded["offset_mapping"]):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        labels.append(token if j < len(spans) and start >= spans[j][0] else IGNORE_INDEX)
    return ids, labels


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the sequences in each row, no row longer than ``max_len``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free, bins, rows = [], [], []  # free[j] is the room of row bins[j]; both sorted by room
    for i in order:
        j = bisect.bisect_left(free, lengths[i])
        if j == len(free):
            rows.append([i])
            room, row = max_len - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(j) - lengths[i], bins.pop(j)
            rows[row].append(i)
        k = bisect.bisect_left(free, room)
        free.insert(k, room)
        bins.insert(k, row)
    return rows


def fingerprint(dataset: Dataset, tokenizer, **settings) -> str:
    h = hashlib.sha256()
    # the row count and whether rows are selected: an empty selection's indices table adds no buffer bytes, so
    # without these it would share the whole dataset's key
    h.update(f"{len(dataset)}:{dataset._indices is not None}".encode())
    tables = [dataset.data.table]
    if dataset._indices is not None:  # select / filter / shuffle keep the whole table and add an indices mapping
        tables.append(dataset._indices.table)
    for table in tables:
        for column in table.columns:
            for chunk in column.chunks:
                for buffer in chunk.buffers():
                    if buffer is not None:
                        h.update(memoryview(buffer))
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()[:16]


def tokenize_for_sft(dataset: Dataset, tokenizer, max_seq_len: int, *, packing: bool = True,
                     overlong: str = "raise", cache_dir: str | Path | None = None,
                     report: SkipReport | None = None, batch_size: int = 2048) -> Dataset:
    """A conversations dataset -> rows of ``input_ids``, ``labels``, ``position_ids`` (packed or one per row)."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG}")
    cache = None
    if cache_dir is not None:
        key = fingerprint(dataset, tokenizer, max_seq_len=max_seq_len, packing=packing, overlong=overlong)
        cache = Path(cache_dir) / f"sft-{key}"
        if (cache / "dataset_info.json").exists():
            logger.info("tokenized data: cache hit %s", cache)
            return load_from_disk(str(cache))
    report = report if report is not None else SkipReport("tokenize")
    sequences = []
    ids_column = dataset["id"]
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]["messages"]
        for offset, (input_ids, labels) in enumerate(encode_batch(tokenizer, batch)):
            if len(input_ids) > max_seq_len:
                if overlong == "truncate":
                    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
                else:
                    where = ids_column[start + offset]
                    error = DataError(where, "messages",
                                      f"conversation has {len(input_ids)} tokens > max_seq_len {max_seq_len} "
                                      "(raise max_seq_len, or set overlong: skip | truncate)")
                    handle(error, "raise" if overlong == "raise" else "skip", report)
                    continue
            sequences.append((input_ids, labels))
    report.kept = len(sequences)
    if report.total_skipped:
        logger.warning(report.summary())
    if packing:
        rows = pack([len(s[0]) for s in sequences], max_seq_len)
    else:
        rows = [[i] for i in range(len(sequences))]
    columns = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        input_ids, labels, positions = [], [], []
        for i in row:
            input_ids += sequences[i][0]
            labels += sequences[i][1]
            positions += range(len(sequences[i][0]))
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
        columns["position_ids"].append(positions)
    result = Dataset.from_dict(columns)
    if cache is not None:
        result.save_to_disk(str(cache))
    return result
