"""`python -m pipelines.chat`: streamed replies, a kept conversation, /reset and /exit."""

import subprocess
import sys

import torch

from data_prep.tokenizer import load_tokenizer
from modeling import DeepseekV2ForCausalLM, load_model_config
from pipelines.chat import Chat
from tests.conftest import REPO
from tests.pipelines.conftest import ENV, MINI_MODEL


def _chat(mini_data):
    tokenizer = load_tokenizer(mini_data / "tokenizer")
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(load_model_config(MINI_MODEL, vocab_size=len(tokenizer)))
    return Chat(model, tokenizer, max_new_tokens=6), model, tokenizer


def test_replies_stream_and_the_conversation_is_kept(mini_data):
    chat, _, _ = _chat(mini_data)
    pieces = []
    first = chat.reply("What is 2 + 3?", on_text=pieces.append)
    assert "".join(pieces).strip() == first
    chat.reply("And 4 + 4?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[0]["content"] == "What is 2 + 3?" and chat.messages[1]["content"] == first
    chat.reset()
    assert chat.messages == []


def test_the_second_turn_is_conditioned_on_the_first(mini_data):
    chat, model, tokenizer = _chat(mini_data)
    chat.reply("Hello")
    prompt = tokenizer.apply_chat_template(chat.messages + [{"role": "user", "content": "Hi"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.count("User:") == 2 and prompt.endswith("User: Hi\n\nAssistant:")


def test_the_command_line(mini_data, tmp_path):
    chat, model, tokenizer = _chat(mini_data)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pipelines.chat", str(tmp_path), "--max_new_tokens", "4"],
                          input="hello\n/reset\nhi\n/exit\n", cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Assistant: ") == 2 and "(conversation cleared)" in done.stdout
