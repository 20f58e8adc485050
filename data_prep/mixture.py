"""Build a data mixture from a YAML spec: SFT conversations, preference pairs, RL prompts, held-out sets.

The spec (``recipes/data/*.yaml``) names sources with a domain and a ``count`` or a ``weight`` of ``sft.total``;
sampling is deterministic given ``seed``. Generators draw with the recipe's ``generators.<name>`` parameters, which
an SFT source or an RL set may override with its own ``params`` (the tiny recipe's SFT math leans on the easy
levels while held-out sets keep the recipe's mix). Held-out sets are drawn first, and no training, preference or RL row
may share a held-out prompt (compared after ``dedup.normalize``): such draws are rejected and counted, and the
finished build is checked again. Exact duplicates are removed (all sources), near duplicates for file sources,
and file sources are decontaminated against the held-out sets and ``decontaminate.against`` files by n-gram
overlap. Every count lands in ``report.json`` / ``report.md`` next to the data.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from datasets import Dataset
from datasets.table import InMemoryTable

from .dedup import DECONTAMINATION_NGRAM, Decontaminator, MinHashLSH, normalize
from .errors import SkipReport
from .generators import DOMAINS, Example, generator
from .readers import load
from .schema import FEATURES
from .tokenizer import conversation_texts, load_tokenizer, train_tokenizer

MAX_DRAWS_PER_ROW = 50  # give up on a generated source after this many draws per wanted row (report shortfall)
STALL_DRAWS = 200_000  # ... or after this many draws in a row that added nothing (its distinct space is spent)
TOKENIZER_TRAIN_CONVERSATIONS = 50_000
TOKEN_STATS_SAMPLE = 20_000
PREFERENCE_MODELS = ("reasoning", "helpful", "safety")


class SpecError(ValueError):
    def __init__(self, path, field_name, reason):
        super().__init__(f"{path}: {field_name}: {reason}")


@dataclass
class Source:
    name: str
    domain: str
    generator: str | None = None
    path: str | None = None
    format: str = "auto"
    count: int | None = None
    weight: float | None = None
    on_error: str = "raise"
    near_dedup: bool | None = None  # default: on for files, off for generators
    dedup: bool = True  # exact-duplicate removal; small template spaces may opt out to reach their count
    params: dict | None = None  # generator parameters for this source only, over the recipe's generators.<name>


@dataclass
class MixtureSpec:
    name: str
    path: Path
    seed: int = 0
    output_dir: str = "runs/data/default"
    sft_total: int | None = None
    sources: list[Source] = field(default_factory=list)
    preferences: dict = field(default_factory=dict)  # rm name -> {count, generators}
    rl: dict = field(default_factory=dict)  # set name -> {count, generator}
    process: dict = field(default_factory=dict)  # {count}: step-labelled math solutions for the process RM
    heldout: dict = field(default_factory=dict)  # domain -> count
    decontaminate_against: list[str] = field(default_factory=list)
    tokenizer: dict = field(default_factory=lambda: {"train": True, "vocab_size": 2048})
    generators: dict = field(default_factory=dict)  # domain -> parameters of its generator, for every set

    def generator_params(self, name: str, own: dict | None = None) -> dict:
        """The parameters a set draws generator ``name`` with: the recipe's ``generators.<name>``, updated by the
        set's own ``params``."""
        return {**(self.generators.get(name) or {}), **(own or {})}


def load_spec(path: str | Path) -> MixtureSpec:
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"name", "seed", "output_dir", "sft", "preferences", "process", "rl", "heldout", "decontaminate",
             "tokenizer", "generators"}
    for key in raw:
        if key not in known:
            raise SpecError(path, key, f"unknown key; expected one of {sorted(known)}")
    sft = raw.get("sft") or {}
    spec = MixtureSpec(name=raw.get("name", path.stem), path=path, seed=int(raw.get("seed", 0)),
                       output_dir=raw.get("output_dir", f"runs/data/{path.stem}"), sft_total=sft.get("total"),
                       preferences=raw.get("preferences") or {}, rl=raw.get("rl") or {},
                       process=raw.get("process") or {},
                       heldout=raw.get("heldout") or {},
                       decontaminate_against=(raw.get("decontaminate") or {}).get("against", []),
                       tokenizer=raw.get("tokenizer") or {"train": True, "vocab_size": 2048},
                       generators=raw.get("generators") or {})
    for domain in spec.generators:
        _check_params(spec, f"generators.{domain}", domain)
    for i, entry in enumerate(sft.get("sources") or []):
        where = f"sft.sources[{i}]"
        try:
            source = Source(**entry)
        except TypeError as e:
            raise SpecError(path, where, str(e)) from e
        if (source.generator is None) == (source.path is None):
            raise SpecError(path, where, "give exactly one of generator: or path:")
        if source.generator is not None and source.generator not in DOMAINS:
            raise SpecError(path, f"{where}.generator", f"{source.generator!r} is not one of {DOMAINS}")
        if source.params is not None:
            if source.generator is None:
                raise SpecError(path, f"{where}.params", "generator parameters need generator:")
            _check_params(spec, f"{where}.params", source.generator, source.params)
        if (source.count is None) == (source.weight is None):
            raise SpecError(path, where, "give exactly one of count: or weight:")
        if source.weight is not None and not spec.sft_total:
            raise SpecError(path, where, "weight: needs sft.total")
        spec.sources.append(source)
    for name, entry in spec.rl.items():
        if entry.get("params") is not None:
            _check_params(spec, f"rl.{name}.params", entry.get("generator"), entry["params"])
    for rm in spec.preferences:
        if rm not in PREFERENCE_MODELS:
            raise SpecError(path, f"preferences.{rm}", f"expected one of {PREFERENCE_MODELS}")
    return spec


def _check_params(spec: MixtureSpec, where: str, name: str, own: dict | None = None) -> None:
    """Draw once from generator ``name`` with the parameters a set would use; a bad one is a SpecError at ``where``."""
    try:
        generator(name, **spec.generator_params(name, own))(random.Random(0))
    except (ValueError, TypeError) as e:
        raise SpecError(spec.path, where, str(e)) from e


def _target(spec: MixtureSpec, source: Source) -> int:
    return source.count if source.count is not None else round(source.weight * spec.sft_total)


def _rng(seed: int, *names: str) -> random.Random:
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _conversation(e: Example, source: str, id_: str) -> dict:
    messages = ([{"role": "system", "content": e.system}] if e.system else []) + [
        {"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response}]
    return {"messages": messages, "domain": e.domain, "source": source, "id": id_}


def _rl_row(e: Example, source: str, id_: str) -> dict:
    answer = e.answer
    if e.domain == "safety":
        answer = "refuse" if e.harmful else "comply"  # what the right behaviour is
    return {"prompt": [{"role": "user", "content": e.prompt}], "answer": answer, "tests": e.tests,
            "entry_point": e.entry_point, "code_prefix": "", "domain": e.domain, "source": source, "id": id_}


def _columns(rows: list[dict], kind: str) -> Dataset:
    """Rows -> Dataset straight through Arrow (``Dataset.from_list`` encodes row by row: 60x slower here)."""
    features = FEATURES[kind]
    columns = {name: [row[name] for row in rows] for name in features}
    return Dataset(InMemoryTable(pa.Table.from_pydict(columns, schema=features.arrow_schema)))


class Builder:
    def __init__(self, spec: MixtureSpec, output_dir: str | Path | None = None):
        self.spec = spec
        self.out = Path(output_dir or spec.output_dir)
        self.heldout_prompts: set[str] = set()
        self.report: dict = {"name": spec.name, "seed": spec.seed, "rejected_heldout_overlap": Counter()}

    # -- generated rows -------------------------------------------------------------------------------------
    def _draw(self, names: list[str], count: int, rng: random.Random, label: str, accept=None, unique=True,
              params: dict | None = None):
        """``count`` generated examples, none with a held-out prompt, and (``unique``) no repeated prompt + reply;
        ``params`` replaces the recipe's generator parameters (one generator only)."""
        samplers = [generator(n, **(params if params is not None else self.spec.generator_params(n))) for n in names]
        seen, out, draws, last_new, duplicates = set(), [], 0, 0, 0
        while len(out) < count and draws < MAX_DRAWS_PER_ROW * count and draws - last_new < STALL_DRAWS:
            draws += 1
            e = samplers[rng.randrange(len(samplers))](rng)
            if accept is not None and not accept(e):
                continue
            key = normalize(e.prompt)
            if key in self.heldout_prompts:
                self.report["rejected_heldout_overlap"][label] += 1
                continue
            if unique:
                pair = hash((key, e.response))
                if pair in seen:
                    duplicates += 1
                    continue
                seen.add(pair)
            out.append(e)
            last_new = draws
        if len(out) < count:
            self.report.setdefault("shortfall", {})[label] = count - len(out)
        self.report.setdefault("duplicates_redrawn", {})[label] = duplicates
        return out

    def heldout(self) -> dict[str, Dataset]:
        """One prompt set per domain (RL format, with the verifiable answer), and ``chat``: the same prompts with
        the generator's reference reply, for perplexity (``eval/``)."""
        sets, chat = {}, []
        for domain, count in self.spec.heldout.items():
            rng = _rng(self.spec.seed, "heldout", domain)
            sample = generator(domain, **self.spec.generator_params(domain))
            rows, seen, draws = [], set(), 0
            want = {True: count // 2, False: count - count // 2} if domain == "safety" else None
            while len(rows) < count:
                draws += 1
                if draws > MAX_DRAWS_PER_ROW * count:
                    raise SpecError(self.spec.path, f"heldout.{domain}", f"only {len(rows)} distinct prompts in "
                                    f"{draws - 1} draws; ask for fewer")
                e = sample(rng)
                key = normalize(e.prompt)
                if key in seen:
                    continue
                if want is not None:
                    if want[e.harmful] == 0:
                        continue
                    want[e.harmful] -= 1
                seen.add(key)
                level = f"L{e.difficulty}/" if domain == "math" else ""
                rows.append(_rl_row(e, "generated", f"heldout/{domain}/{level}{len(rows)}"))
                chat.append(_conversation(e, "generated", rows[-1]["id"]))
            self.heldout_prompts |= seen
            sets[domain] = _columns(rows, "rl_prompts")
        if chat:
            sets["chat"] = _columns(chat, "conversations")
        return sets

    # -- SFT ------------------------------------------------------------------------------------------------
    def sft(self) -> Dataset:
        rows, counts = [], {}
        decon = None
        for source in self.spec.sources:
            want = _target(self.spec, source)
            if source.generator:
                rng = _rng(self.spec.seed, "sft", source.name)
                drawn = self._draw([source.generator], want, rng, f"sft/{source.name}", unique=source.dedup,
                                   params=self.spec.generator_params(source.generator, source.params))
                new = [{**_conversation(e, source.name, f"{source.name}/{i}"), "domain": source.domain}
                       for i, e in enumerate(drawn)]
            else:
                if decon is None:
                    decon = self._decontaminator()
                new = self._file_rows(source, want, decon)
            counts[source.name] = {"domain": source.domain, "wanted": want, "realised": len(new)}
            rows += new
        self.report["sft_sources"] = counts
        self.report["sft_domains"] = dict(Counter(r["domain"] for r in rows))
        return _columns(rows, "conversations")

    def _decontaminator(self) -> Decontaminator:
        texts = list(self.heldout_prompts)
        for path in self.spec.decontaminate_against:
            eval_set = load(path, kind="rl_prompts", on_error="skip")
            texts += [p[-1]["content"] for p in eval_set["prompt"]]
        return Decontaminator(texts)

    def _file_rows(self, source: Source, want: int, decon: Decontaminator) -> list[dict]:
        skips = SkipReport(source.path)
        data = load(source.path, kind="conversations", format=source.format, on_error=source.on_error, report=skips)
        order = list(range(len(data)))
        _rng(self.spec.seed, "file", source.name).shuffle(order)
        near = MinHashLSH(self.spec.seed) if source.near_dedup in (None, True) else None
        seen, rows, dropped = set(), [], Counter()
        for i in order:
            if len(rows) == want:
                break
            row = data[i]
            user = " ".join(m["content"] for m in row["messages"] if m["role"] == "user")
            text = json.dumps(row["messages"])
            key = hash(normalize(text))
            if key in seen:
                dropped["exact duplicate"] += 1
            elif decon.contaminated(user):
                dropped["eval overlap (decontaminated)"] += 1
            elif near is not None and near.seen(text):
                dropped["near duplicate"] += 1
            else:
                seen.add(key)
                rows.append({**row, "domain": source.domain, "source": source.name})
        self.report.setdefault("file_sources", {})[source.name] = {
            "read": skips.kept, "skipped_bad_rows": dict(skips.skipped), "dropped": dict(dropped)}
        return rows

    # -- preferences and RL prompts ---------------------------------------------------------------------------
    def preferences(self) -> dict[str, Dataset]:
        sets = {}
        for rm, entry in self.spec.preferences.items():
            rng = _rng(self.spec.seed, "preferences", rm)
            drawn = self._draw(entry["generators"], entry["count"], rng, f"preferences/{rm}",
                               accept=lambda e: e.rejected is not None)
            rows = [{"prompt": [{"role": "user", "content": e.prompt}],
                     "chosen": [{"role": "assistant", "content": e.response}],
                     "rejected": [{"role": "assistant", "content": e.rejected}],
                     "domain": e.domain, "source": "generated", "id": f"{rm}/{i}"} for i, e in enumerate(drawn)]
            sets[rm] = _columns(rows, "preferences")
        return sets

    def process(self) -> Dataset | None:
        """Math solutions split into steps with a label per step: half right, half with one slip (§4.2's
        process supervision; every intermediate result of a generated solution can be checked)."""
        if not self.spec.process:
            return None
        rng = _rng(self.spec.seed, "process")
        drawn = self._draw(["math"], self.spec.process["count"], rng, "process")
        rows = []
        for i, e in enumerate(drawn):
            right = i % 2 == 0
            steps = e.response.split(". ") if right else e.steps
            steps = [s if s.endswith(".") else s + "." for s in steps]
            labels = [True] * len(steps) if right else e.step_labels
            rows.append({"prompt": [{"role": "user", "content": e.prompt}], "completions": steps, "labels": labels,
                         "domain": "math", "source": "generated", "id": f"process/{i}"})
        return _columns(rows, "steps")

    def rl(self) -> dict[str, Dataset]:
        sets = {}
        for name, entry in self.spec.rl.items():
            rng = _rng(self.spec.seed, "rl", name)
            drawn = self._draw([entry["generator"]], entry["count"], rng, f"rl/{name}", unique=entry.get("dedup", True),
                               params=self.spec.generator_params(entry["generator"], entry.get("params")))
            sets[name] = _columns([_rl_row(e, "generated", f"{name}/{i}") for i, e in enumerate(drawn)],
                                  "rl_prompts")
        return sets

    # -- everything -------------------------------------------------------------------------------------------
    def build(self, save: bool = True) -> dict:
        start = time.perf_counter()
        heldout = self.heldout()
        sft = self.sft()
        preferences = self.preferences()
        process = self.process()
        rl = self.rl()
        self.report["generate_seconds"] = round(time.perf_counter() - start, 1)
        training = [sft, *preferences.values(), *rl.values(), *([process] if process is not None else [])]
        self.report["overlap_with_heldout"] = check_overlap(heldout, training)
        self.report["counts"] = {
            "sft": len(sft), **{f"preferences/{k}": len(v) for k, v in preferences.items()},
            **{f"rl/{k}": len(v) for k, v in rl.items()}, **{f"heldout/{k}": len(v) for k, v in heldout.items()},
            **({"process": len(process)} if process is not None else {})}
        tokenizer = self._tokenizer(sft, save)
        if tokenizer is not None:
            sample = sft.shuffle(seed=self.spec.seed).select(range(min(len(sft), TOKEN_STATS_SAMPLE)))
            texts = list(conversation_texts(sample["messages"]))
            lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            self.report["tokenizer_vocab_size"] = len(tokenizer)
            self.report["avg_tokens_per_conversation"] = round(sum(lengths) / max(1, len(lengths)), 1)
        self.report["rejected_heldout_overlap"] = dict(self.report["rejected_heldout_overlap"])
        if save:
            self.out.mkdir(parents=True, exist_ok=True)
            sft.save_to_disk(str(self.out / "sft"))
            if process is not None:
                process.save_to_disk(str(self.out / "process"))
            for group, sets in (("preferences", preferences), ("rl", rl), ("heldout", heldout)):
                for name, data in sets.items():
                    data.save_to_disk(str(self.out / group / name))
            self.report["total_seconds"] = round(time.perf_counter() - start, 1)
            (self.out / "report.json").write_text(json.dumps(self.report, indent=2))
            (self.out / "report.md").write_text(render_report(self.report))
            (self.out / "mixture.yaml").write_text(self.spec.path.read_text())
        else:
            self.report["total_seconds"] = round(time.perf_counter() - start, 1)
        return {"sft": sft, "preferences": preferences, "process": process, "rl": rl, "heldout": heldout,
                "report": self.report}

    def _tokenizer(self, sft: Dataset, save: bool):
        spec = self.spec.tokenizer
        if spec.get("path"):
            return load_tokenizer(spec["path"])
        if not spec.get("train", True):
            return None
        sample = sft.shuffle(seed=self.spec.seed).select(range(min(len(sft), TOKENIZER_TRAIN_CONVERSATIONS)))
        out = self.out / "tokenizer" if save else None
        return train_tokenizer(conversation_texts(sample["messages"]), spec.get("vocab_size", 2048), out)


def last_user_turns(data: Dataset) -> list[str]:
    """The last user turn of every row (``messages`` or ``prompt``), read column-wise through Arrow."""
    column = data.data.table.column("messages" if "messages" in data.column_names else "prompt").combine_chunks()
    flat, parents = pc.list_flatten(column), pc.list_parent_indices(column).to_numpy()
    users = np.nonzero(flat.field("role").to_numpy(zero_copy_only=False) == "user")[0]
    _, last = np.unique(parents[users][::-1], return_index=True)  # the last user turn of each row
    return flat.field("content").take(users[::-1][last]).to_pylist()


def check_overlap(heldout: dict[str, Dataset], training: list[Dataset]) -> int:
    """Rows of ``training`` whose last user turn equals (after ``normalize``) a held-out prompt; must be 0."""
    held = {normalize(t) for data in heldout.values() for t in last_user_turns(data)}
    overlap = sum(normalize(t) in held for data in training if len(data) for t in last_user_turns(data))
    if overlap:
        raise AssertionError(f"{overlap} training rows share a held-out prompt")
    return overlap


def render_report(report: dict) -> str:
    lines = [f"# Data mixture `{report['name']}` (seed {report['seed']})", "",
             "| SFT source | domain | wanted | realised |", "|---|---|---:|---:|"]
    for name, c in report.get("sft_sources", {}).items():
        lines.append(f"| {name} | {c['domain']} | {c['wanted']} | {c['realised']} |")
    lines += ["", "| SFT domain | conversations |", "|---|---:|"]
    lines += [f"| {d} | {n} |" for d, n in sorted(report.get("sft_domains", {}).items())]
    lines += ["", "| set | rows |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in report.get("counts", {}).items()]
    for key in ("rejected_heldout_overlap", "duplicates_redrawn", "shortfall", "file_sources"):
        if report.get(key):
            lines += ["", f"{key}: `{json.dumps(report[key])}`"]
    for key in ("overlap_with_heldout", "tokenizer_vocab_size", "avg_tokens_per_conversation", "generate_seconds",
                "total_seconds"):
        if key in report:
            lines.append(f"- {key}: {report[key]}")
    return "\n".join(lines) + "\n"
