"""Point-wise and process reward-model training: a binary loss on the score head at chosen token positions.

TRL's RewardTrainer covers pairwise (Bradley-Terry) training; TRL 1.16 has no process reward trainer and no
point-wise one, so this is the small piece we own. Each example is a token sequence, the positions to score
(the last token for point-wise, the last token of every step for process supervision) and a 0/1 label per
position; the loss is binary cross-entropy on the score there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from rewards.model import step_end_positions


def process_features(tokenizer, prompt, steps: list[str], labels: list[bool]) -> dict:
    ids, ends = step_end_positions(tokenizer, prompt, steps)
    return {"input_ids": ids, "positions": ends, "targets": [float(x) for x in labels]}


def pointwise_features(tokenizer, prompt, reply: str, good: bool) -> dict:
    ids = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": reply}], tokenize=True,
                                        return_dict=True)["input_ids"]
    return {"input_ids": list(ids), "positions": [len(ids) - 1], "targets": [float(good)]}


class PositionCollator:
    """Right-pads ids; positions and targets are padded with -1 (ignored)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        slots = max(len(f["positions"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), width), self.pad),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "positions": torch.full((len(features), slots), -1),
            "targets": torch.full((len(features), slots), -1.0),
        }
        for i, f in enumerate(features):
            n, k = len(f["input_ids"]), len(f["positions"])
            batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["positions"][i, :k] = torch.tensor(f["positions"])
            batch["targets"][i, :k] = torch.tensor(f["targets"])
        return batch


def position_scores(model, input_ids, attention_mask, positions) -> torch.Tensor:
    """The score head at each position: [batch, slots] (padding slots read position 0 and are masked later)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    scores = model.score(out.last_hidden_state)[..., 0]
    return scores.gather(1, positions.clamp(min=0)), out.aux_loss


class ScoreHeadTrainer(Trainer):
    """``Trainer`` with the position-wise binary loss (plus the model's MoE balance loss when training)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores, aux_loss = position_scores(model, inputs["input_ids"], inputs["attention_mask"], inputs["positions"])
        valid = inputs["targets"] >= 0
        loss = F.binary_cross_entropy_with_logits(scores[valid].float(), inputs["targets"][valid])
        if aux_loss is not None:
            loss = loss + aux_loss
        return (loss, {"scores": scores}) if return_outputs else loss


@torch.no_grad()
def position_accuracy(model, dataset, collator, batch_size: int = 64) -> float:
    """Share of scored positions whose sign agrees with the label (score > 0 means "right")."""
    model.eval()
    hits = total = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        device = next(model.parameters()).device
        scores, _ = position_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    batch["positions"].to(device))
        valid = batch["targets"] >= 0
        hits += ((scores.cpu() > 0).float() == batch["targets"])[valid].sum().item()
        total += valid.sum().item()
    return hits / max(total, 1)
