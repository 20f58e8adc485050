"""Rewards from trained models (§4.2): an outcome reward model scores whole replies, a process reward model
scores each step of a reasoning chain (process supervision, DeepSeekMath §4.1.3).

An outcome RM is one of two kinds of checkpoint (``make rm-all`` trains both):
  * a classifier, ``DeepseekV2ForSequenceClassification`` (Bradley-Terry or point-wise): the score head at the
    reply's last token;
  * an implicit reward model, a causal LM trained with SimPO's loss (``objective: simpo``; its config carries
    ``implicit_reward_beta``): beta times the mean log-prob of the reply's tokens. It keeps what the SFT model
    learnt about which step follows which, which a fresh score head has to learn again.
The process RM is a classifier that applies its head at the last token of every step. Scorers load lazily and drop
the weights when pickled, so TRL can copy them to workers; each has a ``__name__`` for logging.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .completions import completion_text

DEFAULT_BATCH_SIZE = 32
IMPLICIT_REWARD_BETA = "implicit_reward_beta"  # config key that makes a causal LM checkpoint an implicit reward model


def is_local_path(path) -> bool:
    """Whether ``path`` names a local folder rather than a hub id: it exists, starts with ``.``, ``/`` or ``~``, or
    has more parts than a hub id's ``namespace/name`` (``runs/rm/tiny/helpful``)."""
    text = str(path)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


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
                 name: str | None = None, trust_remote_code: bool = False):
        self.path, self.batch_size, self.trust_remote_code = str(path), batch_size, trust_remote_code
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.__name__ = name or f"{type(self).__name__.lower()}_{Path(self.path).name}"
        self._model = self._tokenizer = None
        self.beta = None  # an implicit reward model's beta, read from its config on load (None: a classifier)

    def _load(self):
        if self._model is None:
            if is_local_path(self.path) and not Path(self.path).exists():  # else transformers: "malformed repo id"
                raise FileNotFoundError(f"{self.path}: no reward model there. Train it first (the tiny default's: "
                                        "make rm for helpful and safety, make rm-all for reasoning and process too; "
                                        "any recipe: python -m pipelines.reward_model --config RECIPE) or fix the path")
            from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                                      AutoTokenizer)

            import modeling  # noqa: F401  (registers our classes with the Auto classes)

            remote = self.trust_remote_code  # ours loads without it: `modeling` registers our classes
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=remote)
            if self._tokenizer.pad_token is None:  # batches are padded; the mask comes from lengths
                self._tokenizer.pad_token = self._tokenizer.eos_token
            self.beta = getattr(AutoConfig.from_pretrained(self.path, trust_remote_code=remote), IMPLICIT_REWARD_BETA,
                                None)
            auto = AutoModelForSequenceClassification if self.beta is None else AutoModelForCausalLM
            self._model = auto.from_pretrained(self.path, trust_remote_code=remote)
            self._model.to(self.device).eval()
        return self._model, self._tokenizer

    def _batches(self, sequences: list[list[int]]):
        """(first index, ids, attention mask) of right-padded batches of ``sequences``."""
        pad = self._load()[1].pad_token_id
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            ids = torch.full((len(batch), max(len(s) for s in batch)), pad)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
            yield start, ids.to(self.device), mask.to(self.device)

    def __getstate__(self):
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    @torch.no_grad()
    def _token_scores(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per-token scores [len] for each id sequence (right-padded batches)."""
        model, _ = self._load()
        if self.beta is not None:
            raise ValueError(f"{self.path} is an implicit reward model (a causal LM); per-token scores need a "
                             "classifier checkpoint (make rm's pairwise or pointwise objective, or make rm-all's "
                             "process RM)")
        out = []
        for start, ids, mask in self._batches(sequences):
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            scores = model.score(hidden)[..., 0].float().cpu()
            out += [scores[i, : len(s)] for i, s in enumerate(sequences[start : start + len(ids)])]
        return out

    @torch.no_grad()
    def _mean_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[float]:
        """The mean log-prob of ``sequence[start:]`` given what precedes it, for each sequence."""
        model, _ = self._load()
        out = []
        for first, ids, mask in self._batches(sequences):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
            for i, (s, start) in enumerate(zip(sequences[first : first + len(ids)], starts[first:])):
                out.append(logp[i, start - 1 : len(s) - 1].mean().item())
        return out


class RewardModelScorer(_Scorer):
    """``reward(prompts, completions, **columns) -> list[float]``: the outcome RM's score of each reply (a
    classifier's last-token score, or an implicit reward model's beta x mean reply log-prob)."""

    def __call__(self, prompts, completions, **unused) -> list[float]:
        _, tokenizer = self._load()
        sequences = [
            tokenizer.apply_chat_template(_as_messages(p) + [{"role": "assistant", "content": completion_text(c)}],
                                          tokenize=True, return_dict=True)["input_ids"]
            for p, c in zip(prompts, completions)
        ]
        if self.beta is None:
            return [scores[-1].item() for scores in self._token_scores(sequences)]
        starts = [len(tokenizer.apply_chat_template(_as_messages(p), tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]) for p in prompts]
        return [self.beta * logp for logp in self._mean_logprobs(sequences, starts)]


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
