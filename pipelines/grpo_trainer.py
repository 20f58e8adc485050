"""GRPO's policy update: the policy (prepared by accelerate: DDP over N processes, or sharded with FSDP2), its
optimizer and schedule, the frozen reference, the μ clipped-objective steps on a rollout's batch (``grpo_loss.py``),
and their checkpoint.

With N processes each trains on every N-th row (every N-th group with ``share_prompts``) of the global batch in
length order, each chunk weighted by its share of the global batch, so the update is the one a single process makes
(``update``). With ``fsdp`` the policy, its gradients and optimizer state and the reference are split over the
processes (``shard``); the sampler, the checks and the saves get the gathered weights (``full_model``)."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import random
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from .config import RecipeError
from .grpo_config import GRPOArguments, StageConfig, lr_factor
from .grpo_loss import group_chunks, policy_loss, process_chunks, sequence_logprobs, shared_prompt_logprobs
from .models import load_causal_lm
from .rollout import Batch

logger = logging.getLogger("grpo")


def make_accelerator() -> Accelerator:
    """One process, or one of those ``accelerate launch`` started (DDP; gloo on CPUs). Mixed precision stays off
    here: the recipe's ``bf16`` turns on autocast in the training passes, the one switch for it."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def check_launch(accelerator: Accelerator, stages: dict[str, StageConfig], use_peft: bool = False,
                 fsdp: bool = False) -> None:
    """What GRPO cannot do under this launch or with LoRA, as errors that say what to do instead."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise RecipeError(f"GRPO under accelerate's {accelerator.distributed_type.value} config: GRPO shards the "
                          "policy itself; launch with `accelerate launch --multi_gpu --num_processes N` (or "
                          "--config_file recipes/accelerate/ddp.yaml) and set `fsdp: true` in the recipe (FSDP2)")
    if fsdp and use_peft:
        raise RecipeError("fsdp with use_peft: LoRA adapters are small enough to train under DDP; set fsdp: false")
    for name, cfg in stages.items():
        if accelerator.num_processes > 1 and cfg.retrain_reward_model:
            raise RecipeError(f"{name}.retrain_reward_model: retraining a reward model between iterations runs in "
                              "one process only; launch without accelerate or drop retrain_reward_model")
        if use_peft and cfg.iterations > 1:
            raise RecipeError(f"{name}: iterative RL resets the reference to the policy, but with use_peft the "
                              "reference is the base model (adapters disabled); set iterations: 1 or use_peft false")


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter")


def with_adapters(model, args: GRPOArguments):
    """The policy with fresh LoRA adapters (peft), the base weights frozen."""
    from peft import get_peft_model

    model = get_peft_model(model, args.lora_config("CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d: %d trainable parameters of %d", args.lora_r, trainable,
                sum(p.numel() for p in model.parameters()))
    return model


def shard(model, device: torch.device) -> None:
    """FSDP2 (torch's ``fully_shard``, in place): each decoder layer (the model's ``_no_split_modules``) one unit
    whose parameters, gradients and optimizer state are split over the processes and all-gathered for its forward
    and backward; embeddings, norm and head the root unit. accelerate's FSDP wrapping exists only for GPU launches
    (it never sets FSDP for CPU processes), so GRPO shards here, the same way over gloo (CPUs) and NCCL (GPUs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def load_policy(path, args: GRPOArguments, accelerator: Accelerator, tokenizer):
    """The policy for this process, on its device. Sharded (``fsdp`` with several processes) the main process loads
    it on the CPU and the others build it on the meta device: ``PolicyTrainer`` gives each its shards of the main
    process's weights (host memory for one whole copy a process, not two or three)."""
    if not (args.fsdp and accelerator.num_processes > 1):
        return load_causal_lm(path, "float32", args.trust_remote_code, tokenizer).to(accelerator.device)
    if accelerator.is_main_process:
        return load_causal_lm(path, "float32", args.trust_remote_code, tokenizer)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=args.trust_remote_code)


def gather(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s full state dict on CPU: a sharded model's tensors all-gathered one at a time (a collective: every
    process calls it), a plain model's own. ``keep=False``: take part in the gathers, keep nothing."""
    whole = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            whole[name] = t.detach().cpu()
    return whole


class PolicyTrainer:
    """``policy``: what trains (DDP-wrapped or FSDP2-sharded with several processes); ``model``: the module itself,
    for no-grad passes; ``full_model()``: the module with whole weights, for sampling, syncs, checks and saves;
    ``reference``: a frozen copy (none with β = 0; with LoRA the policy with its adapters disabled).
    ``whole_weights=False`` (sharded, a process that neither samples locally nor saves: the non-main processes of a
    ``vllm_server`` run): no whole copy is kept; ``full_model()`` takes part in the gathers and returns the model's
    skeleton on the meta device (its config and shapes)."""

    def __init__(self, cfg: StageConfig, policy, accelerator: Accelerator | None = None, bf16: bool = False,
                 fsdp: bool = False, gradient_checkpointing: bool = False, whole_weights: bool = True):
        self.cfg, self.bf16 = cfg, bf16
        self.accelerator = accelerator = accelerator or make_accelerator()
        self.sharded = fsdp and accelerator.num_processes > 1
        self.whole_weights = whole_weights or accelerator.is_main_process or not self.sharded
        if self.sharded:
            policy, self.reference = self._sharded(policy, cfg.beta, accelerator)
        else:
            self.reference = self._frozen_copy(policy) if cfg.beta and not is_peft(policy) else None
        if gradient_checkpointing:  # each layer's activations recomputed in the backward: memory for time
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # a group's prompt computed once for its G completions (through a cache, which checkpointing turns off)
        self.share_prompts = cfg.share_prompts and not gradient_checkpointing
        if cfg.share_prompts and gradient_checkpointing:
            logger.info("share_prompts is off: gradient checkpointing runs without a key/value cache")
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      betas=(0.9, 0.95), weight_decay=0.0)
        # the scheduler stays ours: accelerate's would step once per process per optimizer step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
        if self.sharded:
            self.policy = self.model = policy
            self.optimizer = optimizer
        else:
            self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
            self.model = accelerator.unwrap_model(self.policy)
        # what each process holds of the policy: all of it under DDP, about 1/N sharded
        self.parameters_per_process = sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                                          for p in self.model.parameters())
        # the processes holding the whole policy: all of them under DDP; sharded, those that keep the sampler's copy
        mine = torch.tensor([float(self.whole_weights)], device=accelerator.device)
        self.whole_copies = int(accelerator.reduce(mine, "sum").item()) if accelerator.num_processes > 1 else 1

    def _sharded(self, policy, beta: float, accelerator: Accelerator):
        """The policy and the reference as FSDP2 shards of the main process's weights. Both are built on the meta
        device, sharded, then filled from the main process's copy (broadcast shard by shard, buffers too), so no
        process holds more than one whole copy: ``full``, the sampler's, refreshed by ``full_model()``. The other
        processes may get ``policy`` on the meta device (``load_policy``): their copy is allocated here."""
        main, device = accelerator.is_main_process, accelerator.device
        on_meta = next(policy.parameters()).is_meta
        if not self.whole_weights:
            self.full = policy if on_meta else policy.to("meta")
        else:
            self.full = copy.deepcopy(policy).to_empty(device="cpu") if on_meta else policy.cpu()
        models = []
        for _ in range(2 if beta else 1):
            with torch.device("meta"):
                model = type(policy)._from_config(policy.config, dtype=torch.float32)
            shard(model, device)
            model.to_empty(device=device)
            set_model_state_dict(model, dict(policy.state_dict()) if main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            with torch.no_grad():
                for name, buffer in model.named_buffers():  # non-persistent ones (rotary tables) are in no state dict
                    if main:
                        buffer.copy_(policy.get_buffer(name))
                    dist.broadcast(buffer, src=0)
                    if on_meta and self.whole_weights:
                        self.full.get_buffer(name).copy_(buffer)
            models.append(model)
        reference = None
        if beta:
            reference = models[1].eval()
            reference.requires_grad_(False)
        return models[0], reference

    def full_model(self):
        """The policy with its whole weights (the module itself unless sharded; then a collective)."""
        if not self.sharded:
            return self.model
        whole = self.full.state_dict()
        with torch.no_grad():  # one tensor at a time into the copy: no second whole copy in memory
            for name, t in self.model.state_dict().items():
                t = t.full_tensor() if isinstance(t, DTensor) else t
                if self.whole_weights:
                    whole[name].copy_(t)
        return self.full

    def reset_reference(self) -> None:
        """π_ref ← π_θ (between iterations of iterative RL; the trainer starts with a copy of the policy)."""
        if self.reference is not None:
            with torch.no_grad():
                for ref, p in zip(self.reference.parameters(), self.model.parameters(), strict=True):
                    ref.copy_(p)

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # -- the update ----------------------------------------------------------------------------------------------
    def _forward(self, model, batch: Batch, rows, with_entropy: bool = True):
        ids_p = [batch.prompt_ids[i] for i in rows]
        ids_c = [batch.completion_ids[i] for i in rows]
        device = next(model.parameters()).device
        width = batch.sampler_logprobs.shape[1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.share_prompts:
                return shared_prompt_logprobs(model, ids_p, ids_c, self.cfg.temperature, width, with_entropy)
            return sequence_logprobs(model, ids_p, ids_c, self.cfg.temperature, len(rows), width, with_entropy)

    def _scatter(self, model, batch: Batch, chunks: list[list[int]]) -> torch.Tensor:
        """Per-token log-probs of the chunks' completions under ``model`` (no grad), rows in the batch's order. An
        empty chunk (sharded: every process runs as many forwards, each an all-gather) runs row 0 and is dropped."""
        out = torch.zeros_like(batch.sampler_logprobs)
        for rows in chunks:
            logp = self._forward(model, batch, rows or [0], with_entropy=False)[0]
            if rows:
                out[rows] = logp.to(out.device)
        return out

    def _grad_sync(self, on: bool):
        """Gradients are reduced across processes only after a step's last chunk."""
        if self.sharded:
            self.policy.set_requires_gradient_sync(on)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if on else self.accelerator.no_sync(self.policy)

    def _reference_logprobs(self, batch: Batch, chunks: list[list[int]]) -> torch.Tensor:
        if self.reference is not None:
            return self._scatter(self.reference, batch, chunks)
        with self.model.disable_adapter():  # LoRA: the frozen base model is the reference
            return self._scatter(self.model, batch, chunks)

    def update(self, batch: Batch) -> dict:
        """μ optimizer steps on the step's global batch. Each process trains on its share of the rows (every N-th
        in length order; whole groups when their prompt is shared); each chunk's loss is weighted by its share of
        the global batch (its completions, or its tokens for the token-level mean) and DDP averages gradients over
        N, so the loss is scaled by N: the update is the one a single process would make. Every process runs the
        same number of chunks (a process short of rows runs one with weight 0), as DDP's gradient all-reduce
        needs."""
        cfg, acc = self.cfg, self.accelerator
        n = len(batch.completion_ids)
        chunks = (group_chunks if self.share_prompts else process_chunks)(
            batch.prompt_ids, batch.completion_ids, cfg.mini_batch_size, acc.process_index, acc.num_processes)
        tokens = [len(c) for c in batch.completion_ids]
        total_tokens = max(1, sum(tokens))
        real = chunks if self.sharded else [rows for rows in chunks if rows]
        old = ref = None
        if cfg.num_iterations > 1 or cfg.beta:
            with torch.no_grad():
                if cfg.num_iterations > 1:
                    old = self._scatter(self.model, batch, real)
                if cfg.beta:
                    ref = self._reference_logprobs(batch, real)
        totals: dict[str, float] = {}
        self.policy.train()
        for _ in range(cfg.num_iterations):
            for k, rows in enumerate(chunks):
                empty, rows = not rows, rows or [0]  # a padding chunk: row 0 with weight 0
                with self._grad_sync(k == len(chunks) - 1):
                    logp, mask, entropy, aux = self._forward(self.policy, batch, rows)
                    old_rows = old[rows] if old is not None else logp.detach()
                    loss, m = policy_loss(
                        logp, old_rows, batch.advantages[rows].to(logp.device), mask,
                        ref_logp=ref[rows] if ref is not None else None, beta=cfg.beta, epsilon=cfg.epsilon,
                        epsilon_high=cfg.epsilon_high, aggregation=cfg.loss_aggregation, max_tokens=cfg.max_new_tokens,
                        sampler_logp=batch.sampler_logprobs[rows].to(logp.device), importance_cap=cfg.importance_cap)
                    # each chunk's share of the global batch loss: of its tokens for the token-level mean (chunks
                    # hold completions of similar length, so their token counts differ), of its completions otherwise
                    share = 0.0 if empty else (sum(tokens[i] for i in rows) / total_tokens
                                               if cfg.loss_aggregation == "token" else len(rows) / n)
                    weight = share / cfg.num_iterations
                    balance = aux * (0 if empty else len(rows)) / n / cfg.num_iterations if aux is not None else 0.0
                    acc.backward((loss * weight + balance) * acc.num_processes)
                gap = ((old_rows - batch.sampler_logprobs[rows].to(logp.device)).abs() * mask).sum() / mask.sum()
                for key, value in {**m, "loss": loss.item(), "entropy": entropy,
                                   "aux_loss": aux.item() if aux is not None else 0.0,
                                   "sampler_logprob_gap": gap.item()}.items():
                    totals[key] = totals.get(key, 0.0) + value * weight
            if self.sharded:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm).full_tensor()
            else:
                grad_norm = acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            totals["grad_norm"] = grad_norm.item()
        if acc.num_processes > 1:  # each process summed its chunks' weighted metrics: the global means
            keys = sorted(k for k in totals if k != "grad_norm")
            summed = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device), "sum")
            totals.update(zip(keys, summed.tolist()))
        totals["learning_rate"] = self.scheduler.get_last_lr()[0]
        totals["policy_parameters_per_process"] = self.parameters_per_process
        totals["processes_with_whole_weights"] = self.whole_copies
        return totals

    def save(self, folder: Path) -> None:
        """Weights (the adapter with LoRA), optimizer, scheduler, RNG and the reference into ``folder``. Every
        process calls it (a sharded policy is gathered); the main process writes."""
        main = self.accelerator.is_main_process
        model = self.full_model()
        gathers = self.reference is not None and (main or self.sharded)
        reference = gather(self.reference, keep=main) if gathers else None
        optimizer = (get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)) if self.sharded else self.optimizer.state_dict())
        if not main:
            return
        model.save_pretrained(folder)
        torch.save(optimizer, folder / "optimizer.pt")
        torch.save({"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "python_rng": random.getstate()}, folder / "trainer.pt")
        if reference is not None:
            model.save_pretrained(folder / "reference", state_dict=reference)

    def load(self, folder: Path) -> None:
        """Sharded, only the main process reads the weights and the optimizer state; each process gets its shard."""
        if is_peft(self.model):  # the checkpoint holds the adapter
            from peft import load_peft_weights, set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_peft_weights(str(folder)))
        else:  # from_pretrained applies the checkpoint conversion (our stacked experts)
            self._load_weights(self.model, folder)
        if self.reference is not None:
            self._load_weights(self.reference, folder / "reference")
        path, main = folder / "optimizer.pt", self.accelerator.is_main_process
        if self.sharded:
            optimizer = torch.load(path, weights_only=False, map_location="cpu") if main else {}
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
        else:
            self.optimizer.load_state_dict(torch.load(path, weights_only=False, map_location="cpu"))
        saved = torch.load(folder / "trainer.pt", weights_only=False, map_location="cpu")
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        random.setstate(saved["python_rng"])

    def _load_weights(self, model, folder: Path) -> None:
        if not self.sharded:
            model.load_state_dict(type(model).from_pretrained(folder).state_dict())
            return
        weights = type(self.full).from_pretrained(folder).state_dict() if self.accelerator.is_main_process else {}
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
