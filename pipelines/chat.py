"""Chat with a checkpoint in the terminal: replies stream token by token and the conversation is kept.

    python -m pipelines.chat runs/sft/tiny                  # greedy, as the SFT run evaluates
    python -m pipelines.chat runs/sft/tiny --temperature 0.7 --system "You are a helpful assistant."

Commands: ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) quits. The prompt is the checkpoint's own chat
template, so any chat checkpoint works, ours or not (``pipelines.models`` loads it: a folder without a chat template
needs ``--chat_template_path chatml``; ``--trust_remote_code`` only for checkpoints that ship their own code).
"""

from __future__ import annotations

import argparse
import sys
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from .models import ModelLoadError, load_causal_lm, load_tokenizer

RESET, EXIT = "/reset", "/exit"


class Chat:
    """A conversation with one model: ``reply(text, on_text)`` streams the answer and remembers both turns."""

    def __init__(self, model, tokenizer, system: str = "", max_new_tokens: int = 512, temperature: float = 0.0):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, on_text=lambda piece: None) -> str:
        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        kwargs = dict(**inputs.to(self.model.device), streamer=streamer, max_new_tokens=self.max_new_tokens,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **sampling)
        worker = Thread(target=self._generate, kwargs=kwargs, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            # the template puts the space after "Assistant:" inside the reply: drop it from the display
            piece = piece.lstrip() if not pieces else piece
            pieces.append(piece)
            on_text(piece)
        worker.join()
        answer = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    @torch.no_grad()
    def _generate(self, **kwargs):
        self.model.generate(**kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a chat checkpoint folder (e.g. runs/sft/tiny) or hub id")
    parser.add_argument("--system", default="", help="a system prompt")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--chat_template_path", default=None, help="replaces the checkpoint's: chatml, deepseek, a file")
    parser.add_argument("--trust_remote_code", action="store_true", help="for checkpoints with their own code")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.checkpoint, args.chat_template_path, args.trust_remote_code)
        model = load_causal_lm(args.checkpoint, "float32", args.trust_remote_code, tokenizer, what="checkpoint")
    except (OSError, ModelLoadError) as e:
        print(f"cannot chat with {args.checkpoint!r}: {e}", file=sys.stderr)
        return 2
    chat = Chat(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
    print(f"Chatting with {args.checkpoint}. {RESET} forgets the conversation, {EXIT} quits.", flush=True)
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text == EXIT:
            return 0
        if text == RESET:
            chat.reset()
            print("(conversation cleared)")
            continue
        if text:
            print("Assistant: ", end="", flush=True)
            chat.reply(text, on_text=lambda piece: print(piece, end="", flush=True))
            print()


if __name__ == "__main__":
    raise SystemExit(main())
