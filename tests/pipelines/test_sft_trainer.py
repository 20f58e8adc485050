"""What the SFT trainer adds to TRL's: packed rows kept apart, and the balance loss in the objective and the logs."""

import dataclasses

import pytest
import torch
from datasets import Dataset, load_from_disk
from trl import SFTConfig, SFTTrainer

from data_prep import tokenize_for_sft
from data_prep.tokenizer import load_tokenizer
from modeling import DeepseekV2ForCausalLM, load_model_config
from pipelines.sft import trainer_args
from pipelines.sft_trainer import IGNORE_INDEX, DeepseekSFTTrainer, PackedCollator, loss_on_every_token
from tests.pipelines.conftest import MINI_MODEL

ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
    {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
]


@pytest.mark.parametrize("multiple, want_ids, want_positions", [
    (None, [[5, 6, 7, 8, 9], [5, 6, 2, 2, 2]], [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]),
    (4, [[5, 6, 7, 8, 9, 2, 2, 2], [5, 6, 2, 2, 2, 2, 2, 2]], [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]),
])
def test_packed_collator_pads_and_keeps_positions(multiple, want_ids, want_positions):
    batch = PackedCollator(pad_token_id=2, pad_to_multiple_of=multiple)(ROWS)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: it would merge conversations
    assert batch["input_ids"].tolist() == want_ids
    assert batch["position_ids"].tolist() == want_positions
    assert batch["labels"][1].tolist()[:2] == [-100, 6] and (batch["labels"][1, 2:] == IGNORE_INDEX).all()


def test_loss_on_every_token_except_across_a_boundary():
    rows = loss_on_every_token(Dataset.from_list(ROWS))
    assert rows[0]["labels"] == [-100, 6, 7, -100, 9] and rows[1]["labels"] == [-100, 6]


@pytest.fixture(scope="module")
def setup(mini_data, tmp_path_factory):
    tokenizer = load_tokenizer(mini_data / "tokenizer")
    rows = tokenize_for_sft(load_from_disk(str(mini_data / "sft")), tokenizer, 128, overlong="skip")
    config = load_model_config(MINI_MODEL, vocab_size=len(tokenizer))
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("trainer")), use_cpu=True, bf16=False, max_steps=3,
                     per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, report_to=[],
                     save_strategy="no", gradient_checkpointing=False)
    return tokenizer, rows, config, trainer_args(args)


def _trainer(setup, model):
    tokenizer, rows, _, args = setup
    return DeepseekSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                              data_collator=PackedCollator(tokenizer.pad_token_id))


def test_the_balance_loss_is_in_the_objective_where_trl_would_drop_it(setup):
    tokenizer, rows, config, _ = setup
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(config).train()
    trainer = _trainer(setup, model)
    batch = PackedCollator(tokenizer.pad_token_id)([rows[i] for i in range(8)])
    ours = trainer.compute_loss(model, dict(batch))
    outputs = model(**batch)
    trl_loss = SFTTrainer.compute_loss(trainer, model, dict(batch))  # its fused LM head: the LM loss only
    assert outputs.aux_loss > 0
    assert torch.allclose(ours, outputs.loss, atol=1e-6)
    assert torch.allclose(trl_loss, outputs.loss - outputs.aux_loss, atol=1e-5)


def test_training_moves_every_weight_and_logs_the_balance_loss(setup):
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(setup[2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(setup, model)
    trainer.train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged
    steps = [r for r in trainer.state.log_history if "loss" in r]
    assert len(steps) == 3 and all(r["aux_loss"] > 0 and 0 <= r["mean_token_accuracy"] <= 1 for r in steps)
    # real tokens only, not the padding of the shorter rows: the same shuffled batches, counted here
    pad = setup[0].pad_token_id
    batches = [b for b, _ in zip(trainer.get_train_dataloader(), range(3))]
    assert steps[-1]["num_tokens"] == sum(int((b["input_ids"] != pad).sum()) for b in batches)


def test_gradient_accumulation_spreads_the_balance_loss(setup):
    """Two accumulated micro-batches of 4 rows take one step like one batch of 8 (up to the balance loss's
    per-micro-batch statistics), not with the balance loss counted twice."""
    tokenizer, rows, config, args = setup
    losses = {}
    for name, batch, accumulate in (("one", 8, 1), ("two", 4, 2)):
        torch.manual_seed(0)
        model = DeepseekV2ForCausalLM(config)
        run_args = dataclasses.replace(args, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                                       max_steps=1)
        trainer = DeepseekSFTTrainer(model=model, args=run_args, train_dataset=rows, processing_class=tokenizer,
                                     data_collator=PackedCollator(tokenizer.pad_token_id))
        trainer.train()
        losses[name] = trainer.state.log_history[0]["loss"]
    assert abs(losses["one"] - losses["two"]) < 1e-4  # the balance loss is ~0.01: counted twice, it would show
