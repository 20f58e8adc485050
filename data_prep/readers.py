"""``load()``: the formats users bring, from local JSON / JSONL / Parquet files or Hub ids, as one schema.

Formats (detected from the first record's keys unless ``format=`` says):
  messages            OpenAI / TRL chat: ``messages`` = [{role, content}, ...]
  sharegpt            ``conversations`` = [{from, value}, ...]
  alpaca              ``instruction``, ``input`` (optional), ``output``
  prompt_completion   ``prompt``, ``completion`` (strings or message lists)
  preference          ``prompt``, ``chosen``, ``rejected`` (strings or message lists)
  hh                  Anthropic HH: ``chosen`` / ``rejected`` transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...")
  gsm8k               ``question``, ``answer`` (worked solution ending in "#### n"; as a conversation, the reply is
                      the worked solution ending "The answer is \\boxed{n}.", the form rewards.math reads)
  humaneval           ``prompt``, ``test``, ``entry_point`` (as conversations: ``canonical_solution`` is the reply)
  mbpp                ``text``, ``test_list`` (as conversations: ``code`` is the reply)
  rl                  ``prompt`` plus ``answer`` and/or ``tests`` (this project's own RL prompt files)
  stepwise            ``prompt``, ``completions`` (steps), ``labels`` (TRL's stepwise supervision, for PRMs)
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset

from .errors import ON_ERROR, DataError, SkipReport, handle, logger
from .schema import FEATURES, KINDS, ROLES, empty_row

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
GSM8K_CALC = re.compile(r"<<[^>]*>>")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
FORMAT_DOMAIN = {"gsm8k": "math", "humaneval": "code", "mbpp": "code", "hh": "safety"}
HUMANEVAL_ASK = "Complete the following Python function.\n\n```python\n{prompt}```"
MBPP_ASK = "{text}\nYour code should pass this test:\n{test}"


# ---------------------------------------------------------------------------------------------- raw records


def _iter_records(path_or_id: str, split: str) -> Iterator[tuple[str, dict | DataError]]:
    path = Path(path_or_id)
    if not path.exists():
        if "/" in path_or_id and not path_or_id.startswith((".", "/")) and path.suffix == "":
            yield from _iter_hub(path_or_id, split)
            return
        raise FileNotFoundError(f"{path_or_id}: no such file (and not a Hub dataset id)")
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        yield from _iter_jsonl(path)
    elif name.endswith(".json"):
        yield from _iter_json(path)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[row {i}]", record
    else:
        raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .parquet (optionally .gz)")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _iter_jsonl(path: Path):
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(where, None, f"invalid UTF-8 (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue  # blank lines hold no record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(where, None, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                yield where, DataError(where, None, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record


def _iter_json(path: Path):
    with _open(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(str(path), None, f"invalid UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", None, f"malformed JSON ({e.msg} at column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), None, "expected a list of records (or {\"data\": [...]})")
    for i, record in enumerate(data):
        where = f"{path}[{i}]"
        yield where, record if isinstance(record, dict) else DataError(where, None, "expected a JSON object")


def _iter_hub(hub_id: str, split: str):
    from datasets import load_dataset

    try:
        data = load_dataset(hub_id, split=split)
    except Exception as e:  # offline, missing, gated: say which and how to proceed
        raise FileNotFoundError(f"{hub_id}: could not load from the Hub ({type(e).__name__}: {e}); pass a local "
                                "file path instead") from e
    for i, record in enumerate(data):
        yield f"{hub_id}[{split} row {i}]", record


def detect_format(record: dict) -> str:
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completions", "labels"} <= keys:
        return "stepwise"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"chosen", "rejected"} <= keys:
        return "preference" if "prompt" in keys else "hh"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"text", "test_list"} <= keys:
        return "mbpp"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys and ({"answer", "tests"} & keys):
        return "rl"
    raise ValueError(f"cannot tell the format from the keys {sorted(keys)}; pass format= one of {FORMATS}")


# ------------------------------------------------------------------------------------------------ converters


def _turns(value, where: str, field: str, default_role: str) -> list[dict]:
    """A message list from a string (one turn of ``default_role``) or a list of {role, content}."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise DataError(where, field, f"expected a string or a list of messages, got {type(value).__name__}")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(where, f"{field}[{i}]", "expected an object with role and content")
        if "role" not in message:
            raise DataError(where, f"{field}[{i}].role", "missing")
        turns.append({"role": message["role"], "content": message.get("content")})
    return turns


def _check_turns(turns: list[dict], where: str, field: str) -> None:
    for i, turn in enumerate(turns):
        if turn["role"] not in ROLES:
            raise DataError(where, f"{field}[{i}].role", f"unknown role {turn['role']!r}; expected one of {ROLES}")
        content = turn["content"]
        if not isinstance(content, str):
            raise DataError(where, f"{field}[{i}].content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(where, f"{field}[{i}].content", "empty")


def _split_prompt(turns: list[dict], where: str, field: str) -> tuple[list[dict], list[dict]]:
    """(turns up to the last user turn, the turns after it)."""
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if not users:
        raise DataError(where, field, "no user turn")
    return turns[: users[-1] + 1], turns[users[-1] + 1 :]


def parse_hh(transcript: str, where: str, field: str) -> list[dict]:
    if not isinstance(transcript, str):
        raise DataError(where, field, f"expected a transcript string, got {type(transcript).__name__}")
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise DataError(where, field, "text before the first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def gsm8k_final_answer(solution: str) -> str:
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def _convert(fmt: str, kind: str, record: dict, where: str) -> dict:
    def need(key):
        if key not in record or record[key] is None:
            raise DataError(where, key, "missing")
        return record[key]

    if fmt == "hh":
        chosen, rejected = parse_hh(need("chosen"), where, "chosen"), parse_hh(need("rejected"), where, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if kind == "conversations":
            return {"messages": chosen}
        # the prompt is the longest shared prefix that ends with a user turn; the rest are the two replies
        ends = [i + 1 for i in range(shared) if chosen[i]["role"] == "user"]
        if not ends:
            raise DataError(where, "chosen", "chosen and rejected share no user turn")
        cut = ends[-1]
        return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    if fmt == "preference":
        prompt = _turns(need("prompt"), where, "prompt", "user")
        return {"prompt": prompt, "chosen": _turns(need("chosen"), where, "chosen", "assistant"),
                "rejected": _turns(need("rejected"), where, "rejected", "assistant")}
    if fmt == "gsm8k":
        question, solution = need("question"), need("answer")
        if not isinstance(solution, str) or "####" not in solution:
            raise DataError(where, "answer", "no '#### <answer>' line")
        final = gsm8k_final_answer(solution)
        if kind == "rl_prompts":
            return {"prompt": [{"role": "user", "content": question}], "answer": final}
        worked = GSM8K_CALC.sub("", solution.rsplit("####", 1)[0]).strip()
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": f"{worked}\nThe answer is \\boxed{{{final}}}."}]}
    if fmt == "humaneval":
        code = need("prompt")
        if kind == "conversations":  # the canonical solution as the reply: SFT data, or eval's oracle completions
            body = need("canonical_solution")
            return {"messages": [{"role": "user", "content": HUMANEVAL_ASK.format(prompt=code)},
                                 {"role": "assistant", "content": f"```python\n{code}{body}```"}]}
        return {"prompt": [{"role": "user", "content": HUMANEVAL_ASK.format(prompt=code)}], "tests": [need("test")],
                "entry_point": need("entry_point"), "code_prefix": code}
    if fmt == "mbpp" and kind == "conversations":
        return {"messages": [{"role": "user", "content": MBPP_ASK.format(text=need("text"), test=need("test_list")[0])},
                             {"role": "assistant", "content": f"```python\n{need('code')}\n```"}]}
    if fmt == "mbpp":
        tests = need("test_list")
        if not isinstance(tests, list) or not tests:
            raise DataError(where, "test_list", "expected a non-empty list of asserts")
        setup = record.get("test_setup_code") or ""
        return {"prompt": [{"role": "user", "content": MBPP_ASK.format(text=need("text"), test=tests[0])}],
                "tests": [f"{setup}\n{t}" if setup else t for t in tests]}
    if fmt == "stepwise":
        steps, labels = need("completions"), need("labels")
        if not isinstance(steps, list) or not isinstance(labels, list) or len(steps) != len(labels) or not steps:
            raise DataError(where, "labels", "completions and labels must be non-empty lists of equal length")
        if not all(isinstance(x, str) and x.strip() for x in steps):
            raise DataError(where, "completions", "every step must be a non-empty string")
        return {"prompt": _turns(need("prompt"), where, "prompt", "user"), "completions": steps,
                "labels": [bool(x) for x in labels]}
    if fmt == "rl":
        answer = record.get("answer")
        return {"prompt": _turns(need("prompt"), where, "prompt", "user"),
                "answer": "" if answer is None else str(answer), "tests": list(record.get("tests") or []),
                "entry_point": record.get("entry_point") or "", "code_prefix": record.get("code_prefix") or ""}
    # conversation formats
    if fmt == "messages":
        messages = _turns(need("messages"), where, "messages", "user")
    elif fmt == "sharegpt":
        raw = need("conversations")
        if not isinstance(raw, list):
            raise DataError(where, "conversations", "expected a list of {from, value}")
        messages = []
        for i, turn in enumerate(raw):
            if not isinstance(turn, dict) or "from" not in turn:
                raise DataError(where, f"conversations[{i}].from", "missing")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(where, f"conversations[{i}].from", f"unknown speaker {turn['from']!r}")
            messages.append({"role": role, "content": turn.get("value")})
    elif fmt == "alpaca":
        instruction, extra = need("instruction"), record.get("input") or ""
        user = f"{instruction}\n\n{extra}" if isinstance(instruction, str) and extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": need("output")}]
    elif fmt == "prompt_completion":
        messages = (_turns(need("prompt"), where, "prompt", "user")
                    + _turns(need("completion"), where, "completion", "assistant"))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if kind == "conversations":
        return {"messages": messages}
    if kind == "rl_prompts":
        _check_turns(messages, where, "messages")
        prompt, _ = _split_prompt(messages, where, "messages")
        answer = record.get("answer")
        return {"prompt": prompt, "answer": "" if answer is None else str(answer)}
    raise DataError(where, None, f"format {fmt!r} holds no preference pairs; use a preference or hh file")


FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "hh", "gsm8k", "humaneval", "mbpp",
           "rl", "stepwise")
KIND_FORMATS = {
    "steps": {"stepwise"},
    "conversations": {"messages", "sharegpt", "alpaca", "prompt_completion", "hh", "gsm8k", "humaneval", "mbpp"},
    "preferences": {"preference", "hh"},
    "rl_prompts": {"messages", "sharegpt", "alpaca", "prompt_completion", "gsm8k", "humaneval", "mbpp", "rl"},
}


def _validate(kind: str, row: dict, where: str) -> None:
    if kind == "conversations":
        _check_turns(row["messages"], where, "messages")
        roles = [t["role"] for t in row["messages"]]
        if "user" not in roles:
            raise DataError(where, "messages", "no user turn")
        if "assistant" not in roles:
            raise DataError(where, "messages", "no assistant turn")
    elif kind == "preferences":
        for field in ("prompt", "chosen", "rejected"):
            _check_turns(row[field], where, field)
        if not row["prompt"] or row["prompt"][-1]["role"] != "user":
            raise DataError(where, "prompt", "must end with a user turn")
        for field in ("chosen", "rejected"):
            if not row[field] or row[field][0]["role"] != "assistant":
                raise DataError(where, field, "no assistant reply after the shared prompt")
    else:  # rl_prompts and steps: a prompt ending with a user turn (stage-2 RL prompts need no answer)
        _check_turns(row["prompt"], where, "prompt")
        if not row["prompt"] or row["prompt"][-1]["role"] != "user":
            raise DataError(where, "prompt", "must end with a user turn")


def load(path_or_id: str | Path, kind: str = "conversations", format: str = "auto", on_error: str = "raise", *,
         split: str = "train", domain: str | None = None, source: str | None = None,
         report: SkipReport | None = None) -> Dataset:
    """Read a file (``.jsonl``, ``.json``, ``.parquet``, optionally ``.gz``) or a Hub id into ``kind``'s schema.

    ``on_error="raise"``: the first bad row raises ``DataError`` naming file, line and field.
    ``on_error="skip"``: bad rows are skipped and counted by reason in ``report`` (logged as a summary).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
    path_or_id = str(path_or_id)
    source = source or Path(path_or_id).name.split(".")[0]
    report = report if report is not None else SkipReport(path_or_id)
    report.name = report.name or path_or_id
    fmt = None if format == "auto" else format
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; expected 'auto' or one of {FORMATS}")
    rows = []
    for where, record in _iter_records(path_or_id, split):
        try:
            if isinstance(record, DataError):
                raise record
            if fmt is None:
                fmt = detect_format(record)
                if fmt not in KIND_FORMATS[kind]:
                    raise ValueError(f"{path_or_id}: format {fmt!r} cannot give {kind}; it gives "
                                     f"{sorted(k for k, v in KIND_FORMATS.items() if fmt in v)}")
            row = {**empty_row(kind), **_convert(fmt, kind, record, where)}
            _validate(kind, row, where)
        except DataError as error:
            handle(error, on_error, report)
            continue
        row_domain = domain or record.get("domain") or FORMAT_DOMAIN.get(fmt, "general")
        row_id = record.get("id") or record.get("task_id") or where
        rows.append({**row, "domain": str(row_domain), "source": source, "id": str(row_id)})
    report.kept = len(rows)
    if report.total_skipped:
        logger.warning(report.summary())
    if not rows:
        raise DataError(path_or_id, None, f"no usable rows ({report.total_skipped} skipped: {dict(report.skipped)})")
    return Dataset.from_list(rows, features=FEATURES[kind])
