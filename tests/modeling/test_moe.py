"""DeepSeekMoE: routing rules and the three balance losses of §2.2.3 against hand-computed values."""

import pytest
import torch

from modeling import DeepseekV2ForCausalLM
from modeling.modeling_deepseek_v2 import DeepseekV2MoE, DeepseekV2MoEGate
from tests.conftest import tiny_config

# Two tokens, four experts in two groups ({0,1}, {2,3}), top-2. Token 0 -> {0,1}; token 1 -> {0,2}.
SCORES = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.3, 0.2]])
TOPK = torch.tensor([[0, 1], [0, 2]])
# f_i = N/(K T) * count_i = [2, 1, 1, 0];  P_i = mean score = [0.45, 0.2, 0.2, 0.15]
BALANCE_CASES = [
    # (alphas (α1, α2, α3), seq_aux, batch shape, token mask, expected)
    ((1, 0, 0), False, (1, 2), None, 2 * 0.45 + 0.2 + 0.2),  # Σ f_i P_i = 1.3
    ((1, 0, 0), True, (1, 2), None, 1.3),  # one sequence: same as the batch
    ((1, 0, 0), True, (2, 1), None, (1.6 + 1.4) / 2),  # per sequence, averaged
    ((1, 0, 0), False, (1, 2), [True, False], 2 * 0.5 + 2 * 0.3),  # padding does not count
    ((0, 1, 0), False, (1, 2), None, 1.5 * 0.65 + 0.5 * 0.35),  # f'_d = mean f over the group, P'_d = Σ P
    ((0, 0, 1), False, (1, 2), None, 1.0 * 0.65 + 0.5 * 0.35),  # f''_d = D/(M T) * tokens sent to d, M = 2
    ((1, 1, 1), False, (1, 2), None, 1.3 + 1.15 + 0.825),
]


@pytest.mark.parametrize("alphas,seq_aux,shape,mask,expected", BALANCE_CASES)
def test_balance_losses_match_hand_computed(alphas, seq_aux, shape, mask, expected):
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2, seq_aux=seq_aux,
                      aux_loss_alpha=alphas[0], device_aux_loss_alpha=alphas[1], comm_aux_loss_alpha=alphas[2])
    gate = DeepseekV2MoEGate(cfg)
    token_mask = None if mask is None else torch.tensor(mask)
    loss = gate.balance_loss(SCORES, TOPK, shape, token_mask)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_no_balance_loss_when_all_alphas_are_zero():
    gate = DeepseekV2MoEGate(tiny_config(aux_loss_alpha=0.0))
    assert gate.balance_loss(SCORES, TOPK, (1, 2), None) is None


def test_training_loss_includes_balance_loss_and_its_gradient_reaches_the_gate():
    cfg = tiny_config(aux_loss_alpha=0.01, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                      device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02)
    model = DeepseekV2ForCausalLM(cfg).train()
    ids = torch.randint(3, 300, (2, 24))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(lm_loss.item() + out.aux_loss.item(), rel=1e-5)
    out.aux_loss.backward()
    gates = [m.weight for m in model.modules() if isinstance(m, DeepseekV2MoEGate)]
    assert gates and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    model.eval()
    assert model(ids).aux_loss is None  # inference computes no balance loss


def _expert_by_hand(experts, e, x):
    gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
    return experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)


def _moe_by_hand(moe, x, weights_rule):
    scores = torch.softmax(x @ moe.gate.weight.T, dim=-1)
    w, idx = scores.topk(moe.top_k, dim=-1)
    w = weights_rule(w)
    out = moe.shared_experts(x) if moe.shared_experts is not None else torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            out[t] += w[t, j] * _expert_by_hand(moe.experts, idx[t, j], x[t])
    return out


@pytest.mark.parametrize(
    "norm_topk_prob,scale,rule",
    [
        # official: normalise the top-k weights and do NOT scale (transformers scales; vLLM does both)
        (True, 16.0, lambda w: w / w.sum(-1, keepdim=True)),
        (False, 16.0, lambda w: w * 16.0),
        (False, 1.0, lambda w: w),
    ],
)
def test_topk_weights_follow_the_official_rule(norm_topk_prob, scale, rule):
    cfg = tiny_config(norm_topk_prob=norm_topk_prob, routed_scaling_factor=scale, num_experts_per_tok=3)
    moe = DeepseekV2MoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 10, cfg.hidden_size)
    with torch.no_grad():
        got, _ = moe(x)
        want = _moe_by_hand(moe, x[0], rule)
    assert torch.allclose(got[0], want, atol=1e-5)


def test_group_limited_routing_stays_inside_topk_group_groups():
    cfg = tiny_config(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = DeepseekV2MoEGate(cfg)
    torch.nn.init.normal_(gate.weight)
    idx, _, _ = gate(torch.randn(200, cfg.hidden_size), (1, 200), None)
    groups_per_token = torch.tensor([len(set((row // 2).tolist())) for row in idx])  # 2 experts per group
    assert groups_per_token.max().item() <= 2
    assert groups_per_token.float().mean() > 1  # tokens do use more than one group


def test_experts_without_tokens_get_no_gradient():
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=1)
    moe = DeepseekV2MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 3, cfg.hidden_size)
    used = set(moe.gate(x.view(3, -1), (1, 3), None)[0].view(-1).tolist())
    out, _ = moe(x)
    (out * torch.randn_like(out)).sum().backward()
    grad_norm = moe.experts.gate_up_proj.grad.flatten(1).norm(dim=1)
    assert {e for e in range(8) if grad_norm[e] > 0} == used


def test_grouped_gemm_dispatch_matches_the_loop():
    """GPUs take torch._grouped_mm; it runs on CPU too, so check both paths agree here."""
    from modeling.modeling_deepseek_v2 import DeepseekV2Experts

    experts = DeepseekV2Experts(tiny_config())
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    counts = torch.tensor([5, 0, 3, 7, 0, 1, 2, 4])
    x = torch.randn(int(counts.sum()), experts.gate_up_proj.shape[2])
    loop = experts(x, counts)
    offsets = counts.cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x, experts.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, -1)
    grouped = torch._grouped_mm(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2), offs=offsets)
    assert torch.allclose(loop, grouped, atol=1e-5)
