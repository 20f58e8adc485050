"""DeepSeek-V2 configuration (arXiv 2405.04434), with the official checkpoint's field names.

This file travels beside saved weights (``auto_map``), so it imports nothing of this project.

Field names follow the official ``config.json`` of deepseek-ai/DeepSeek-V2, so those checkpoints load as
they are. RoPE settings follow transformers 5: the legacy ``rope_theta`` / ``rope_scaling`` keys are accepted
and folded into ``rope_parameters`` (``config.rope_scaling`` still reads it), which is also what vLLM reads.

Additions over the official config (all default to "off" or to the paper's values):
  device_aux_loss_alpha  α2, device-level balance loss (§2.2.3, eq. 14-16); devices simulated as expert groups
  comm_aux_loss_alpha    α3, communication balance loss (§2.2.3, eq. 17-19)
"""

from transformers.configuration_utils import PreTrainedConfig

TOPK_METHODS = ("greedy", "group_limited_greedy")
SCORING_FUNCS = ("softmax",)


class DeepseekV2Config(PreTrainedConfig):
    model_type = "deepseek_v2"
    default_theta = 10000.0
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    # Multi-head Latent Attention (§2.1)
    q_lora_rank: int | None = 1536  # None: plain q_proj, as in V2-Lite
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (§2.2)
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001  # α1, expert-level balance
    seq_aux: bool = True
    device_aux_loss_alpha: float = 0.0  # α2
    comm_aux_loss_alpha: float = 0.0  # α3
    # The rest of a decoder
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Shared code (generation utilities, vLLM) reads these: key and value head sizes differ in MLA.
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.head_dim = self.qk_rope_head_dim
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        def bad(field, why):
            raise ValueError(f"DeepseekV2Config.{field}: {why}")

        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"{self.topk_method!r} is not one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"{self.scoring_func!r} is not supported; DeepSeek-V2 uses 'softmax'")
        if self.n_routed_experts:
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts})")
            if self.n_group and self.n_routed_experts % self.n_group:
                bad("n_group", f"{self.n_group} does not divide n_routed_experts ({self.n_routed_experts})")
            if self.topk_method == "group_limited_greedy":
                if not self.n_group or not self.topk_group:
                    bad("n_group", "group_limited_greedy routing needs n_group and topk_group")
                if self.topk_group > self.n_group:
                    bad("topk_group", f"{self.topk_group} > n_group ({self.n_group})")
                per_group = self.n_routed_experts // self.n_group
                if self.topk_group * per_group < self.num_experts_per_tok:
                    bad("topk_group", "the chosen groups hold fewer experts than num_experts_per_tok")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in ("default", "yarn"):
            bad("rope_scaling", f"type {rope_type!r} is not supported; DeepSeek-V2 uses 'yarn' or none")


__all__ = ["DeepseekV2Config"]
