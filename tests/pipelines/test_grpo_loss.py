"""GRPO's maths against values worked out by hand (DeepSeekMath §4.1; DAPO; Dr. GRPO)."""

import math

import pytest
import torch

from pipelines.grpo_loss import STD_EPS, aggregate, k3_kl, outcome_advantages, policy_loss, process_advantages


def test_outcome_advantages_normalise_inside_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    adv = outcome_advantages(rewards, group_size=4)
    # group 1: mean 0.25, sample std 0.5 -> (0.75/0.5, -0.25/0.5, ...)
    std1 = 0.5
    assert adv[:4].tolist() == pytest.approx([0.75 / (std1 + STD_EPS)] + [-0.25 / (std1 + STD_EPS)] * 3)
    std2 = math.sqrt((9 + 1 + 1 + 9) / 3)  # values 2,4,6,8: deviations -3,-1,1,3 from 5, sample std
    assert adv[4:].tolist() == pytest.approx([d / (std2 + STD_EPS) for d in (-3, -1, 1, 3)], rel=1e-5)


def test_a_group_whose_rewards_agree_gets_zero_advantage_not_nan():
    adv = outcome_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3)
    assert adv.tolist() == [0.0] * 6


def test_dr_grpo_keeps_only_the_centring():
    assert outcome_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=False).tolist() == \
        pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_groups_must_be_whole_and_of_two_or_more():
    with pytest.raises(ValueError, match="at least 2"):
        outcome_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="do not split"):
        outcome_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_process_advantages_sum_the_normalised_rewards_of_later_steps():
    # one group of two completions: A has steps ending at tokens 1 and 3 (rewards 1, 0); B one step at token 2 (1)
    step_rewards = [[1.0, 0.0], [1.0]]
    ends = [[1, 3], [2]]
    adv = process_advantages(step_rewards, ends, group_size=2, num_tokens=5)
    pooled = torch.tensor([1.0, 0.0, 1.0])
    mean, std = pooled.mean().item(), pooled.std().item()
    hi, lo = (1 - mean) / (std + STD_EPS), (0 - mean) / (std + STD_EPS)
    # A: tokens 0-1 see both steps, tokens 2-3 only the second, token 4 (after the last step) none
    assert adv[0].tolist() == pytest.approx([hi + lo, hi + lo, lo, lo, 0.0], rel=1e-5)
    assert adv[1].tolist() == pytest.approx([hi, hi, hi, 0.0, 0.0], rel=1e-5)


def test_process_advantages_of_a_uniform_group_are_zero():
    adv = process_advantages([[1.0, 1.0], [1.0]], [[0, 1], [1]], group_size=2, num_tokens=3)
    assert adv.abs().max().item() == 0.0


def test_k3_matches_its_formula_and_is_zero_when_policies_agree():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    r = math.exp(-0.5)
    assert k3_kl(logp, ref).tolist() == pytest.approx([r - (-0.5) - 1, 0.0])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_each_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)  # per-sequence means
    assert aggregate(per_token, mask, "token").item() == pytest.approx(10.0 / 4)
    assert aggregate(per_token, mask, "dr_grpo", max_tokens=5).item() == pytest.approx(10.0 / (2 * 5))
    with pytest.raises(ValueError, match="expected one of"):
        aggregate(per_token, mask, "mean")


@pytest.mark.parametrize("ratio,adv,eps_high,expected", [
    (1.5, 1.0, None, -1.2),   # positive advantage: the ratio is capped at 1 + ε
    (1.5, 1.0, 0.28, -1.28),  # clip-higher raises only the upper bound
    (0.5, 1.0, None, -0.5),   # below 1 - ε with a positive advantage: min picks the unclipped term
    (0.5, -1.0, None, 0.8),   # negative advantage: capped at 1 - ε
    (1.5, -1.0, None, 1.5),   # above 1 + ε with a negative advantage: unclipped (pessimistic) term
])
def test_clipped_objective(ratio, adv, eps_high, expected):
    logp = torch.tensor([[math.log(ratio)]])
    loss, metrics = policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1),
                                epsilon=0.2, epsilon_high=eps_high)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["clip_fraction"] == (1.0 if expected in (-1.2, -1.28, 0.8) else 0.0)


def test_kl_penalty_is_added_with_beta():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    base, _ = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1))
    with_kl, metrics = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref, beta=0.04)
    assert base.item() == 0.0
    assert with_kl.item() == pytest.approx(0.04 * (math.exp(-0.5) + 0.5 - 1))
    assert metrics["kl"] == pytest.approx(math.exp(-0.5) + 0.5 - 1)


def test_truncated_importance_weight_for_a_sampler_mismatch():
    logp = torch.zeros(1, 2, requires_grad=True)
    sampler = torch.tensor([[math.log(0.5), math.log(0.1)]])  # the sampler gave these tokens less mass
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), sampler_logp=sampler,
                          importance_cap=3.0)
    assert loss.item() == pytest.approx(-(2.0 + 3.0) / 2)  # weights 1/0.5 = 2 and min(1/0.1, 3) = 3


def test_gradient_pushes_up_positive_advantage_tokens():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0, lowers row 1


def test_gspo_clips_the_sequence_as_a_whole():
    """GSPO: one ratio per sequence, the geometric mean of its tokens' (here √1.5 ≈ 1.225 from token ratios 1.5 and
    1.0), clipped at 1 + ε for both tokens, so neither gets a gradient; the token-level objective clips only the
    first token and still pushes the second."""
    old = torch.tensor([[-1.0, -1.0]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    losses, grads = {}, {}
    for how in ("gspo", "grpo"):
        logp = (old + torch.tensor([[math.log(1.5), 0.0]])).requires_grad_(True)
        loss, m = policy_loss(logp, old, adv, mask, epsilon=0.2, aggregation=how)
        loss.backward()
        losses[how], grads[how] = loss.item(), logp.grad[0].tolist()
    assert losses["gspo"] == pytest.approx(-1.2) and grads["gspo"] == [0.0, 0.0]
    assert losses["grpo"] == pytest.approx(-(1.2 + 1.0) / 2) and grads["grpo"] == pytest.approx([0.0, -0.5])
    # unclipped (ε large), the sequence ratio's gradient is s_i · Â / |y| on every token
    logp = (old + torch.tensor([[math.log(1.5), 0.0]])).requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, epsilon=10.0, aggregation="gspo")
    loss.backward()
    assert loss.item() == pytest.approx(-math.sqrt(1.5))
    assert logp.grad[0].tolist() == pytest.approx([-math.sqrt(1.5) / 2] * 2)
