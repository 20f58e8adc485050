"""Build a data mixture from a YAML spec: SFT conversations, preference pairs, RL prompts, held-out sets.

The spec (``recipes/data/*.yaml``) names sources with a domain and a ``count`` or a ``weight`` of ``sft.total``;
sampling is deterministic given ``seed``. Generators draw with the recipe's ``generators.<name>`` parameters, which
an SFT source or an RL set may override with its own ``params`` (the tiny recipe's SFT math leans on the easy
levels while held-out sets keep the recipe's mix). Held-out sets are drawn first, and no training, preference or RL row
may share a held-out prompt (compared after ``dedup.normalize``): such draws are rejected and counted, and the
finished build is checked again. Exact duplicates are removed (all sources), near duplicates for file sources,
and file sources are decontaminated against the held-out sets and ``decontaminate.against`` files by n-gram
overlap. Every count lands in ``report.json`` / ``report.md`` next to the data.

Any set may come from a file (read by ``readers.load``) instead of a generator::

    sft:
      sources:   # a file source without count or weight takes every row
        - {name: gsm8k, path: train.jsonl, domain: math, instruction: &ask "Show your work."}
    rl:
      math: {path: train.jsonl, format: gsm8k, count: 5000, instruction: *ask}
    heldout:
      math: {path: test.jsonl, instruction: *ask}   # an integer count still means generated rows
    preferences:
      safety: {path: harmless-base-test.jsonl.gz, format: hh, on_error: skip}
    tokenizer: {train: false}   # nothing generated: the model brings its own tokenizer

A file entry takes ``path``, ``format`` (auto or a ``readers.FORMATS`` name), ``count`` (absent: every usable row,
in the file's order; fewer: a seeded shuffle; more than the file has: an error), ``on_error`` (raise | skip),
``domain`` (absent: the record's or the format's) and ``instruction``: a text appended, after a blank line, to the
last user turn of every row read from that file (SFT sources take it too), so SFT, RL and held-out prompts can all
ask the same way. Rows are checked against the held-out sets before the instruction is added (an instruction shared
by every prompt would otherwise make the last 13-gram of many prompts an "overlap"). RL and preference rows from
files that share a held-out prompt (exactly or by n-gram overlap) are dropped, as are exact duplicates, and counted
under ``file_sets`` in the report. A held-out file whose format has reference replies (GSM8K, HumanEval, chat) adds
them to ``heldout/chat``.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from datasets import Dataset
from datasets.table import InMemoryTable

from .dedup import DECONTAMINATION_NGRAM, Decontaminator, MinHashLSH, normalize
from .errors import ON_ERROR, SkipReport, logger
from .generators import DOMAINS, Example, generator
from .readers import FORMATS, KIND_FORMATS, load
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
    instruction: str | None = None  # files only: appended (after a blank line) to the last user turn of every row


@dataclass
class FileSet:
    """An RL prompt set, held-out set or preference set read from a file rather than drawn from a generator."""

    path: str
    format: str = "auto"
    count: int | None = None  # None: every usable row, in the file's order
    on_error: str = "raise"
    domain: str | None = None  # None: the record's own ``domain``, else the format's (gsm8k: math, hh: safety)
    instruction: str | None = None  # appended (after a blank line) to the last user turn of every row


FILE_KEYS = tuple(f.name for f in fields(FileSet))
SOURCE_KEYS = tuple(f.name for f in fields(Source))
RL_KEYS = ("count", "generator", "dedup", "params")
PREFERENCE_KEYS = ("count", "generators")


@dataclass
class MixtureSpec:
    name: str
    path: Path
    seed: int = 0
    output_dir: str = "runs/data/default"
    sft_total: int | None = None
    sources: list[Source] = field(default_factory=list)
    preferences: dict = field(default_factory=dict)  # rm name -> {count, generators} or a FileSet
    rl: dict = field(default_factory=dict)  # set name -> {count, generator} or a FileSet
    process: dict = field(default_factory=dict)  # {count}: step-labelled math solutions for the process RM
    heldout: dict = field(default_factory=dict)  # domain -> count (generated) or a FileSet
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
        _check_keys(path, where, entry, SOURCE_KEYS)
        try:
            source = Source(**entry)
        except TypeError as e:
            raise SpecError(path, where, str(e)) from e
        if (source.generator is None) == (source.path is None):
            raise SpecError(path, where, "give exactly one of generator: or path:")
        if source.path is not None:
            _check_file_fields(path, where, source)
        elif source.instruction is not None:
            raise SpecError(path, f"{where}.instruction", "an instruction is for file rows (path:); a generator "
                            "writes its own prompts")
        if source.generator is not None and source.generator not in DOMAINS:
            raise SpecError(path, f"{where}.generator", f"{source.generator!r} is not one of {DOMAINS}")
        if source.params is not None:
            if source.generator is None:
                raise SpecError(path, f"{where}.params", "generator parameters need generator:")
            _check_params(spec, f"{where}.params", source.generator, source.params)
        if source.count is not None and source.weight is not None:
            raise SpecError(path, where, "give count: or weight:, not both")
        if source.count is None and source.weight is None and source.path is None:
            raise SpecError(path, where, "give exactly one of count: or weight: (a file source without either "
                            "takes every row)")
        if source.weight is not None and not spec.sft_total:
            raise SpecError(path, where, "weight: needs sft.total")
        spec.sources.append(source)
    for name, entry in spec.rl.items():
        spec.rl[name] = entry = _set_entry(path, f"rl.{name}", entry, "generator", RL_KEYS)
        if isinstance(entry, FileSet):
            continue
        if entry["generator"] not in DOMAINS:
            raise SpecError(path, f"rl.{name}.generator", f"{entry['generator']!r} is not one of {DOMAINS}")
        if entry.get("params") is not None:
            _check_params(spec, f"rl.{name}.params", entry.get("generator"), entry["params"])
    for rm, entry in spec.preferences.items():
        if rm not in PREFERENCE_MODELS:
            raise SpecError(path, f"preferences.{rm}", f"expected one of {PREFERENCE_MODELS}")
        spec.preferences[rm] = entry = _set_entry(path, f"preferences.{rm}", entry, "generators", PREFERENCE_KEYS)
        if isinstance(entry, dict):
            names = entry["generators"]
            if not isinstance(names, list) or not names or any(n not in DOMAINS for n in names):
                raise SpecError(path, f"preferences.{rm}.generators", f"expected a list of {DOMAINS}, got {names!r}")
    for domain, entry in spec.heldout.items():
        where = f"heldout.{domain}"
        if isinstance(entry, dict):
            if "path" not in entry:
                raise SpecError(path, where, "expected a count (generated rows) or a file: {path: FILE, ...}")
            spec.heldout[domain] = _set_entry(path, where, entry, None, ())
        elif not isinstance(entry, int) or isinstance(entry, bool) or entry < 1:
            raise SpecError(path, where, f"expected a positive count (generated rows) or {{path: FILE}}, got {entry!r}")
        elif domain not in DOMAINS:
            raise SpecError(path, where, f"no generator {domain!r} (one of {DOMAINS}); give a file: {{path: FILE}}")
    return spec


def _check_keys(path: Path, where: str, entry, known: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        raise SpecError(path, where, f"expected a mapping, got {entry!r}")
    for key in entry:
        if key not in known:
            raise SpecError(path, f"{where}.{key}", f"unknown key; expected one of {sorted(known)}")


def _set_entry(path: Path, where: str, entry, generator_key: str | None, generated_keys: tuple[str, ...]):
    """A FileSet for ``{path: ...}``, else the generated entry as given (``count`` plus ``generator_key``)."""
    if not isinstance(entry, dict):
        raise SpecError(path, where, f"expected a mapping, got {entry!r}")
    if "path" in entry:
        if generator_key in entry:
            raise SpecError(path, where, f"give exactly one of {generator_key}: or path:")
        _check_keys(path, where, entry, FILE_KEYS)
        file_set = FileSet(**entry)
        _check_file_fields(path, where, file_set)
        return file_set
    _check_keys(path, where, entry, generated_keys)
    if generator_key not in entry:
        raise SpecError(path, where, f"give exactly one of {generator_key}: or path:")
    if not isinstance(entry.get("count"), int) or entry["count"] < 1:
        raise SpecError(path, f"{where}.count", f"a generated set needs a positive count, got {entry.get('count')!r}")
    return entry


def _check_file_fields(path: Path, where: str, entry: Source | FileSet) -> None:
    if entry.format != "auto" and entry.format not in FORMATS:
        raise SpecError(path, f"{where}.format", f"{entry.format!r}; expected auto or one of {FORMATS}")
    if entry.on_error not in ON_ERROR:
        raise SpecError(path, f"{where}.on_error", f"{entry.on_error!r}; expected one of {ON_ERROR}")
    if entry.count is not None and (not isinstance(entry.count, int) or isinstance(entry.count, bool)
                                    or entry.count < 1):
        raise SpecError(path, f"{where}.count", f"expected a positive integer (or no count: every row), got "
                        f"{entry.count!r}")
    if entry.instruction is not None and (not isinstance(entry.instruction, str) or not entry.instruction.strip()):
        raise SpecError(path, f"{where}.instruction", "expected a non-empty string")


def _check_params(spec: MixtureSpec, where: str, name: str, own: dict | None = None) -> None:
    """Draw once from generator ``name`` with the parameters a set would use; a bad one is a SpecError at ``where``."""
    try:
        generator(name, **spec.generator_params(name, own))(random.Random(0))
    except (ValueError, TypeError) as e:
        raise SpecError(spec.path, where, str(e)) from e


def _target(spec: MixtureSpec, source: Source) -> int | None:
    """The rows a source should give; None: every row of its file."""
    if source.count is None and source.weight is None:
        return None
    return source.count if source.count is not None else round(source.weight * spec.sft_total)


def _with_instruction(turns: list[dict], instruction: str | None) -> list[dict]:
    """``turns`` with ``instruction`` appended, after a blank line, to the last user turn."""
    if not instruction:
        return turns
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    return [{**t, "content": f"{t['content']}\n\n{instruction}"} if i == last else t for i, t in enumerate(turns)]


def _last_user(turns: list[dict]) -> str:
    return next(t["content"] for t in reversed(turns) if t["role"] == "user")


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
        self.heldout_prompts: set[str] = set()  # normalized, before any file instruction is added
        self._decon: Decontaminator | None = None
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
            if isinstance(count, FileSet):
                sets[domain], replies = self._heldout_file(domain, count)
                chat += replies
                continue
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

    def _heldout_file(self, domain: str, entry: FileSet) -> tuple[Dataset, list[dict]]:
        """A held-out set read from a file (registered before its instruction is added, as generated prompts are
        compared), and its reference conversations when the format has replies."""
        rows = self._file_set(entry, "rl_prompts", f"heldout.{domain}", domain=entry.domain or domain, train=False)
        self.heldout_prompts |= {normalize(_last_user(row["prompt"])) for row in rows}
        chat = []
        if entry.format == "auto" or entry.format in KIND_FORMATS["conversations"]:
            try:  # the same file as conversations: GSM8K's worked solutions, HumanEval's canonical ones, chat replies
                replies = load(entry.path, kind="conversations", format=entry.format, on_error=entry.on_error)
            except ValueError:  # a prompt-only format (DataError is a ValueError too): no reference replies
                replies = None
            if replies is not None:
                by_id = {row["id"]: row["messages"] for row in replies}
                chat = [{"messages": _with_instruction(by_id[row["id"]], entry.instruction), "domain": row["domain"],
                         "source": row["source"], "id": row["id"]} for row in rows if row["id"] in by_id]
        for row in rows:
            row["prompt"] = _with_instruction(row["prompt"], entry.instruction)
        return _columns(rows, "rl_prompts"), chat

    # -- file sets ------------------------------------------------------------------------------------------
    def _file_set(self, entry: FileSet, kind: str, where: str, domain: str | None = None,
                  train: bool = True) -> list[dict]:
        """``entry.count`` rows of ``kind`` from ``entry.path`` (every row, in the file's order, when no count; else
        a seeded shuffle). ``train``: drop exact duplicates and rows that share a held-out prompt (exactly, or by
        n-gram overlap with the held-out sets and ``decontaminate.against``), drawing others in their place, and add
        the instruction. Held-out rows come back as read (the caller registers them, then instructs them)."""
        label = where.replace(".", "/")
        skips = SkipReport(entry.path)
        data = load(entry.path, kind=kind, format=entry.format, on_error=entry.on_error, domain=domain,
                    source=entry.path, report=skips)
        if entry.count is not None and entry.count > len(data):
            skipped = f" ({skips.total_skipped} bad rows skipped)" if skips.total_skipped else ""
            raise SpecError(self.spec.path, f"{where}.count", f"{entry.count} rows asked of {entry.path}, which has "
                            f"{len(data)} usable rows{skipped}; ask for at most {len(data)}, or drop count: to take "
                            "every row")
        rows = data.to_list()
        if entry.count is not None and entry.count < len(rows):
            _rng(self.spec.seed, "file", label).shuffle(rows)
        want = len(rows) if entry.count is None else entry.count
        kept, dropped = rows[:want], Counter()
        if train:
            decon, seen, kept = self._decontaminator(), set(), []
            columns = [name for name in FEATURES[kind] if name not in ("domain", "source", "id")]
            for row in rows:
                if len(kept) == want:
                    break
                users = [t["content"] for t in row["prompt"] if t["role"] == "user"]
                key = hash(normalize(json.dumps([row[name] for name in columns])))
                if key in seen:
                    dropped["exact duplicate"] += 1
                elif normalize(users[-1]) in self.heldout_prompts:
                    dropped["held-out prompt"] += 1
                elif decon.contaminated(" ".join(users)):
                    dropped["eval overlap (decontaminated)"] += 1
                else:
                    seen.add(key)
                    row["prompt"] = _with_instruction(row["prompt"], entry.instruction)
                    kept.append(row)
            if entry.count is not None and len(kept) < want:  # the drops outnumbered the rows left to draw
                self.report.setdefault("shortfall", {})[label] = want - len(kept)
        self.report.setdefault("file_sets", {})[label] = {
            "path": entry.path, "wanted": "all" if entry.count is None else entry.count, "read": skips.kept,
            "skipped_bad_rows": dict(skips.skipped), "dropped": dict(dropped), "realised": len(kept)}
        return kept

    # -- SFT ------------------------------------------------------------------------------------------------
    def sft(self) -> Dataset:
        rows, counts = [], {}
        for source in self.spec.sources:
            want = _target(self.spec, source)
            if source.generator:
                rng = _rng(self.spec.seed, "sft", source.name)
                drawn = self._draw([source.generator], want, rng, f"sft/{source.name}", unique=source.dedup,
                                   params=self.spec.generator_params(source.generator, source.params))
                new = [{**_conversation(e, source.name, f"{source.name}/{i}"), "domain": source.domain}
                       for i, e in enumerate(drawn)]
            else:
                new = self._file_rows(source, want, self._decontaminator())
            counts[source.name] = {"domain": source.domain, "wanted": "all" if want is None else want,
                                   "realised": len(new)}
            rows += new
        self.report["sft_sources"] = counts
        self.report["sft_domains"] = dict(Counter(r["domain"] for r in rows))
        return _columns(rows, "conversations")

    def _decontaminator(self) -> Decontaminator:
        """Built once, after the held-out sets (which every caller follows)."""
        if self._decon is None:
            texts = list(self.heldout_prompts)
            for path in self.spec.decontaminate_against:
                eval_set = load(path, kind="rl_prompts", on_error="skip")
                texts += [p[-1]["content"] for p in eval_set["prompt"]]
            self._decon = Decontaminator(texts)
        return self._decon

    def _file_rows(self, source: Source, want: int | None, decon: Decontaminator) -> list[dict]:
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
                messages = _with_instruction(row["messages"], source.instruction)
                rows.append({**row, "messages": messages, "domain": source.domain, "source": source.name})
        self.report.setdefault("file_sources", {})[source.name] = {
            "read": skips.kept, "skipped_bad_rows": dict(skips.skipped), "dropped": dict(dropped)}
        return rows

    # -- preferences and RL prompts ---------------------------------------------------------------------------
    def preferences(self) -> dict[str, Dataset]:
        sets = {}
        for rm, entry in self.spec.preferences.items():
            if isinstance(entry, FileSet):
                sets[rm] = _columns(self._file_set(entry, "preferences", f"preferences.{rm}", entry.domain),
                                    "preferences")
                continue
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
            if isinstance(entry, FileSet):
                sets[name] = _columns(self._file_set(entry, "rl_prompts", f"rl.{name}", entry.domain), "rl_prompts")
                continue
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


def ensure_built(data_dir: str | Path, recipe: str | Path | None, needs: str) -> Path:
    """``data_dir``, built from ``recipe`` first when it has no ``needs`` set yet (e.g. ``sft``, ``preferences``,
    ``rl``): each pipeline builds its data when missing, so a recipe runs on a fresh clone."""
    data_dir = Path(data_dir)
    if not (data_dir / needs).exists():
        if not recipe:
            raise FileNotFoundError(f"{data_dir}/{needs} does not exist and no data_recipe is set to build it "
                                    "(python -m data_prep build RECIPE, or set data_recipe)")
        logger.info("building the data mixture %s into %s", recipe, data_dir)
        Builder(load_spec(recipe), data_dir).build()
        if not (data_dir / needs).exists():
            raise FileNotFoundError(f"{recipe} built {data_dir} without a {needs}/ set; this pipeline needs one "
                                    f"(add it to the recipe)")
    return data_dir


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
    for key in ("rejected_heldout_overlap", "duplicates_redrawn", "shortfall", "file_sources", "file_sets"):
        if report.get(key):
            lines += ["", f"{key}: `{json.dumps(report[key])}`"]
    for key in ("overlap_with_heldout", "tokenizer_vocab_size", "avg_tokens_per_conversation", "generate_seconds",
                "total_seconds"):
        if key in report:
            lines.append(f"- {key}: {report[key]}")
    return "\n".join(lines) + "\n"
