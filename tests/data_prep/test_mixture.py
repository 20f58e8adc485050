"""The mixture builder: counts, determinism, held-out disjointness, verifiable answers, file sources."""

import json
import random
import re

import pytest

from data_prep.dedup import normalize
from data_prep.mixture import Builder, SpecError, check_overlap, load_spec
from data_prep.generators import generator
from rewards.safety import is_refusal
from rewards.math import score
from rewards.sandbox import run_many

SPEC = """
name: mini
seed: {seed}
sft:
  total: 400
  sources:
    - {{name: math, generator: math, domain: math, weight: 0.5}}
    - {{name: code, generator: code, domain: code, weight: 0.1}}
    - {{name: reasoning, generator: reasoning, domain: reasoning, weight: 0.1}}
    - {{name: writing, generator: writing, domain: writing, weight: 0.05}}
    - {{name: general, generator: general, domain: general, weight: 0.05}}
    - {{name: safety, generator: safety, domain: safety, weight: 0.2}}
{extra}
preferences:
  reasoning: {{count: 60, generators: [math, code, reasoning]}}
  safety: {{count: 40, generators: [safety]}}
process: {{count: 40}}
rl:
  math: {{count: 100, generator: math}}
  code: {{count: 20, generator: code}}
heldout:
  math: 300
  code: 30
  safety: 60
tokenizer: {{train: false}}
"""


def _build(tmp_path, seed=0, extra="", save=False, spec=SPEC):
    path = tmp_path / f"mix{seed}.yaml"
    path.write_text(spec.format(seed=seed, extra=extra))
    return Builder(load_spec(path), tmp_path / f"out{seed}").build(save=save)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("mix"), save=True)


def test_counts_follow_the_spec(built):
    report = built["report"]
    assert len(built["sft"]) == 400
    assert report["sft_domains"] == {"math": 200, "code": 40, "reasoning": 40, "writing": 20, "general": 20,
                                     "safety": 80}
    assert report["counts"]["preferences/reasoning"] == 60 and report["counts"]["heldout/safety"] == 60
    safety = built["heldout"]["safety"]
    assert sorted(safety["answer"]).count("refuse") == 30  # held-out safety is half harmful, half look-alikes


def test_saved_build_has_data_and_report(built, tmp_path_factory):
    # built with save=True under its own tmp folder
    out = next(p for p in tmp_path_factory.getbasetemp().rglob("report.json"))
    report = json.loads(out.read_text())
    assert report["overlap_with_heldout"] == 0
    assert (out.parent / "sft" / "dataset_info.json").exists() and (out.parent / "report.md").exists()


def test_heldout_prompts_never_appear_in_training(built):
    training = [built["sft"], *built["preferences"].values(), *built["rl"].values()]
    assert check_overlap(built["heldout"], training) == 0
    held = {normalize(p[-1]["content"]) for p in built["heldout"]["math"]["prompt"]}
    assert built["report"]["rejected_heldout_overlap"].get("sft/math", 0) > 0  # collisions happened and were redrawn
    assert not held & {normalize(m[0]["content"]) for m in built["sft"]["messages"]}


def test_same_seed_same_data_other_seed_other_data(tmp_path, built):
    assert _build(tmp_path)["sft"]["messages"] == built["sft"]["messages"]
    assert _build(tmp_path, seed=1)["sft"]["messages"] != built["sft"]["messages"]


def test_math_answers_verify_and_rejected_ones_do_not(built):
    sft_math = [m for m, d in zip(built["sft"]["messages"], built["sft"]["domain"]) if d == "math"]
    rl = built["rl"]["math"]
    for prompt, answer in zip(rl["prompt"], rl["answer"]):
        assert answer.lstrip("-").isdigit(), prompt
    pairs = [r for r in built["preferences"]["reasoning"] if r["domain"] == "math"]
    assert pairs
    for row in pairs:
        gold = row["chosen"][0]["content"].rsplit("The answer is ", 1)[1].rstrip(".")
        assert score(row["chosen"][0]["content"], gold) == 1.0
        assert score(row["rejected"][0]["content"], gold) == 0.0
    assert all(m[-1]["content"].endswith(".") and "The answer is" in m[-1]["content"] for m in sft_math)


def test_process_labels_mark_the_first_slip_and_what_follows(built):
    process = built["process"]
    assert len(process) == 40
    for row in process:
        labels = row["labels"]
        assert len(labels) == len(row["completions"]) and row["completions"][-1].startswith("The answer is")
        if all(labels):
            continue
        first_wrong = labels.index(False)
        assert not any(labels[first_wrong:]) or first_wrong < len(labels) - 1  # the final answer is wrong too
        assert labels[-1] is False
    assert 10 < sum(all(r) for r in process["labels"]) < 30  # about half are fully right


def _digit_pairs(x: int, y: int) -> int:
    """How many places both numbers have a non-zero digit at."""
    dx, dy = str(abs(x))[::-1], str(abs(y))[::-1]
    return sum(a != "0" and b != "0" for a, b in zip(dx, dy))


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_solutions_are_worked_one_digit_pair_at_a_time(level):
    """Every step of a solution is true and handles at most one pair of digits (7 + 8, 40 + 30, 13 - 7, 70 + 15,
    40 * 6), never two numbers that both have tens and ones (the step a small model gets wrong); the last step
    is the problem's answer. Two-digit ± is 3 steps (tens, ones, their sum) unless both are whole tens."""
    rng, sample = random.Random(level), generator("math")
    for _ in range(300):
        example = sample(rng, level=level)
        steps = re.findall(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.", example.response)
        assert steps and example.answer == steps[-1][3], example.response
        for x, step_op, y, result in steps:
            x, y = int(x), int(y)
            assert {"+": x + y, "-": x - y, "*": x * y}[step_op] == int(result), example.response
            if step_op == "*":
                assert len(str(x).strip("0")) == 1 and len(str(y).strip("0")) == 1, example.response
            else:
                assert _digit_pairs(x, y) <= 1 or min(abs(x), abs(y)) < 10, example.response
        if level == 2:
            a, op, b = re.search(r"(\d+) ([-+]) (\d+)", example.prompt).groups()
            assert len(steps) == 3 or int(a) % 10 == int(b) % 10 == 0, example.response
            assert example.answer == str(int(a) + int(b) if op == "+" else int(a) - int(b))


def test_reasoning_replies_are_worked_and_rejected_ones_make_one_slip():
    """Comparisons go by digits (the deciding fact is true in the reply and reversed in the rejected one); lists are
    counted item by item (the rejected count skips one); orderings name whoever nobody beats (the rejected one
    names the person in the middle)."""
    from data_prep.generators import reasoning

    rng = random.Random(0)
    for _ in range(200):
        e = reasoning._comparison(rng)
        a, b = map(int, re.findall(r"\d+", e.prompt))
        assert int(e.answer) == (max(a, b) if "larger" in e.prompt else min(a, b))
        x, y = map(int, re.search(r"(\d+) > (\d+)\.", e.response).groups()) if ">" in e.response else (1, 0)
        assert x > y
        if ">" in e.rejected:
            x, y = map(int, re.search(r"(\d+) > (\d+)\.", e.rejected).groups())
            assert x < y
        assert e.rejected.endswith(f"The answer is {a + b - int(e.answer)}.")

        e = reasoning._counting(rng)
        if "list" in e.prompt:
            items = e.prompt.split(": ", 1)[1].rstrip("?").split(", ")
            counted = ", ".join(f"{item} {i + 1}" for i, item in enumerate(items))
            assert e.response == f"{counted}. The answer is {len(items)}."
            assert e.rejected.count(",") == len(items) - 2 and e.rejected.endswith(f"is {len(items) - 1}.")

        e = reasoning._ordering(rng)
        named = re.search(r"(?:Nobody is \w+ than (\w+)|(\w+) is \w+ than nobody)", e.response).groups()
        wrong = re.search(r"(?:Nobody is \w+ than (\w+)|(\w+) is \w+ than nobody)", e.rejected).groups()
        name, other = next(filter(None, named)), next(filter(None, wrong))
        assert name == e.answer and other != e.answer
        beaten = re.findall(r"than (\w+)\.", e.prompt)  # everyone someone is above
        above = re.findall(r"(\w+) is \w+ than", e.prompt)
        assert (name not in beaten) if "Nobody" in e.response else (name not in above)
        assert other in beaten and other in above  # the middle person


def test_code_references_pass_their_tests_and_near_misses_fail():
    from rewards.code import extract_code

    rng = random.Random(0)
    examples = [generator("code")(rng) for _ in range(12)]
    jobs = [(extract_code(text), e.tests) for e in examples for text in (e.response, e.rejected)]
    results = run_many(jobs)
    for e, good, bad in zip(examples, results[::2], results[1::2]):
        assert good.passed == good.total == len(e.tests), e.prompt
        assert bad.passed < bad.total, e.rejected


def test_safety_replies_refuse_exactly_the_harmful_requests():
    rng = random.Random(0)
    for e in (generator("safety")(rng) for _ in range(300)):
        assert is_refusal(e.response) == e.harmful, e.prompt
        assert is_refusal(e.rejected) != e.harmful


def test_safety_preference_pairs_prefer_the_right_behaviour(built):
    for row in built["preferences"]["safety"]:
        assert is_refusal(row["chosen"][0]["content"]) != is_refusal(row["rejected"][0]["content"])


def test_file_sources_are_deduplicated_and_decontaminated(tmp_path, built):
    held = built["heldout"]["math"]["prompt"][0][-1]["content"]
    rows = [{"messages": [{"role": "user", "content": "Tell me about rivers and the sea please"},
                          {"role": "assistant", "content": "Rivers flow into the sea."}]}] * 3
    rows.append({"messages": [{"role": "user", "content": held}, {"role": "assistant", "content": "42"}]})
    rows.append({"messages": [{"role": "user", "content": "A unique question about mountains?"},
                              {"role": "assistant", "content": "They are tall."}]})
    path = tmp_path / "user.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    extra = f"    - {{name: mine, path: {path}, domain: general, count: 5}}"
    report = _build(tmp_path, extra=extra)["report"]
    assert report["sft_sources"]["mine"]["realised"] == 2
    assert report["file_sources"]["mine"]["dropped"] == {"exact duplicate": 2, "eval overlap (decontaminated)": 1}


@pytest.mark.parametrize("body,field", [
    ("bogus: 1", "bogus"),
    ("sft: {total: 10, sources: [{name: a, generator: poetry, domain: x, count: 1}]}", "generator"),
    ("sft: {total: 10, sources: [{name: a, generator: math, domain: x, count: 1, weight: 0.5}]}", "sft.sources[0]"),
    ("sft: {sources: [{name: a, generator: math, domain: x, weight: 0.5}]}", "sft.sources[0]"),
    ("preferences: {style: {count: 1, generators: [math]}}", "preferences.style"),
    ("sft: {total: 10, sources: [{name: a, generator: math, domain: x, count: 1, params: {level_weights: {9: 1}}}]}",
     "sft.sources[0].params"),
    ("sft: {total: 10, sources: [{name: a, generator: math, domain: x, count: 1, params: {colour: red}}]}",
     "sft.sources[0].params"),
    ("rl: {math: {count: 1, generator: math, params: {level_weights: {1: -1}}}}", "rl.math.params"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(body + "\n")
    with pytest.raises(SpecError, match=rf"bad\.yaml: .*{re.escape(field)}"):
        load_spec(path)


def test_heldout_conversations_pair_each_heldout_prompt_with_its_reference_reply(built):
    """``heldout/chat`` (eval's perplexity set): every held-out prompt once, under its id, with the generator's reply;
    the math replies state the held-out answer."""
    chat = built["heldout"]["chat"]
    sets = {k: v for k, v in built["heldout"].items() if k != "chat"}
    assert len(chat) == sum(len(v) for v in sets.values()) == 390
    by_id = {row["id"]: row["messages"] for row in chat}
    for domain, data in sets.items():
        for row in data:
            messages = by_id[row["id"]]
            assert messages[-2]["content"] == row["prompt"][-1]["content"] and messages[-1]["role"] == "assistant"
            if domain == "math":
                assert messages[-1]["content"].endswith(f"The answer is {row['answer']}.")


def test_a_set_draws_with_its_own_generator_params_and_the_other_sets_keep_the_recipe_s(tmp_path):
    """A math source (and an RL set) whose params ask for level 1 only gives one-digit problems, and its rows carry
    the source's domain; held-out math keeps the recipe's level mix."""
    extra = "    - {name: basics, generator: math, domain: arithmetic, count: 60, params: {level_weights: {1: 1.0}}}"
    spec = SPEC.replace("math: {{count: 100, generator: math}}",
                        "math: {{count: 100, generator: math, params: {{level_weights: {{1: 1.0}}}}}}")
    built = _build(tmp_path, extra=extra, spec=spec)
    basics = [m for m, s in zip(built["sft"]["messages"], built["sft"]["source"]) if s == "basics"]
    assert len(basics) == 60 and built["report"]["sft_domains"]["arithmetic"] == 60
    for messages in basics:
        assert re.fullmatch(r"\d [-+] \d = \d+\. The answer is \d+\.", messages[-1]["content"]), messages[-1]
    for prompt in built["rl"]["math"]["prompt"]:
        assert re.search(r"(?<!\d)\d [-+] \d(?!\d)", prompt[-1]["content"]), prompt
    held_levels = {re.search(r"/L(\d)/", i)[1] for i in built["heldout"]["math"]["id"]}
    assert held_levels == {"1", "2", "3", "4", "5"}
