"""Rewards from trained models (§4.2): an outcome reward model scores whole replies, a process reward model
scores each step of a reasoning chain (process supervision, DeepSeekMath §4.1.3).

Both are ``DeepseekV2ForSequenceClassification`` checkpoints (``make rm`` trains them): the outcome RM reads its
score at the last token, the process RM applies the same head at the last token of every step. Scorers load
lazily and drop the weights when pickled, so TRL can copy them to workers; each has a ``__name__`` for logging.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .completions import completion_text

DEFAULT_BATCH_SIZE = 32


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def step_end_positions(tokenizer, prompt, steps: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply (steps joined by spaces, as the chat template renders one assistant turn), and
    the index of the last token of each step. Shared by process-RM training and scoring."""
    head = tokenizer.apply_chat_template(_as_messages(prompt), tokenize=False, add_generation_prompt=True)
    pieces = [head] + [" " + step for step in steps] + [tokenizer.eos_token]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    ids, ends = [], []
    for i, piece in enumerate(encoded):
        ids += piece
        if 0 < i <= len(steps):
            ends.append(len(ids) - 1)
    return ids, ends


class _Scorer:
    def __init__(self, path: str | Path, batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None,
                 name: str | None = None):
        self.path, self.batch_size = str(path), batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.__name__ = name or f"{type(self).__name__.lower()}_{Path(self.path).name}"
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            import modeling  # noqa: F401  (registers our classes; the checkpoint also carries them)

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.path, trust_remote_code=True)
            self._model.to(self.device).eval()
        return self._model, self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    @torch.no_grad()
    def _token_scores(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per-token scores [len] for each id sequence (right-padded batches)."""
        model, tokenizer = self._load()
        out = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
            hidden = model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 use_cache=False).last_hidden_state
            scores = model.score(hidden)[..., 0].float().cpu()
            out += [scores[i, : len(s)] for i, s in enumerate(batch)]
        return out


class RewardModelScorer(_Scorer):
    """``reward(prompts, completions, **columns) -> list[float]``: the outcome RM's score of each reply."""

    def __call__(self, prompts, completions, **unused) -> list[float]:
        _, tokenizer = self._load()
        sequences = [
            tokenizer.apply_chat_template(_as_messages(p) + [{"role": "assistant", "content": completion_text(c)}],
                                          tokenize=True, return_dict=True)["input_ids"]
            for p, c in zip(prompts, completions)
        ]
        return [scores[-1].item() for scores in self._token_scores(sequences)]


def split_steps(text: str) -> list[str]:
    """Reasoning steps: the sentences of a reply (this project's solutions state one result per sentence)."""
    steps = [s.strip() for s in text.replace("\n", " ").split(". ")]
    steps = [s if s.endswith(".") else s + "." for s in steps if s]
    return steps or [text]


class ProcessRewardScorer(_Scorer):
    """Scores every step: ``step_scores(prompts, completions)`` -> per-step scores (for process-supervised
    advantages); as a plain reward, a reply scores its weakest step (``aggregate="min"``) or the mean."""

    def __init__(self, path, aggregate: str = "min", **kwargs):
        if aggregate not in ("min", "mean"):
            raise ValueError(f"aggregate={aggregate!r}; expected 'min' or 'mean'")
        super().__init__(path, **kwargs)
        self.aggregate = aggregate

    def step_scores(self, prompts, completions) -> list[list[float]]:
        _, tokenizer = self._load()
        encoded = [step_end_positions(tokenizer, p, split_steps(completion_text(c)))
                   for p, c in zip(prompts, completions)]
        scores = self._token_scores([ids for ids, _ in encoded])
        return [s[ends].tolist() for s, (_, ends) in zip(scores, encoded)]

    def __call__(self, prompts, completions, **unused) -> list[float]:
        reduce = min if self.aggregate == "min" else (lambda xs: sum(xs) / len(xs))
        return [reduce(steps) for steps in self.step_scores(prompts, completions)]
