"""SFT tokenization: template-exact ids, assistant-only labels, truncation policy, packing, caching."""

import random
import time

import pytest
import torch

from data_prep import DataError, SkipReport, tokenize_for_sft
from data_prep.packing import IGNORE_INDEX, encode_batch, pack
from data_prep.tokenizer import train_tokenizer
from datasets import Dataset
from modeling import DeepseekV2ForCausalLM
from tests.conftest import tiny_config

WORDS = "the answer is seven plus five equals twelve a poem about rain please help me write code".split()


def _conversation(rng, turns):
    messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
    for _ in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
                         + f" {rng.randint(0, 999)}?"})
        messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))})
    return messages


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    return [_conversation(rng, rng.randint(1, 3)) for _ in range(60)]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    texts = [" ".join(m["content"] for m in c) for c in corpus]
    return train_tokenizer(texts, vocab_size=300)


def _dataset(conversations):
    return Dataset.from_dict({"messages": conversations, "domain": ["x"] * len(conversations),
                              "source": ["t"] * len(conversations), "id": [f"c{i}" for i in range(len(conversations))]})


def test_digits_are_single_tokens(tokenizer):
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert tokenizer.convert_tokens_to_ids(tokenizer.bos_token) == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 2


def test_segment_encoding_equals_the_chat_template(tokenizer, corpus):
    for messages, (ids, labels) in zip(corpus, encode_batch(tokenizer, corpus)):
        ref = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"]
        assert [x != IGNORE_INDEX for x in labels] == [bool(m) for m in ref["assistant_masks"]]
        assert labels[-1] == tokenizer.eos_token_id  # the end of every reply is learned


def test_generation_prompt_continues_where_training_starts(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the answer"}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
    ids, labels = encode_batch(tokenizer, [messages])[0]
    first_trained = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    assert ids[:first_trained] == list(prompt["input_ids"])


@pytest.mark.parametrize("lengths,max_len", [([5, 3, 3, 2, 7, 1], 8), ([8] * 5, 8), ([1] * 20, 6), ([4, 5, 6], 6)])
def test_pack_fits_every_sequence_exactly_once(lengths, max_len):
    rows = pack(lengths, max_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_len for row in rows)
    assert len(rows) == -(-sum(lengths) // max_len) or len(rows) <= len(lengths)


def test_packed_rows_give_the_logits_of_each_conversation_alone(tokenizer, corpus):
    rows = tokenize_for_sft(_dataset(corpus[:12]), tokenizer, max_seq_len=256)
    assert len(rows) < 12  # several conversations share a row
    model = DeepseekV2ForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    alone = {tuple(ids): ids for ids, _ in encode_batch(tokenizer, corpus[:12])}
    checked = 0
    for row in rows:
        positions = torch.tensor([row["position_ids"]])
        with torch.no_grad():
            packed = model(torch.tensor([row["input_ids"]]), position_ids=positions).logits[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            ids = row["input_ids"][a:b]
            assert tuple(ids) in alone
            with torch.no_grad():
                single = model(torch.tensor([ids])).logits[0]
            assert (packed[a:b] - single).abs().max().item() <= 1e-4
            checked += 1
    assert checked == 12


def test_overlong_policy(tokenizer, corpus):
    data = _dataset(corpus[:10])
    longest = max(len(ids) for ids, _ in encode_batch(tokenizer, corpus[:10]))
    limit = longest - 1
    with pytest.raises(DataError, match=rf"tokens > max_seq_len {limit}"):
        tokenize_for_sft(data, tokenizer, max_seq_len=limit, packing=False)
    report = SkipReport()
    kept = tokenize_for_sft(data, tokenizer, max_seq_len=limit, packing=False, overlong="skip", report=report)
    assert len(kept) + report.total_skipped == 10 and report.total_skipped >= 1
    cut = tokenize_for_sft(data, tokenizer, max_seq_len=limit, packing=False, overlong="truncate")
    assert len(cut) == 10 and max(len(r) for r in cut["input_ids"]) == limit


def test_tokenized_data_is_cached_by_fingerprint(tokenizer, corpus, tmp_path):
    data = _dataset(corpus)
    first = tokenize_for_sft(data, tokenizer, max_seq_len=256, cache_dir=tmp_path)
    start = time.perf_counter()
    again = tokenize_for_sft(data, tokenizer, max_seq_len=256, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
    assert again["input_ids"] == first["input_ids"] and len(list(tmp_path.iterdir())) == 1
    tokenize_for_sft(data, tokenizer, max_seq_len=64, cache_dir=tmp_path, overlong="truncate")
    assert len(list(tmp_path.iterdir())) == 2  # other settings, other entry


def test_a_selection_of_the_data_gets_its_own_cache_entry_even_when_empty(tokenizer, corpus, tmp_path):
    """A filtered dataset keeps the whole table plus an indices mapping; an empty mapping has no bytes to hash, and it
    used to share the whole dataset's cache entry (so selecting no rows gave back every row)."""
    data = _dataset(corpus)
    whole = tokenize_for_sft(data, tokenizer, max_seq_len=256, cache_dir=tmp_path)
    none = tokenize_for_sft(data.filter(lambda _: False), tokenizer, max_seq_len=256, cache_dir=tmp_path)
    some = tokenize_for_sft(data.select(range(3)), tokenizer, max_seq_len=256, cache_dir=tmp_path)
    assert len(whole) > 0 and len(none) == 0 and 0 < len(some) < len(whole)
    assert len(list(tmp_path.iterdir())) == 3
