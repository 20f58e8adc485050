"""Supervised fine-tuning (DeepSeek-V2 §4.1) on TRL's SFTTrainer: a recipe in, a chat checkpoint out.

What it does: build the data mixture if it is missing (``data_prep``), tokenize and pack it, build or load the model,
run the recipe's stages (an optional ``pretrain`` stage with loss on every token, then SFT with loss on the assistant
replies), save a chat checkpoint (safetensors, tokenizer with its chat template, generation config, the resolved
recipe, a model card), and score it greedily on held-out math and safety prompts (``pipelines/quick_eval.py``).
Launched again on the same output folder, it continues from the last complete checkpoint instead of starting over.

How it departs from the paper:
  * The paper fine-tunes DeepSeek-V2 for 2 epochs at learning rate 5e-6 on 1.5M conversations; the ``deepseek-v2*``
    recipes keep those two settings. Batch size, sequence length, warmup and schedule are not in the paper: ours.
  * ``tiny`` has no pretrained base, so its recipe first trains the fresh model on the same generated corpus with
    loss on every token (plain language modelling: prompts teach it the language of the requests too), then runs SFT
    with loss on the replies only, both at lr 1e-3 with warmup and cosine decay, sized to 2 CPU cores.
  * LoRA (``use_peft``) is available for users with less memory; the paper fine-tunes all weights.

TRL's pieces are used as they are (``SFTConfig``, ``ModelConfig``, ``TrlParser``, ``SFTTrainer``); what they lack is in
``pipelines/sft_trainer.py``: the DeepSeekMoE balance loss (TRL's fused LM head drops it) and a collator for
``data_prep``'s packed rows. ``packing``, ``max_length`` and ``assistant_only_loss`` keep TRL's meaning, but
``data_prep.tokenize_for_sft`` applies them (best-fit packing, positions restarting per conversation), so the trainer
is handed ready rows and TRL's own preparation is switched off.

Several CPU processes: accelerate 1.15 starts them for ``--cpu`` only through mpirun (without it, ``--cpu
--num_processes 2`` silently starts one); ``--multi_gpu`` starts them through torch.distributed.run, and with the
recipe's ``use_cpu`` they form a gloo group (``torchrun --nproc_per_node 2 -m pipelines.sft ...`` does the same).

Launch:
  make sft                                                    # = python -m pipelines.sft recipes/sft/tiny.yaml
  python -m pipelines.sft recipes/sft/tiny.yaml --max_steps 50 --pretrain.max_steps 20 --output_dir runs/sft/try
  accelerate launch --multi_gpu --num_processes 2 -m pipelines.sft recipes/sft/tiny.yaml   # 2 CPU processes, gloo
  accelerate launch --config_file recipes/accelerate/ddp.yaml -m pipelines.sft recipes/sft/deepseek-v2-lite.yaml
  accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml -m pipelines.sft recipes/sft/deepseek-v2.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import load_from_disk
from transformers import GenerationConfig, set_seed
from trl import ModelConfig, SFTConfig, get_peft_config

from data_prep import ensure_built, tokenize_for_sft
from data_prep.errors import SkipReport
from modeling import DeepseekV2ForCausalLM, count_parameters, load_model_config

from . import model_card, quick_eval
from .models import load_causal_lm, load_tokenizer, warn_if_bf16_is_emulated
from .config import RecipeError, coerce, parse_recipe
from .run_state import last_complete_checkpoint, mark_stage_done, prepare_run_dir, stage_done
from .sft_trainer import DeepseekSFTTrainer, PackedCollator, loss_on_every_token
from .tracking import JsonlMetrics, final_loss, plot_loss_curve, read_metrics

logger = logging.getLogger("sft")
OVERLONG = ("skip", "truncate", "raise")
CHAT_MAX_NEW_TOKENS = 512  # generation_config default for chat; evaluation passes its own limit
RECIPE_HEADER = ("# The resolved recipe of this run: the recipe file with command-line overrides applied (values that\n"
                 "# differ from the defaults). Re-run or continue it: python -m pipelines.sft {path}\n")


@dataclass
class SFTScriptArguments:
    """Project fields; training fields are TRL's ``SFTConfig``, model fields TRL's ``ModelConfig``."""

    data_recipe: str | None = field(default="recipes/data/tiny.yaml", metadata={
        "help": "data_prep spec, built into data_dir when data_dir has no sft/ yet"})
    data_dir: str = field(default="runs/data/tiny", metadata={"help": "a data_prep build: sft/, heldout/, tokenizer/"})
    tokenizer_path: str | None = field(default=None, metadata={
        "help": "default: model_name_or_path's tokenizer, or data_dir/tokenizer for a fresh model"})
    model_config: str = field(default="tiny", metadata={
        "help": "without model_name_or_path: train a fresh model of this config (a name or a YAML file)"})
    overlong: str = field(default="skip", metadata={"help": "conversations over max_length: skip | truncate | raise"})
    pretrain: dict | str | None = field(default=None, metadata={
        "help": "SFTConfig fields that differ for a first stage with loss on every token (none: no such stage); "
                "on the command line --pretrain.KEY VALUE"})
    pretrain_domains: list[str] | None = field(default=None, metadata={
        "help": "domains of the SFT conversations the pretrain stage reads (none: all of them)"})
    resume: bool = field(default=True, metadata={
        "help": "continue from the last complete checkpoint in output_dir when its recipe matches; false: start over"})
    eval_math: int = field(default=2000, metadata={"help": "held-out math problems to answer greedily (0: none)"})
    eval_safety: int | None = field(default=None, metadata={"help": "held-out safety prompts (none: all)"})
    eval_batch_size: int = 64
    eval_max_new_tokens: int = 96

    def __post_init__(self):
        if self.overlong not in OVERLONG:
            raise RecipeError(f"overlong={self.overlong!r}; expected one of {OVERLONG}")


def stage_args(args: SFTConfig, name: str, overrides: dict | None = None) -> SFTConfig:
    """A stage's SFTConfig: the recipe's, with the stage's overrides and its own folder under output_dir."""
    return dataclasses.replace(args, **coerce(SFTConfig, overrides or {}),
                               output_dir=str(Path(args.output_dir) / "stages" / name))


def trainer_args(args: SFTConfig) -> SFTConfig:
    """What the trainer gets: data_prep already applied packing, max_length and the loss mask (see the docstring)."""
    return dataclasses.replace(args, packing=False, assistant_only_loss=False, remove_unused_columns=False,
                               dataset_kwargs={"skip_prepare_dataset": True},
                               chat_template_path=None)  # already applied by pipelines.models.load_tokenizer


def check(script_args: SFTScriptArguments, args: SFTConfig, model_args: ModelConfig, recipe_path) -> None:
    where = recipe_path or "command line"
    if script_args.pretrain and model_args.use_peft:
        raise RecipeError(f"{where}: pretrain trains the whole model from scratch, use_peft adapts a trained one; "
                          "drop one of them")
    if args.max_length is None:
        raise RecipeError(f"{where}: set max_length (the packed row length)")
    if args.save_strategy == "no" and script_args.resume:
        logger.warning("save_strategy is 'no': an interrupted run will start over")


def load_model(script_args: SFTScriptArguments, model_args: ModelConfig, tokenizer, seed: int,
               trust_remote_code: bool = False):
    if model_args.model_name_or_path:  # any causal LM: ours, or whatever architecture the checkpoint names
        return load_causal_lm(model_args.model_name_or_path, model_args.dtype, trust_remote_code,
                              tokenizer, what="model_name_or_path", revision=model_args.model_revision,
                              attn_implementation=model_args.attn_implementation)
    config = load_model_config(script_args.model_config, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    if model_args.attn_implementation:
        config._attn_implementation = model_args.attn_implementation
    set_seed(seed)  # the fresh weights depend on the seed only
    return DeepseekV2ForCausalLM(config)


def parameters(model) -> tuple[int, int]:
    """(total, activated per token): ours counts the routed experts a token skips; a dense model activates all."""
    if isinstance(model, DeepseekV2ForCausalLM):
        return count_parameters(model.config)
    total = sum(p.numel() for p in model.parameters())
    return total, total


def mark_moe_as_zero3_leaf(model) -> None:
    """Under ZeRO-3, each rank gathers the parameters its forward touches; ours runs only the experts that got
    tokens, which differ between ranks and would hang the collective. Leaf modules are gathered whole."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        from deepspeed.utils import set_z3_leaf_modules

        from modeling.modeling_deepseek_v2 import DeepseekV2MoE

        set_z3_leaf_modules(model, [DeepseekV2MoE])


def run_stage(name, args, model, tokenizer, rows, run_dir, peft_config=None, resume=True):
    """Train one stage (continuing from its last complete checkpoint); its summary and the trained model."""
    trainer = DeepseekSFTTrainer(
        model=model, args=trainer_args(args), train_dataset=rows, processing_class=tokenizer,
        data_collator=PackedCollator(tokenizer.pad_token_id, args.pad_to_multiple_of),
        callbacks=[JsonlMetrics(Path(run_dir) / "metrics.jsonl", name)], peft_config=peft_config)
    checkpoint = last_complete_checkpoint(args.output_dir) if resume else None
    if checkpoint:
        logger.info("%s: continuing from %s", name, checkpoint)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    summary = {
        "stage": name, "loss_on": "assistant replies" if args.assistant_only_loss else "every token",
        "steps": trainer.state.global_step, "learning_rate": args.learning_rate,
        "tokens": trainer._total_train_tokens, "seconds": round(time.perf_counter() - start, 1),
        "tokens_per_second": round(trainer._total_train_tokens / max(1e-9, result.metrics["train_runtime"]), 1),
        "final_loss": logs[-1]["loss"] if logs else None, "final_aux_loss": logs[-1].get("aux_loss") if logs else None,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    return trainer, summary


def save_chat_checkpoint(trainer, tokenizer, out: Path) -> None:
    """Weights (LoRA merged in), tokenizer with its chat template, and a generation config, in ``out``."""
    model = trainer.model
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=False, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    if hasattr(model, "merge_and_unload"):  # LoRA: save the adapter too, then a plain model anyone can load
        trainer.save_model(str(out / "adapter"))
        merged = model.merge_and_unload()
        merged.generation_config = model.generation_config
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(out)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(str(out))


def main(argv=None) -> dict:
    # 1. Recipe: project fields, TRL's SFTConfig and ModelConfig; `pretrain` holds the first stage's overrides
    script_args, args, model_args, recipe_path, recipe = parse_recipe(
        (SFTScriptArguments, SFTConfig, ModelConfig), argv, nested={"pretrain": SFTConfig})
    check(script_args, args, model_args, recipe_path)
    state = PartialState()

    # 2. Logging: ours on the main process; TRL and transformers at warning level
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_start = time.perf_counter()
    warn_if_bf16_is_emulated(args.bf16)

    # 3. Run folder: the resolved recipe, and whether a previous run of it is there to continue
    run_dir = Path(args.output_dir)
    with state.main_process_first():
        if state.is_main_process:
            resuming = prepare_run_dir(run_dir, recipe, script_args.resume,
                                       RECIPE_HEADER.format(path=run_dir / "recipe.yaml"))
            logger.info("run folder %s (%s)", run_dir, "continuing" if resuming else "new run")

    # 4. Data: build the mixture if missing, then tokenize and pack (cached under data_dir/tokenized)
    data_dir = Path(script_args.data_dir)
    with state.main_process_first():
        ensure_built(data_dir, script_args.data_recipe, "sft")
        tokenizer = load_tokenizer(script_args.tokenizer_path or model_args.model_name_or_path
                                   or data_dir / "tokenizer", args.chat_template_path,
                                   args.trust_remote_code)
        skipped = SkipReport("sft tokenization")
        conversations = load_from_disk(str(data_dir / "sft"))
        rows = {"sft": tokenize_for_sft(conversations, tokenizer, args.max_length, packing=args.packing,
                                        overlong=script_args.overlong, cache_dir=data_dir / "tokenized", report=skipped)}
        if script_args.pretrain:
            rows["pretrain"] = rows["sft"]
            if script_args.pretrain_domains:
                wanted = set(script_args.pretrain_domains)
                have = set(conversations.unique("domain"))
                if wanted - have:  # a misspelt domain would otherwise select fewer rows, or none
                    raise RecipeError(f"{recipe_path}: pretrain_domains: {sorted(wanted - have)} not in the data's "
                                      f"domains {sorted(have)} ({data_dir}/sft; on the command line: "
                                      "--pretrain_domains math code)")
                subset = conversations.filter(lambda d: d in wanted, input_columns="domain")
                rows["pretrain"] = tokenize_for_sft(subset, tokenizer, args.max_length, packing=args.packing,
                                                    overlong=script_args.overlong, cache_dir=data_dir / "tokenized")
    for name, stage_rows in rows.items():
        logger.info("%s: %d rows of <= %d tokens", name, len(stage_rows), args.max_length)

    # 5. Stages: optional pretraining (loss on every token), then SFT (loss as the recipe says: replies only)
    stages = {}
    if script_args.pretrain:
        stages["pretrain"] = stage_args(args, "pretrain", {"assistant_only_loss": False, **script_args.pretrain})
    stages["sft"] = stage_args(args, "sft")
    summaries, model, trainer = {}, None, None
    for i, (name, stage) in enumerate(stages.items()):
        previous = Path(list(stages.values())[i - 1].output_dir) / "final" if i else None
        done = stage_done(stage.output_dir)
        if done and script_args.resume:
            summaries[name] = done
            logger.info("%s: already done (%s steps)", name, done["steps"])
            continue
        # 6. Model: fresh or pretrained, or the previous stage's result; LoRA if asked
        model = (load_causal_lm(previous, model_args.dtype, args.trust_remote_code, tokenizer) if previous
                 else load_model(script_args, model_args, tokenizer, args.seed, args.trust_remote_code))
        mark_moe_as_zero3_leaf(model)
        stage_rows = rows[name] if stage.assistant_only_loss else loss_on_every_token(rows[name])
        trainer, summaries[name] = run_stage(name, stage, model, tokenizer, stage_rows, run_dir,
                                             get_peft_config(model_args), script_args.resume)
        # 7. Save: the last stage's result is the chat checkpoint, earlier ones feed the next stage
        if name == "sft":
            save_chat_checkpoint(trainer, tokenizer, run_dir)
        else:
            trainer.save_model(str(Path(stage.output_dir) / "final"))
        if state.is_main_process:
            mark_stage_done(stage.output_dir, summaries[name])
        state.wait_for_everyone()
    if not state.is_main_process:
        return {}

    # 8. Evaluate the saved checkpoint (loaded back as a user would), then the model card and the loss curve
    chat_model = load_causal_lm(run_dir, "float32", args.trust_remote_code, tokenizer)
    evaluation = quick_eval.evaluate(chat_model, tokenizer, data_dir, script_args.eval_math, script_args.eval_safety,
                                     script_args.eval_batch_size, script_args.eval_max_new_tokens)
    records = read_metrics(run_dir / "metrics.jsonl")
    for name, summary in summaries.items():
        summary["final_loss"] = final_loss(records, name) or summary.get("final_loss")
    result = {"stages": summaries, "eval": evaluation, "wall_seconds": round(time.perf_counter() - run_start, 1),
              "skipped_overlong": skipped.total_skipped}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    plot_loss_curve(records, run_dir / "loss_curve.png", title=f"SFT {run_dir.name}")
    model_card.write(run_dir, recipe=recipe, stages=summaries, evaluation=evaluation,
                     data_report=model_card.data_report(data_dir), parameters=parameters(chat_model),
                     architecture=type(chat_model).__name__, base=model_args.model_name_or_path)
    logger.info("done in %.0f s: %s", result["wall_seconds"], quick_eval.headline(evaluation))
    return result


if __name__ == "__main__":
    main()
