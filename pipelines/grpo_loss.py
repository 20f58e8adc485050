"""GRPO's maths (DeepSeekMath §4.1, used by DeepSeek-V2 §4.2): group-relative advantages, the k3 KL estimator, the
clipped policy objective and its loss aggregations. Pure tensor functions, tested against hand-computed tables.

Shapes: B completions (prompts × group size G, a prompt's G completions adjacent), T completion tokens, a 0/1
``mask`` (B, T) that is 1 on tokens the policy sampled.
"""

from __future__ import annotations

import inspect
import math

import torch

STD_EPS = 1e-4  # added to the group's std: a group whose rewards all agree gets advantage 0, never 0/0
AGGREGATIONS = ("grpo", "token", "dr_grpo", "gspo")


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least 2 completions per prompt to compare")
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} rewards do not split into groups of {group_size}")
    return values.view(-1, group_size)


def outcome_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Outcome supervision (DeepSeekMath eq. 3 context): Â_i = (r_i − mean(r)) / std(r) within each group, the same
    for every token of completion i. ``scale=False`` keeps only the centring (Dr. GRPO). Shape (B,)."""
    groups = _groups(rewards.float(), group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + STD_EPS)
    return centred.reshape(-1)


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], group_size: int,
                       num_tokens: int, scale: bool = True) -> torch.Tensor:
    """Process supervision (DeepSeekMath §4.1.3): every step reward of the group is normalised by the mean and std
    of all step rewards in that group, r̃ = (r − mean(R)) / std(R); a token's advantage is the sum of the
    normalised rewards of the steps that end at or after it, Â_t = Σ_{index(j) ≥ t} r̃_j. ``step_ends[i][j]`` is
    the completion-token index where step j of completion i ends. Shape (B, num_tokens)."""
    if len(step_rewards) != len(step_ends) or len(step_rewards) % group_size:
        raise ValueError(f"{len(step_rewards)} step-reward lists, {len(step_ends)} step-end lists, group size "
                         f"{group_size}: expected equal counts, a multiple of the group size")
    _groups(torch.zeros(len(step_rewards)), group_size)
    advantages = torch.zeros(len(step_rewards), num_tokens)
    for start in range(0, len(step_rewards), group_size):
        pooled = torch.tensor([r for rs in step_rewards[start:start + group_size] for r in rs], dtype=torch.float)
        if pooled.numel() == 0:
            continue
        mean = pooled.mean()
        std = pooled.std() if pooled.numel() > 1 else torch.tensor(0.0)
        for i in range(start, start + group_size):
            if len(step_rewards[i]) != len(step_ends[i]):
                raise ValueError(f"completion {i}: {len(step_rewards[i])} step rewards but {len(step_ends[i])} "
                                 "step ends")
            for reward, end in zip(step_rewards[i], step_ends[i]):
                normalised = reward - mean
                if scale:
                    normalised = normalised / (std + STD_EPS)
                advantages[i, : min(end, num_tokens - 1) + 1] += normalised
    return advantages


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, always ≥ 0 estimator of KL(π_θ || π_ref) per token (DeepSeekMath eq. 4):
    π_ref/π_θ − log(π_ref/π_θ) − 1."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None) -> torch.Tensor:
    """``grpo``: mean over each completion's tokens, then over completions (DeepSeekMath eq. 3); ``token``: mean over
    all tokens of the batch (DAPO); ``dr_grpo``: sum over tokens divided by B × the generation budget (Dr. GRPO),
    so neither long nor short completions are favoured by the normaliser."""
    mask = mask.to(per_token.dtype)
    if how in ("grpo", "gspo"):
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    raise ValueError(f"loss aggregation {how!r}: expected one of {AGGREGATIONS}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
                epsilon_high: float | None = None, aggregation: str = "grpo", max_tokens: int | None = None,
                sampler_logp: torch.Tensor | None = None, importance_cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective with a KL penalty, as a loss to minimise (DeepSeekMath eq. 3):
    −min(ρ Â, clip(ρ, 1−ε, 1+ε_high) Â) + β·KL_k3, ρ = π_θ/π_old, aggregated as ``aggregation`` says.

    ``epsilon_high`` (DAPO's clip-higher) widens the upper bound only. ``sampler_logp``: the log-probs of the
    engine that sampled the tokens; where it differs from the trainer's ``old_logp`` (bf16, other kernels) each
    token is reweighted by min(π_old/π_sampler, ``importance_cap``) (truncated importance sampling). Returns the
    loss and detached metrics (clip fraction, KL, ratio).

    ``aggregation="gspo"`` (GSPO, Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its
    tokens' ratios, clipped as a whole (GSPO's ε are far smaller: ~3e-4 / 4e-4), in its token form
    s_i·π_θ(y_t)/sg[π_θ(y_t)] so that per-token (process) advantages still apply; per-sequence mean."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if aggregation == "gspo":
        m = mask.to(logp.dtype)
        sequence = ((logp - old_logp) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        ratio = torch.exp(sequence.detach() + logp - logp.detach())
    else:
        ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + (epsilon_high if epsilon_high is not None else epsilon))
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if sampler_logp is not None:
        per_token = per_token * torch.exp(old_logp - sampler_logp).clamp(max=importance_cap).detach()
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_tokens)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        n = m.sum().clamp(min=1)
        was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | (ratio > clipped) & (advantages > 0)
        metrics = {"kl": ((kl * m).sum() / n).item(), "clip_fraction": ((was_clipped.to(m.dtype) * m).sum() / n).item(),
                   "ratio_mean": ((ratio * m).sum() / n).item()}
    return loss, metrics


def _takes_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (every transformers model does; some remote-code
    ones do not). Wrappers (DDP, peft) pass their keyword arguments through."""
    forward = getattr(model, "module", model).forward
    parameters = inspect.signature(forward).parameters.values()
    return any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in parameters)


def sequence_logprobs(model, prompt_ids, completion_ids, temperature: float = 1.0, batch_size: int = 64,
                      width: int | None = None, with_entropy: bool = True):
    """Per-token log-probs of each completion given its prompt (right-padded rows): a (B, T) tensor, grad-enabled
    when the model is; the (B, T) mask of real completion tokens; the mean token entropy (None without
    ``with_entropy``: a reference pass has no use for it); and the DeepSeekMoE balance loss the model returns when
    it trains (None otherwise), averaged over the chunks."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = width or max(len(c) for c in completion_ids)
    out, entropies, aux = [], [], []
    device = next(model.parameters()).device
    keeps = _takes_logits_to_keep(model)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        # logits only from the position before the shortest prompt's first completion token on (TRL's
        # logits_to_keep): the LM head and log-softmax skip the prompt positions no completion token needs
        offset = min(len(p) for p in prompt_ids[start:start + len(chunk)]) - 1 if keeps else 0
        outputs = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        **({"logits_to_keep": ids.shape[1] - offset} if keeps else {}))
        if getattr(outputs, "aux_loss", None) is not None:
            aux.append(outputs.aux_loss)
        logits = outputs.logits.float() / temperature
        logp_all = torch.log_softmax(logits[:, :-1], -1)  # position offset + j predicts token offset + j + 1
        token_logp = logp_all.gather(-1, ids[:, offset + 1:, None].to(device))[..., 0]
        for i, (p, c) in enumerate(zip(prompt_ids[start:], completion_ids[start:start + len(chunk)])):
            first = len(p) - 1 - offset
            row = torch.zeros(T, device=device, dtype=token_logp.dtype)
            row[:len(c)] = token_logp[i, first:first + len(c)]
            out.append(row)
            if with_entropy:
                with torch.no_grad():
                    span = logp_all[i, first:first + len(c)]
                    entropies.append(-(span.exp() * span).sum(-1).mean())
    mask = torch.zeros(len(completion_ids), T)
    for i, c in enumerate(completion_ids):
        mask[i, :len(c)] = 1
    balance = torch.stack(aux).mean() if aux else None
    entropy = torch.stack(entropies).mean().item() if with_entropy else None
    return torch.stack(out), mask.to(device), entropy, balance


def prompt_groups(prompt_ids: list[list[int]]) -> list[range]:
    """The runs of adjacent rows with the same prompt (a GRPO group: a prompt's G completions are adjacent)."""
    groups, start = [], 0
    for i in range(1, len(prompt_ids) + 1):
        if i == len(prompt_ids) or prompt_ids[i] != prompt_ids[start]:
            groups.append(range(start, i))
            start = i
    return groups


def shared_prompt_logprobs(model, prompt_ids, completion_ids, temperature: float = 1.0, width: int | None = None,
                           with_entropy: bool = True):
    """``sequence_logprobs`` with each group's prompt computed once instead of once per completion: a pass over
    the groups' prompts (left-padded) fills a key/value cache with gradients, the cache is repeated for each
    group's completions, and a second pass runs only the completion tokens against it; the log-prob of a
    completion's first token comes from the prompt pass's last position. Gradients reach the prompt's tokens
    through the cache, summed over the group, so the log-probs and their gradients are those of the padded rows
    (tests/pipelines/test_any_model.py) with the prompt's arithmetic done once: a G-fold saving on prompt tokens,
    which grows with the prompt (a few-shot or system prompt). Any causal LM whose forward takes a
    ``DynamicCache`` and ``position_ids`` (every transformers model). Same returns as ``sequence_logprobs``; the
    DeepSeekMoE balance loss counts each prompt once, as a sequence of its own beside its completions."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    groups = prompt_groups(prompt_ids)
    prompts = [prompt_ids[g.start] for g in groups]
    sizes = torch.tensor([len(g) for g in groups], device=device)
    P = max(map(len, prompts))
    ids = torch.zeros(len(groups), P, dtype=torch.long)
    prompt_mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = 1
    prompt_mask = prompt_mask.to(device)
    first = model(input_ids=ids.to(device), attention_mask=prompt_mask,
                  position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0), past_key_values=DynamicCache(),
                  use_cache=True, logits_to_keep=1)
    cache = first.past_key_values
    if cache is None or not hasattr(cache, "layers"):
        raise ValueError(f"{type(getattr(model, 'module', model)).__name__} returned no key/value cache from a "
                         "training forward (gradient checkpointing turns it off); set share_prompts: false")
    for layer in cache.layers:  # each group's prompt cache, once per completion (the gradients add up)
        layer.keys = layer.keys.repeat_interleave(sizes, 0)
        layer.values = layer.values.repeat_interleave(sizes, 0)

    T = max(1, max(len(c) for c in completion_ids))
    cids = torch.zeros(len(completion_ids), T, dtype=torch.long)
    mask = torch.zeros(len(completion_ids), T)
    for i, c in enumerate(completion_ids):
        cids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
    cids, mask = cids.to(device), mask.to(device)
    starts = torch.tensor([len(p) for p in prompt_ids], device=device)
    rest = model(input_ids=cids, attention_mask=torch.cat([prompt_mask.repeat_interleave(sizes, 0), mask.long()], 1),
                 position_ids=starts[:, None] + torch.arange(T, device=device), past_key_values=cache,
                 use_cache=True)
    # the prompt's last position predicts token 0; position j of the completion pass predicts token j + 1 (the
    # last position predicts nothing: it is gathered at a dummy token and dropped, which costs one position of
    # log-softmax but no copy of the (rows, T, vocab) logits, forward or backward)
    first_logp = torch.log_softmax(first.logits[:, -1].float() / temperature, -1).repeat_interleave(sizes, 0)
    rest_logp = torch.log_softmax(rest.logits.float() / temperature, -1)
    targets = torch.cat([cids[:, 1:], cids[:, :1]], 1)
    token_logp = torch.cat([first_logp.gather(-1, cids[:, :1]), rest_logp.gather(-1, targets[..., None])[:, :-1, 0]],
                           1) * mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            predicting = rest_logp[:, :-1]
            per_token = torch.cat([-(first_logp.exp() * first_logp).sum(-1, keepdim=True),
                                   -(predicting.exp() * predicting).sum(-1)], 1)
            entropy = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean().item()
    W = width or T
    out = torch.zeros(len(completion_ids), W, device=device, dtype=token_logp.dtype)
    out[:, :T] = token_logp
    out_mask = torch.zeros_like(out)
    out_mask[:, :T] = mask
    # the balance loss per completion as the caller weighs it (by rows): the completions' own, plus the prompts'
    # shared by each group's rows, so that each prompt and each completion counts once however rows are chunked
    aux = [(o.aux_loss, k) for o, k in ((first, len(groups)), (rest, len(completion_ids)))
           if getattr(o, "aux_loss", None) is not None]
    balance = sum(a * k for a, k in aux) / len(completion_ids) if aux else None
    return out, out_mask, entropy, balance


def group_chunks(prompt_ids: list[list[int]], completion_ids: list[list[int]], size: int, rank: int = 0,
                 world: int = 1) -> list[list[int]]:
    """``process_chunks`` for ``shared_prompt_logprobs``: whole groups, never split; groups sorted by prompt +
    longest completion, every ``world``-th group from ``rank`` on, as many groups a chunk as fit in ``size``
    completions (at least one). Every process gets the same number of chunks (empty ones where it runs out)."""
    groups = sorted(prompt_groups(prompt_ids),
                    key=lambda g: (len(prompt_ids[g.start]) + max(len(completion_ids[i]) for i in g)))
    per_rank = []
    for r in range(world):
        chunks: list[list[int]] = []
        for g in groups[r::world]:
            if not chunks or (chunks[-1] and len(chunks[-1]) + len(g) > size):
                chunks.append([])
            chunks[-1].extend(g)
        per_rank.append(chunks)
    count = max(1, max(map(len, per_rank)))
    return per_rank[rank] + [[] for _ in range(count - len(per_rank[rank]))]


def process_chunks(prompt_ids: list[list[int]], completion_ids: list[list[int]], size: int, rank: int = 0,
                   world: int = 1) -> list[list[int]]:
    """This process's row indices of the global batch, in chunks of at most ``size``: rows sorted by prompt +
    completion length (a chunk is padded to its longest row, and completions run from a few to hundreds of tokens,
    so random chunks spend much of each pass on padding), every ``world``-th of them taken from ``rank`` on. Every
    process gets the same number of chunks (empty ones where it runs out), and every row is in exactly one
    process's chunk: the gradient, a sum over chunks and processes, is unchanged."""
    order = sorted(range(len(completion_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    mine = order[rank::world]
    count = math.ceil(math.ceil(len(order) / world) / size)
    return [mine[s * size:(s + 1) * size] for s in range(count)]
