"""A vLLM server for GRPO: sampling with log-probs over HTTP, and the trainer's weights pushed in after every update.

    python -m pipelines.vllm_serve --model runs/sft/tiny --port 8000      # GET /health answers when it is ready
    python -m pipelines.grpo recipes/grpo/tiny.yaml --backend vllm_server --vllm_server_url http://127.0.0.1:8000

Endpoints (JSON unless said):
  GET  /health           {"status": "ok", "model": DIR, "config": the checkpoint's size fields}
  POST /generate         {"prompts": [[token ids]], "n", "seeds": [one per prompt], "temperature", "top_p",
                          "max_tokens", "stop"} -> {"completions": [[{"token_ids", "logprobs"}] per prompt]}
  POST /update_weights   body: safetensors bytes under the checkpoint's names -> {"updated": count}
  GET  /weights?names=a,b safetensors bytes of the engine's own parameters of those names (vLLM's names; for tests)

Why HTTP for the weights: TRL 1.16's ``trl vllm-serve`` syncs through an NCCL group only, which does not exist on
CPUs; a safetensors body over loopback carries the tiny model (32 MB) in well under a second here, and the reload
is the one the colocated engine uses (``pipelines/generation.py``: reload + MoE repack). On GPUs the same endpoint
works; an NCCL group would be faster for models of many GB and is not built yet.
One engine per server, requests served one at a time (the engine is not thread-safe; /health answers meanwhile).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

logger = logging.getLogger("vllm_serve")
CONFIG_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def model_signature(config: dict) -> dict:
    """The fields that tell two checkpoints' shapes apart: a server serving another model than the policy is refused."""
    return {k: config.get(k) for k in CONFIG_FIELDS}


class Engine:
    def __init__(self, model: str, tensor_parallel_size: int = 1, trust_remote_code: bool = False, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: reloads are copies
        from .vllm_engine import make_llm

        self.model = model
        self.config = model_signature(json.loads((Path(model) / "config.json").read_text()))
        overrides = {"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size > 1 else {}
        self.llm = make_llm(model, trust_remote_code, skip_tokenizer_init=True, seed=seed,
                            logprobs_mode="processed_logprobs", **overrides)
        self.lock = threading.Lock()

    def generate(self, request: dict) -> dict:
        from .generation import SamplingSettings, vllm_sample

        prompts = request["prompts"]
        settings = SamplingSettings(float(request.get("temperature", 1.0)), float(request.get("top_p", 1.0)),
                                    int(request["max_tokens"]), request.get("stop") or [])
        with self.lock:
            per_prompt = vllm_sample(self.llm, prompts, int(request["n"]), request.get("seeds") or [None] * len(prompts),
                                     settings)
        return {"completions": [[{"token_ids": ids, "logprobs": logprobs} for ids, logprobs in samples]
                                for samples in per_prompt]}

    def update_weights(self, body: bytes) -> int:
        from safetensors.torch import load

        from .generation import reload_weights

        weights = list(load(body).items())
        with self.lock:
            reload_weights(self.llm, weights)
        return len(weights)

    def weights(self, names: list[str]) -> bytes:
        from safetensors.torch import save

        def read(worker):
            params = dict(worker.model_runner.get_model().named_parameters())
            return {n: params[n].detach().float().cpu().contiguous() for n in names if n in params}

        with self.lock:
            found = self.llm.collective_rpc(read)[0]
        return save(found)


def make_handler(engine: Engine):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode())

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self):  # noqa: N802 (http.server's names)
            url = urlparse(self.path)
            if url.path == "/health":
                self._json(200, {"status": "ok", "model": engine.model, "config": engine.config})
            elif url.path == "/weights":
                names = [n for n in parse_qs(url.query).get("names", [""])[0].split(",") if n]
                self._send(200, engine.weights(names), "application/octet-stream")
            else:
                self._json(404, {"error": f"no endpoint {url.path}"})

        def do_POST(self):  # noqa: N802
            try:
                if self.path == "/generate":
                    self._json(200, engine.generate(json.loads(self._body())))
                elif self.path == "/update_weights":
                    self._json(200, {"updated": engine.update_weights(self._body())})
                else:
                    self._json(404, {"error": f"no endpoint {self.path}"})
            except Exception as error:  # the trainer gets the reason, the server goes on
                logger.exception("%s failed", self.path)
                self._json(500, {"error": f"{type(error).__name__}: {error}"})

        def log_message(self, format, *args):  # one line per request at debug level, not stderr noise
            logger.debug(format, *args)

    return Handler


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint folder (the policy GRPO starts from)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs for the engine")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there; give a checkpoint folder (make sft writes "
                         "runs/sft/tiny)")
    engine = Engine(args.model, args.tensor_parallel_size, args.trust_remote_code, args.seed)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine))
    logger.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
