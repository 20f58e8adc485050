"""What TRL's ``SFTTrainer`` lacks for DeepSeek-V2 and for rows packed by ``data_prep``; nothing else is overridden.

* ``DeepseekSFTTrainer.compute_loss`` trains on the model's own loss, which includes the DeepSeekMoE balance loss
  (§2.2.3), and logs that as ``aux_loss``. TRL computes its loss through a fused LM head that runs the model's
  backbone and keeps only the hidden states, so the balance loss would be dropped (TRL adds only Mixtral-style
  router losses from ``router_logits``, which DeepSeek-V2 does not return). On this CPU the fused head (a torch
  fallback of a Triton kernel, scoring every position) also made a training step 17-30% slower than the model's
  own loss; on GPUs it saves the memory of the logits, which the large vocabularies here can afford.
* The same override logs ``mean_token_accuracy`` and counts real tokens for ``num_tokens`` (without an attention
  mask, which packed rows must not have, TRL would count one row's width per batch).
* ``DeepseekSFTTrainer._load_from_checkpoint`` restores weights through ``from_pretrained`` when a run continues.
  ``Trainer`` reads a checkpoint with a bare ``load_state_dict(strict=False)``, which skips transformers' checkpoint
  conversion: our routed experts are saved under the official per-expert names and held stacked in memory, so they
  were silently left as they were (a resumed run then drifted from an uninterrupted one by ~1e-3 in loss).
* ``PackedCollator`` pads ``data_prep``'s packed rows and passes ``position_ids`` that restart at 0 for each
  conversation and no attention mask: from those the model keeps attention inside each conversation. TRL's own
  collator either adds an attention mask (and the model would attend across conversations) or flattens the batch
  into one row (one dense mask over all tokens of the batch). Other architectures (Llama, Qwen2, ...) keep
  attention inside each conversation the same way through transformers' packed-sequence masks, provided the
  forward builds no cache, so the loss is computed with ``use_cache=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import SFTTrainer

IGNORE_INDEX = -100


@dataclass
class PackedCollator:
    """Rows of ``input_ids``, ``labels``, ``position_ids`` -> right-padded tensors, no attention mask.

    The padding tail gets positions 0, 1, ... of its own, so the model sees it as one more (untrained) sequence and
    no real token attends to it."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.arange(width).repeat(len(rows), 1)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            position_ids[i, :n] = torch.as_tensor(row["position_ids"])
            position_ids[i, n:] = torch.arange(width - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def loss_on_every_token(rows: Dataset) -> Dataset:
    """Packed rows with labels on every token (plain language modelling) instead of the assistant replies only.

    The first token of each conversation stays unlabelled: it would be predicted across a conversation boundary."""

    def relabel(batch):
        return {"labels": [[IGNORE_INDEX if p == 0 else t for t, p in zip(ids, pos)]
                           for ids, pos in zip(batch["input_ids"], batch["position_ids"])]}

    return rows.map(relabel, batched=True, desc="labels on every token")


class DeepseekSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is the model's own: the LM loss plus the DeepSeekMoE balance loss, both logged."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The model's forward, not TRL's fused LM head: the model adds its balance loss to the LM loss itself.
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        # use_cache=False: transformers' models infer packed conversations from position_ids only when no cache is
        # being built (masking_utils); with one, a Llama or Qwen2 row attends across its conversations
        outputs = model(**inputs, use_cache=False)
        # ours: None outside training (computed only when there are gradients); other architectures have none
        aux = getattr(outputs, "aux_loss", None)
        lm_loss = outputs.loss - aux if aux is not None else outputs.loss
        # Normalised by the tokens of the whole accumulated, all-ranks batch (as Trainer.compute_loss does), while
        # the balance loss is a per-micro-batch mean: spread it over the accumulation steps and let DDP average it.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            lm_loss = lm_loss * self.accelerator.num_processes
        loss = lm_loss
        if aux is not None:
            loss = loss + aux / (self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1)
        self._log_step_metrics(inputs, outputs, aux)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        plain = not (hasattr(model, "peft_config") or self.is_fsdp_enabled or self.is_deepspeed_enabled)
        if not plain or not any((folder / name).is_file() for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(model.parameters()).dtype
        restored = type(model).from_pretrained(folder, dtype=dtype)  # applies the checkpoint conversion
        model.load_state_dict(restored.state_dict(), strict=True)

    @torch.no_grad()
    def _log_step_metrics(self, inputs, outputs, aux) -> None:
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"][:, 1:]
        trained = labels != IGNORE_INDEX
        correct = (outputs.logits[:, :-1].argmax(-1) == labels) & trained
        real = inputs["input_ids"] != self.processing_class.pad_token_id
        counts = torch.stack([correct.sum(), trained.sum(), real.sum()])
        correct, trained, real = self.accelerator.gather_for_metrics(counts[None]).sum(0).tolist()
        self._metrics[mode]["mean_token_accuracy"].append(correct / max(1, trained))
        if aux is not None:
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()[None]).mean().item())
        if mode == "train":
            self._total_train_tokens += int(real)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
