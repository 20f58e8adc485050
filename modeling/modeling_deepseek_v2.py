"""DeepSeek-V2 (arXiv 2405.04434) as a transformers architecture: MLA attention and DeepSeekMoE.

This file travels beside saved weights (``auto_map``): it imports only torch, transformers and the config
beside it, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works anywhere.

What differs from the two implementations people already use:
  * official remote code (deepseek-ai/DeepSeek-V2) caches full per-head K/V; transformers' DeepseekV2 caches
    the latent but re-expands the whole cache through ``kv_b_proj`` at every decode step. Here the cache holds
    only c_KV and the RoPE key (paper Table 1), and decoding uses weight absorption (§2.1.2 footnote; W_UK is
    folded into the query, W_UV applied after attention over the latent), so a decode step costs
    O(cache · (d_c + d_h^R)) per head and never rebuilds per-head K/V.
  * the expert-, device- and communication-level balance losses of §2.2.3 (α1, α2, α3) are computed and
    returned as ``aux_loss`` (added to the LM loss in training); neither reference returns them.
  * ``norm_topk_prob`` follows the official rule: normalise the top-k weights and then do *not* scale by
    ``routed_scaling_factor`` (transformers always scales and ignores the flag; vLLM normalises and scales).
  * tokens are sorted by expert and only the experts that received tokens run (a grouped GEMM on GPUs, a loop
    over the used experts on CPU). In memory the experts are stacked as transformers holds them, so its
    checkpoint conversion writes and reads the official per-expert names and PEFT's MoE LoRA applies.

Numerical details that match the official code: RoPE rotates interleaved pairs (2i, 2i+1) of the rope slice;
the q_a / kv_a RMSNorms use eps 1e-6 whatever ``rms_norm_eps`` says; with YaRN the softmax scale is
q_head_dim^-0.5 · mscale(f, mscale_all_dim)² and cos/sin carry mscale(f, mscale) / mscale(f, mscale_all_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    MoeCausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_deepseek_v2 import DeepseekV2Config

LATENT_NORM_EPS = 1e-6  # official code builds the q_a / kv_a RMSNorms with their default eps

# transformers applies its per-expert <-> stacked conversion for "deepseek_v2" only to its own classes unless the
# mapping is registered by the user; ours hold experts in the same stacked layout, so register the same mapping.
register_checkpoint_conversion_mapping(
    "deepseek_v2", get_checkpoint_conversion_mapping("deepseek_v2"), overwrite=True
)


class DeepseekV2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


# ----------------------------------------------------------------------------------------------------------
# Rotary embeddings (with YaRN, as in the official DeepseekV2YarnRotaryEmbedding)
# ----------------------------------------------------------------------------------------------------------


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_pos: int, beta_fast: float, beta_slow: float):
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max_pos)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max_pos)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    return freq_inter * (1 - extrapolation) + freq_extra * extrapolation


class DeepseekV2RotaryEmbedding(nn.Module):
    """cos/sin for the decoupled RoPE slice (d_h^R dims), in the official de-interleaved layout."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        config = self.config
        rope = config.rope_parameters or {}
        dim, base = config.qk_rope_head_dim, rope.get("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "yarn":
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
        factor = rope["factor"]
        inv_freq = yarn_inv_freq(
            dim,
            base,
            factor,
            rope.get("original_max_position_embeddings", config.max_position_embeddings),
            rope.get("beta_fast", 32),
            rope.get("beta_slow", 1),
        )
        scaling = yarn_get_mscale(factor, rope.get("mscale", 1)) / yarn_get_mscale(factor, rope.get("mscale_all_dim", 0))
        return inv_freq, scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [b, s, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` [b, heads, s, d]; the result is in de-interleaved order
    (evens then odds), as in the official code. q and k get the same order, so q·k is unchanged."""
    b, h, s, d = x.shape
    x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------
# The latent cache
# ----------------------------------------------------------------------------------------------------------

CACHE_SLACK_TOKENS = 256  # room reserved past the last token, so decode steps append in place


class LatentCacheLayer(DynamicLayer):
    """One layer's cache: keys = c_KV [b, 1, n, d_c], values = RoPE key [b, 1, n, d_h^R].

    Unlike ``DynamicLayer`` (a ``torch.cat`` of the whole cache at every step), tokens are written into a buffer
    with ``CACHE_SLACK_TOKENS`` of spare room, so a decode step copies only the new token; ``keys`` / ``values``
    are views of the filled part. Anything that replaces them (crop, beam reordering) is picked up as a new
    starting point at the next update."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        buffer = self._key_buffer
        if (
            buffer is None
            or new > buffer.shape[-2]
            or buffer.shape[0] != key_states.shape[0]
            or (old and self.keys.data_ptr() != buffer.data_ptr())
        ):
            self._key_buffer = self._grow(self.keys, old, key_states, new)
            self._value_buffer = self._grow(self.values, old, value_states, new)
        self._key_buffer[:, :, old:new] = key_states
        self._value_buffer[:, :, old:new] = value_states
        self.keys = self._key_buffer[:, :, :new]
        self.values = self._value_buffer[:, :, :new]
        return self.keys, self.values

    @staticmethod
    def _grow(current, filled, incoming, needed):
        b, h, _, d = incoming.shape
        buffer = incoming.new_empty(b, h, needed + CACHE_SLACK_TOKENS, d)
        if filled:
            buffer[:, :, :filled] = current[:, :, :filled]
        return buffer


class DeepseekV2LatentCache(DynamicCache):
    """The generation cache of this model: per layer, only c_KV and the RoPE key (paper Table 1)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=LatentCacheLayer)


# ----------------------------------------------------------------------------------------------------------
# Multi-head Latent Attention (§2.1)
# ----------------------------------------------------------------------------------------------------------


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    elif query.shape[2] > 1:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    return torch.matmul(attn_weights, value).transpose(1, 2).contiguous(), attn_weights


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.q_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.is_causal = True
        self.num_key_value_groups = 1  # the expanded path is plain multi-head attention
        self.attention_dropout = config.attention_dropout
        hidden, heads, bias = config.hidden_size, self.num_heads, config.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV2RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV2RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=bias)

        self.softmax_scale = self.q_head_dim**-0.5
        rope = config.rope_parameters or {}
        if rope.get("rope_type", "default") == "yarn" and rope.get("mscale_all_dim"):
            mscale = yarn_get_mscale(rope["factor"], rope["mscale_all_dim"])
            self.softmax_scale = self.softmax_scale * mscale * mscale

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        bsz, q_len, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(bsz, q_len, self.num_heads, self.q_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        c_kv = self.kv_a_layernorm(latent).view(bsz, 1, q_len, self.kv_lora_rank)
        k_pe = k_pe.reshape(bsz, 1, q_len, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        q_pe = apply_rotary_pos_emb(q_pe, cos, sin)
        k_pe = apply_rotary_pos_emb(k_pe, cos, sin)

        # The cache stores one "head" per layer: keys = c_KV, values = the RoPE key (paper Table 1).
        # Decoding attends over the latent cache (absorbed) where that is the fewer multiply-adds; a pass with
        # gradients (training against a cached prefix: GRPO's shared prompts) expands it, whose backward is the
        # cheaper one.
        cached = past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0
        if past_key_values is not None:
            c_kv, k_pe = past_key_values.update(c_kv, k_pe, self.layer_idx)
        absorbed = cached and not torch.is_grad_enabled() and self._absorbing_is_cheaper(q_len, c_kv.shape[2])
        if absorbed:
            out = self._absorbed_attention(q_nope, q_pe, c_kv, k_pe, attention_mask)
        else:
            out = self._expanded_attention(q_nope, q_pe, c_kv, k_pe, attention_mask, **kwargs)
        return self.o_proj(out.reshape(bsz, q_len, self.num_heads * self.v_head_dim))

    def _absorbing_is_cheaper(self, q_len: int, kv_len: int) -> bool:
        """Multiply-adds of both paths for ``q_len`` queries over ``kv_len`` cached positions (per sequence):
        expanding runs kv_b_proj over the cache then attention at the head sizes; absorbing moves the queries
        into the latent space (W_UK), attends there at width d_c and maps back (W_UV). One decoded token: absorb
        (kv_b_proj over the whole cache is the cost); many queries against a short cache, e.g. a no-grad pass over
        completions after a shared prompt: expand (4 heads x d_c 512 per score costs more than expanding)."""
        h, d_c, nope, rope, v = self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, \
            self.v_head_dim
        expanded = kv_len * d_c * h * (nope + v) + h * q_len * kv_len * (nope + rope + v)
        absorbed = h * q_len * d_c * (nope + v) + h * q_len * kv_len * (2 * d_c + rope)
        return absorbed < expanded

    def _expanded_attention(self, q_nope, q_pe, c_kv, k_pe, attention_mask, **kwargs):
        """Prefill / training: expand c_KV to per-head K/V once and run standard attention."""
        bsz, _, kv_len, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(bsz, kv_len, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        query = torch.cat((q_nope, q_pe), dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        attention_interface = eager_attention_forward
        if self.config._attn_implementation not in (None, "eager"):
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            if self.v_head_dim < self.q_head_dim:
                # fused kernels (SDPA's flash path on CPU, flash-attn) want one head size for q, k and v:
                # zero-pad v and drop the padding after (≈20% faster fwd+bwd than the unfused path here)
                value = F.pad(value, (0, self.q_head_dim - self.v_head_dim))
        out, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.softmax_scale,
            **kwargs,
        )
        return out[..., : self.v_head_dim]  # [b, q, heads, v]

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, nope, d_c] and W_UV [heads, v, d_c] from kv_b_proj (also when PEFT wraps it)."""
        if type(self.kv_b_proj) is nn.Linear:
            w = self.kv_b_proj.weight
        else:  # an adapter-wrapped linear: its effective weight is its output on the identity
            eye = torch.eye(self.kv_lora_rank, dtype=self.o_proj.weight.dtype, device=self.o_proj.weight.device)
            w = self.kv_b_proj(eye).T
        w = w.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, attention_mask):
        """Decode: attend over the latent cache directly (multi-query over c_KV, one shared K/V "head").

        score = (q_nope W_UK) · c_KV + q_pe · k_pe;  out = (softmax · c_KV) W_UV^T. The heads and query positions
        are folded into one matrix so that each score term is a single batched matmul over the cache, with no
        copy of the cache (the softmax scale goes on the small query side). The weight products batch over heads
        with batch and positions as rows: broadcasting W_UK / W_UV over the batch (``matmul``) copied them once per
        sequence, every layer and token.
        """
        bsz, heads, q_len, _ = q_nope.shape
        kv_len = c_kv.shape[2]
        w_uk, w_uv = self._absorbed_weights()
        rows = q_nope.permute(1, 0, 2, 3).reshape(heads, bsz * q_len, self.qk_nope_head_dim)
        q_latent = torch.bmm(rows, w_uk) * self.softmax_scale  # [h, b·q, d_c]
        q_latent = q_latent.view(heads, bsz, q_len, -1).transpose(0, 1).reshape(bsz, heads * q_len, self.kv_lora_rank)
        q_pe = (q_pe * self.softmax_scale).reshape(bsz, heads * q_len, self.qk_rope_head_dim)
        latent, rope_key = c_kv.squeeze(1), k_pe.squeeze(1)  # [b, kv, d_c], [b, kv, d_h^R]
        scores = torch.baddbmm(torch.bmm(q_pe, rope_key.transpose(1, 2)), q_latent, latent.transpose(1, 2))
        scores = scores.view(bsz, heads, q_len, kv_len)
        mask = attention_mask
        if mask is None and q_len > 1:  # causal with an offset: query i sees keys <= kv_len - q_len + i
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=c_kv.device).tril(kv_len - q_len)[None, None]
        if mask is not None:
            mask = mask[..., -q_len:, :]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        out_latent = torch.bmm(probs.view(bsz, heads * q_len, kv_len), latent)  # [b, h·q, d_c]
        rows = out_latent.view(bsz, heads, q_len, -1).transpose(0, 1).reshape(heads, bsz * q_len, self.kv_lora_rank)
        out = torch.bmm(rows, w_uv.transpose(1, 2))  # [h, b·q, v]
        return out.view(heads, bsz, q_len, -1).permute(1, 2, 0, 3)  # [b, q, h, v]


# ----------------------------------------------------------------------------------------------------------
# DeepSeekMoE (§2.2)
# ----------------------------------------------------------------------------------------------------------


class DeepseekV2MLP(nn.Module):
    def __init__(self, config: DeepseekV2Config, intermediate_size: int | None = None):
        super().__init__()
        hidden, inter = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekV2MoEGate(nn.Module):
    """Softmax router in fp32 with greedy or group-limited (device-limited, §2.2.2) top-k, plus the balance
    losses of §2.2.3. Devices are simulated as the ``n_group`` expert groups."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, batch_shape: tuple[int, int], token_mask: torch.Tensor | None):
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1)  # [T, E], fp32
        if self.config.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.n_experts // self.n_group).max(dim=-1).values
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
            expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1)
            topk_weight, topk_idx = scores.masked_fill(~expert_mask, 0.0).topk(self.top_k, dim=-1, sorted=False)
        else:
            topk_weight, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.config.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * self.config.routed_scaling_factor

        aux_loss = None
        if self.training and torch.is_grad_enabled():
            aux_loss = self.balance_loss(scores, topk_idx, batch_shape, token_mask)
        return topk_idx, topk_weight, aux_loss

    def balance_loss(self, scores, topk_idx, batch_shape, token_mask) -> torch.Tensor | None:
        """Σ over the three levels of §2.2.3 (eqs. 12-19), each scaled by its α; None when all α are 0."""
        cfg, n_exp, k = self.config, self.n_experts, self.top_k
        bsz, seq_len = batch_shape
        valid = torch.ones(scores.shape[0], device=scores.device) if token_mask is None else token_mask.float()
        selected = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0) * valid[:, None]  # [T, E] 1(t -> i)
        probs = scores * valid[:, None]
        total = scores.new_zeros(())
        used = False
        if cfg.aux_loss_alpha > 0:
            used = True
            if cfg.seq_aux:  # per sequence, then averaged (official ``seq_aux``)
                n_tok = valid.view(bsz, seq_len).sum(1).clamp(min=1)  # [b]
                f = selected.view(bsz, seq_len, n_exp).sum(1) * n_exp / (k * n_tok[:, None])
                p = probs.view(bsz, seq_len, n_exp).sum(1) / n_tok[:, None]
                total = total + cfg.aux_loss_alpha * (f * p).sum(-1).mean()
            else:
                n_tok = valid.sum().clamp(min=1)
                f = selected.sum(0) * n_exp / (k * n_tok)
                p = probs.sum(0) / n_tok
                total = total + cfg.aux_loss_alpha * (f * p).sum()
        if self.n_group > 1 and (cfg.device_aux_loss_alpha > 0 or cfg.comm_aux_loss_alpha > 0):
            used = True
            n_tok = valid.sum().clamp(min=1)
            per_device = n_exp // self.n_group
            f = selected.sum(0) * n_exp / (k * n_tok)  # f_i over the batch
            p_dev = (probs.sum(0) / n_tok).view(self.n_group, per_device).sum(-1)  # P'_d = P''_d = Σ_{j∈E_d} P_j
            if cfg.device_aux_loss_alpha > 0:
                f_dev = f.view(self.n_group, per_device).mean(-1)  # f'_d
                total = total + cfg.device_aux_loss_alpha * (f_dev * p_dev).sum()
            if cfg.comm_aux_loss_alpha > 0:
                sent = selected.view(-1, self.n_group, per_device).amax(-1)  # 1(token t is sent to device d)
                f_comm = sent.sum(0) * self.n_group / (self.topk_group * n_tok)  # f''_d, M = topk_group
                total = total + cfg.comm_aux_loss_alpha * (f_comm * p_dev).sum()
        return total if used else None


class DeepseekV2Experts(nn.Module):
    """The routed experts as two stacked weights, laid out as transformers' DeepseekV2 holds them in memory
    (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]). transformers' checkpoint conversion for
    ``deepseek_v2`` maps them to and from the official per-expert names (``experts.{j}.gate_proj.weight``, ...)
    at load and save, and PEFT targets them as parameters (LoRA on experts)."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        n, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x_sorted``: token copies grouped by expert, ``counts[e]`` rows for expert e, in expert order."""
        if x_sorted.is_cuda:  # one grouped GEMM per projection
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, -1)
            return torch._grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        # CPU: a loop over the experts that received tokens; as fast as grouped_mm here, fwd + bwd.
        # unbind() and split() keep one autograd node per weight and for the input instead of one full-size
        # gradient per expert slice (a slice's backward zero-fills the whole input).
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        sizes = counts.tolist()
        outputs = []
        for e, x in enumerate(x_sorted.split(sizes)):
            if sizes[e]:
                gate, up = F.linear(x, gate_up[e]).chunk(2, -1)
                outputs.append(F.linear(self.act_fn(gate) * up, down[e]))
        return torch.cat(outputs) if outputs else x_sorted.new_zeros(0, self.down_proj.shape[1])


class DeepseekV2MoE(nn.Module):
    """Shared experts + fine-grained routed experts; each token runs only through the experts it chose."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = DeepseekV2Experts(config)
        self.gate = DeepseekV2MoEGate(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekV2MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        bsz, seq_len, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        topk_idx, topk_weight, aux_loss = self.gate(x, (bsz, seq_len), token_mask)

        # Sort the (token, slot) pairs by expert so that each expert sees one contiguous slice.
        flat_expert = topk_idx.reshape(-1)
        order = flat_expert.argsort()
        counts = torch.bincount(flat_expert, minlength=self.experts.num_experts)
        token_of = order // self.top_k
        routed = self.experts(x[token_of], counts)
        routed = routed * topk_weight.reshape(-1)[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, routed)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(bsz, seq_len, hidden), aux_loss


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------


def is_moe_layer(config: DeepseekV2Config, layer_idx: int) -> bool:
    return bool(
        config.n_routed_experts
        and layer_idx >= config.first_k_dense_replace
        and layer_idx % config.moe_layer_freq == 0
    )


class DeepseekV2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekV2Attention(config, layer_idx)
        self.is_moe = is_moe_layer(config, layer_idx)
        self.mlp = DeepseekV2MoE(config) if self.is_moe else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        position_embeddings,
        attention_mask=None,
        past_key_values=None,
        token_mask=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        aux_loss = None
        if self.is_moe:
            hidden_states, aux_loss = self.mlp(hidden_states, token_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, aux_loss


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    config: DeepseekV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Every head class lives in the modeling file that travels with the weights, so name them all.
        module = "modeling_deepseek_v2"
        self.config.auto_map = {
            "AutoConfig": "configuration_deepseek_v2.DeepseekV2Config",
            "AutoModel": f"{module}.DeepseekV2Model",
            "AutoModelForCausalLM": f"{module}.DeepseekV2ForCausalLM",
            "AutoModelForSequenceClassification": f"{module}.DeepseekV2ForSequenceClassification",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, DeepseekV2MoEGate):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekV2Experts):
            module.gate_up_proj.normal_(mean=0.0, std=std)
            module.down_proj.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekV2RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DeepseekV2RotaryEmbedding):  # non-persistent: rebuilt after a meta-device load
            module.inv_freq.copy_(module.compute_inv_freq()[0])


@dataclass
class DeepseekV2ModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.FloatTensor | None = None


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DeepseekV2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ) -> DeepseekV2ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DeepseekV2Model: pass exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DeepseekV2LatentCache()
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        bsz, q_len = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + q_len, device=inputs_embeds.device)
            if attention_mask is not None and attention_mask.dim() == 2:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = position_ids.unsqueeze(0).expand(bsz, -1)

        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            # an empty cache adds nothing to the mask, and transformers only detects packed rows (position_ids
            # restarting at 0, no attention_mask) when no cache is passed
            past_key_values=past_key_values if past_seen > 0 else None,
            position_ids=position_ids,
        )
        token_mask = None  # which tokens count for the balance losses (padding does not)
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -q_len:].reshape(-1).bool()

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        aux_loss = None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, layer_aux = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                past_key_values=past_key_values,
                token_mask=token_mask,
                **kwargs,
            )
            if layer_aux is not None:
                aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return DeepseekV2ModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
            aux_loss=aux_loss,
        )


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() builds a DynamicCache (torch.cat per step); use the latent cache unless the caller chose one.
        user_cache = model_kwargs.get("past_key_values") is not None
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if not user_cache and type(model_kwargs.get("past_key_values")) is DynamicCache:
            model_kwargs["past_key_values"] = DeepseekV2LatentCache()

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


class DeepseekV2ForSequenceClassification(DeepseekV2PreTrainedModel):
    """Scalar (or ``num_labels``) head on the last real token: the reward-model architecture (§4.2)."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepseekV2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        bsz, seq_len = logits.shape[:2]
        positions = torch.arange(seq_len, device=logits.device)
        if attention_mask is not None and attention_mask.dim() == 2:  # rightmost real token, any padding side
            last = (positions * attention_mask[:, -seq_len:].to(logits.device)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last = (positions * (input_ids != self.config.pad_token_id).to(logits.device)).argmax(-1)
        else:
            last = torch.full((bsz,), seq_len - 1, device=logits.device)
        pooled = logits[torch.arange(bsz, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )


__all__ = [
    "DeepseekV2LatentCache",
    "DeepseekV2PreTrainedModel",
    "DeepseekV2Model",
    "DeepseekV2ForCausalLM",
    "DeepseekV2ForSequenceClassification",
]
