"""RL prompt sets, held-out sets and preference pairs read from files: counts, determinism, held-out overlap removal,
instructions, spec errors; and the real-data recipe recipes/data/gsm8k.yaml built from the shared public files."""

import json
import random
import re

import pytest
from datasets import load_from_disk

from data_prep import load
from data_prep.dedup import normalize
from data_prep.generators import generator
from data_prep.mixture import Builder, SpecError, check_overlap, load_spec
from data_prep.readers import gsm8k_final_answer
from rewards.math import score
from tests.conftest import REPO, SHARED_DATA

ASK = "Show your work."
HELD = "Ann has 7 pens and buys 5 more at the shop near the station on the way home. How many pens?"
NEAR = "Ben owns 3 cats. Ann has 7 pens and buys 5 more at the shop near the station on the way home. How many?"


def _gsm8k(question: str, answer: int) -> dict:
    return {"question": question, "answer": f"Add them: <<{answer}>>{answer}.\n#### {answer:,}"}


# 12 train questions: one is a held-out question verbatim, one shares a 13-word run with it (n-gram overlap)
TRAIN = [_gsm8k(f"Tom has {i} apples and gets {i + 1} more from his aunt. How many apples?", 2 * i + 1)
         for i in range(10)] + [_gsm8k(HELD, 12), _gsm8k(NEAR, 12)]
TEST = [_gsm8k(HELD, 12), _gsm8k("Sue reads 4 books a week. How many in 3 weeks?", 12),
        _gsm8k("A box holds 1000 nails and 500 more are added. How many nails?", 1500)]
PAIR = {"prompt": "Which is kinder?", "chosen": "Helping.", "rejected": "Ignoring."}
PREFS = [PAIR, PAIR,  # an exact duplicate
         {"prompt": HELD, "chosen": "12", "rejected": "11"},  # shares a held-out prompt
         {"prompt": "Say hi.", "chosen": "Hi!", "rejected": ""},  # a bad row (empty reply): skipped with on_error: skip
         *({"prompt": f"Name a colour ({i}).", "chosen": "Blue.", "rejected": "Seven."} for i in range(5))]

SPEC = """
name: files
seed: {seed}
sft:
  sources:
    - {{name: train, path: {d}/train.jsonl, domain: math, near_dedup: false, instruction: {ask}}}
rl:
  math: {{path: {d}/train.jsonl, format: gsm8k, instruction: {ask}}}
  some: {{path: {d}/train.jsonl, count: 5, domain: arithmetic, instruction: {ask}}}
heldout:
  math: {{path: {d}/test.jsonl, instruction: {ask}}}
preferences:
  safety: {{path: {d}/prefs.jsonl, on_error: skip}}
  helpful: {{path: {d}/prefs.jsonl, on_error: skip, count: 3}}
tokenizer: {{train: false}}
"""


def _write(folder, name, rows):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    _write(folder, "train.jsonl", TRAIN)
    _write(folder, "test.jsonl", TEST)
    _write(folder, "prefs.jsonl", PREFS)
    return folder


def _build(data_dir, tmp_path, seed=0, save=False, spec=SPEC, **fields):
    path = tmp_path / f"spec{seed}.yaml"
    path.write_text(spec.format(seed=seed, d=data_dir, ask=json.dumps(ASK), **fields))
    return Builder(load_spec(path), tmp_path / f"out{seed}").build(save=save)


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    return _build(data_dir, tmp_path_factory.mktemp("built"), save=True)


# (set, rows, rows dropped by reason): 12 train rows less the held-out one and the 13-gram overlap; 9 pairs less a
# duplicate, a held-out prompt and a bad row; the counted sets draw from the rows left after the drops
EXPECTED = [
    ("rl/math", 10, {"held-out prompt": 1, "eval overlap (decontaminated)": 1}),
    ("rl/some", 5, None),
    ("heldout/math", 3, {}),
    ("preferences/safety", 6, {"exact duplicate": 1, "held-out prompt": 1}),
    ("preferences/helpful", 3, None),
]


@pytest.mark.parametrize("name,rows,dropped", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_file_sets_give_their_counts_and_count_what_they_drop(built, name, rows, dropped):
    group, set_name = name.split("/")
    assert len(built[group][set_name]) == rows == built["report"]["counts"][name]
    report = built["report"]["file_sets"][name]
    assert report["realised"] == rows
    if dropped is not None:
        assert report["dropped"] == dropped
    if name.startswith("preferences"):
        assert report["skipped_bad_rows"] == {"rejected[0].content: empty": 1}


def test_sft_from_a_file_without_a_count_takes_every_row_and_boxes_the_gsm8k_answer(built):
    assert built["report"]["sft_sources"]["train"] == {"domain": "math", "wanted": "all", "realised": 10}
    assert built["report"]["file_sources"]["train"]["dropped"] == {"eval overlap (decontaminated)": 2}
    for messages in built["sft"]["messages"]:
        question = messages[0]["content"].removesuffix(f"\n\n{ASK}")
        gold = next(r["answer"].rsplit("#### ", 1)[1].replace(",", "") for r in TRAIN if r["question"] == question)
        assert messages[-1]["content"].endswith(f"The answer is \\boxed{{{gold}}}.")


def test_the_instruction_ends_the_last_user_turn_of_every_row_from_its_file(built):
    prompts = [*built["rl"]["math"]["prompt"], *built["rl"]["some"]["prompt"], *built["heldout"]["math"]["prompt"]]
    prompts += [m[:-1] for m in built["sft"]["messages"]]
    assert all(p[-1]["content"].endswith(f"?\n\n{ASK}") for p in prompts)
    assert not any(ASK in p[-1]["content"] for p in built["preferences"]["safety"]["prompt"])  # no instruction given


def test_file_heldout_keeps_the_file_order_and_its_reference_replies(built):
    held = built["heldout"]["math"]
    assert [p[-1]["content"] for p in held["prompt"]] == [f"{r['question']}\n\n{ASK}" for r in TEST]
    assert held["answer"] == ["12", "12", "1500"] and set(held["domain"]) == {"math"}
    chat = {row["id"]: row["messages"] for row in built["heldout"]["chat"]}
    for row in held:
        assert chat[row["id"]][0]["content"] == row["prompt"][-1]["content"]
        assert chat[row["id"]][-1]["content"].endswith(f"\\boxed{{{row['answer']}}}.")


def test_no_training_row_shares_a_heldout_prompt(built):
    training = [built["sft"], *built["rl"].values(), *built["preferences"].values()]
    assert check_overlap(built["heldout"], training) == 0
    assert built["report"]["overlap_with_heldout"] == 0
    assert set(built["rl"]["some"]["domain"]) == {"arithmetic"} and set(built["rl"]["math"]["domain"]) == {"math"}


def test_a_build_without_generated_data_needs_no_tokenizer_and_saves_its_report(built, tmp_path_factory):
    report_path = next(tmp_path_factory.getbasetemp().glob("built*/out0/report.json"))
    report = json.loads(report_path.read_text())
    assert "tokenizer_vocab_size" not in report and not (report_path.parent / "tokenizer").exists()
    assert "file_sets" in (report_path.parent / "report.md").read_text()
    assert len(load_from_disk(str(report_path.parent / "rl" / "math"))) == 10


def test_same_seed_same_rows_other_seed_other_draw(built, data_dir, tmp_path):
    again = _build(data_dir, tmp_path)
    for group in ("rl", "preferences", "heldout"):
        for name, data in built[group].items():
            assert again[group][name].to_list() == data.to_list(), f"{group}/{name}"
    other = _build(data_dir, tmp_path, seed=1)
    assert other["rl"]["some"]["id"] != built["rl"]["some"]["id"]
    assert other["rl"]["math"].to_list() == built["rl"]["math"].to_list()  # every row, in the file's order


def test_a_count_larger_than_the_file_names_the_file_and_its_rows(data_dir, tmp_path):
    spec = SPEC.replace("count: 5,", "count: 13,")
    with pytest.raises(SpecError, match=r"rl\.some\.count: 13 rows asked of .*train\.jsonl, which has 12 usable rows"):
        _build(data_dir, tmp_path, spec=spec)


def test_file_heldout_prompts_turn_generated_draws_away(tmp_path):
    """A held-out file of one-digit sums: generated SFT rows of the same space are redrawn, and counted."""
    rng, sample = random.Random(0), generator("math")
    held = {e.prompt: e.answer for e in (sample(rng, level=1) for _ in range(400))}
    _write(tmp_path, "held.jsonl", [{"prompt": p, "answer": a} for p, a in held.items()])
    spec = """
seed: 0
sft:
  sources:
    - {{name: sums, generator: math, domain: math, count: 60, dedup: false, params: {{level_weights: {{1: 1.0}}}}}}
heldout:
  math: {{path: {d}/held.jsonl}}
tokenizer: {{train: false}}
"""
    built = _build(tmp_path, tmp_path, spec=spec)
    assert len(built["sft"]) == 60 and built["report"]["rejected_heldout_overlap"]["sft/sums"] > 0
    assert not {normalize(m[0]["content"]) for m in built["sft"]["messages"]} & {normalize(p) for p in held}


@pytest.mark.parametrize("body,field", [
    ("rl: {math: {path: f.jsonl, colour: red}}", "rl.math.colour"),
    ("rl: {math: {path: f.jsonl, generator: math}}", "rl.math"),
    ("rl: {math: {count: 3}}", "rl.math"),
    ("rl: {math: {path: f.jsonl, count: 0}}", "rl.math.count"),
    ("rl: {math: {count: 3, generator: math, path_: x}}", "rl.math.path_"),
    ("heldout: {math: {count: 3}}", "heldout.math"),
    ("heldout: {math: {path: f.jsonl, generator: math}}", "heldout.math.generator"),
    ("heldout: {poetry: 10}", "heldout.poetry"),
    ("preferences: {style: {path: f.jsonl}}", "preferences.style"),
    ("preferences: {safety: {path: f.jsonl, format: yaml}}", "preferences.safety.format"),
    ("preferences: {safety: {path: f.jsonl, on_error: ignore}}", "preferences.safety.on_error"),
    ("preferences: {safety: {path: f.jsonl, generators: [safety]}}", "preferences.safety"),
    ("preferences: {safety: {count: 3, generators: [poetry]}}", "preferences.safety.generators"),
    ("sft: {sources: [{name: a, generator: math, domain: math, count: 1, instruction: hi}]}",
     "sft.sources[0].instruction"),
    ("sft: {sources: [{name: a, path: f.jsonl, domain: math, colour: red}]}", "sft.sources[0].colour"),
])
def test_bad_file_entries_name_the_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(body + "\n")
    with pytest.raises(SpecError, match=rf"bad\.yaml: {re.escape(field)}: "):
        load_spec(path)


@pytest.mark.parametrize("solution,reply_end", [
    ("2 + 2 = <<2+2=4>>4.\n#### 4", "2 + 2 = 4.\nThe answer is \\boxed{4}."),
    ("1,000 + 200 = 1,200\n#### 1,200", "The answer is \\boxed{1200}."),
    ("It falls by 3.\n#### -3", "The answer is \\boxed{-3}."),
])
def test_gsm8k_replies_end_with_the_boxed_answer(tmp_path, solution, reply_end):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": solution}) + "\n")
    reply = load(path)[0]["messages"][-1]["content"]
    assert reply.endswith(reply_end) and score(reply, solution) == 1.0


# ------------------------------------------------------------------------------------ the real-data GSM8K recipe

GSM8K_RECIPE = REPO / "recipes" / "data" / "gsm8k.yaml"
DEEPSEEKMATH_ASK = "Please reason step by step, and put your final answer within \\boxed{}."
NEEDED = [SHARED_DATA / "gsm8k" / "train.jsonl", SHARED_DATA / "gsm8k" / "test.jsonl",
          SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"]


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        pytest.skip(f"shared public data absent ({', '.join(missing)}); it sits beside the repository in CI")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the recipe's paths are relative to the repository root
        return Builder(load_spec(GSM8K_RECIPE), tmp_path_factory.mktemp("gsm8k")).build()


def test_gsm8k_recipe_counts(gsm8k):
    counts = gsm8k["report"]["counts"]
    assert counts["heldout/math"] == counts["heldout/chat"] == 1319
    dropped = gsm8k["report"]["file_sources"]["gsm8k"]["dropped"]
    assert counts["sft"] + sum(dropped.values()) == 7473 and counts["sft"] > 7400
    assert counts["rl/math"] + sum(gsm8k["report"]["file_sets"]["rl/math"]["dropped"].values()) == 7473
    assert counts["preferences/safety"] == 2308  # 2,312 pairs less 4 with an empty reply
    assert gsm8k["report"]["overlap_with_heldout"] == 0


def test_gsm8k_prompts_all_ask_for_a_boxed_answer(gsm8k):
    prompts = [*gsm8k["rl"]["math"]["prompt"], *gsm8k["heldout"]["math"]["prompt"]]
    prompts += [m[:-1] for m in gsm8k["sft"]["messages"]]
    assert all(p[-1]["content"].endswith(f"\n\n{DEEPSEEKMATH_ASK}") for p in prompts)


def test_gsm8k_sft_replies_box_the_gold_answer_and_verify(gsm8k):
    records = [json.loads(line) for line in NEEDED[0].read_text().splitlines()]
    sft = gsm8k["sft"]
    golds = [gsm8k_final_answer(records[int(row_id.rsplit(":", 1)[1]) - 1]["answer"]) for row_id in sft["id"]]
    replies = [m[-1]["content"] for m in sft["messages"]]
    for reply, gold in zip(replies, golds):
        assert reply.endswith(f"\\boxed{{{gold}}}."), reply
    for i in random.Random(0).sample(range(len(sft)), 200):
        assert score(replies[i], golds[i]) == 1.0, replies[i]


def test_gsm8k_rl_prompts_are_disjoint_from_the_heldout_ones(gsm8k):
    held = {normalize(p[-1]["content"]) for p in gsm8k["heldout"]["math"]["prompt"]}
    assert not held & {normalize(p[-1]["content"]) for p in gsm8k["rl"]["math"]["prompt"]}
    assert all(a.lstrip("-").replace(".", "", 1).isdigit() for a in gsm8k["rl"]["math"]["answer"])
