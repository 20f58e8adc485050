"""Code reward: the fraction of a problem's tests that the completion's program passes, in the sandbox.

    code_execution(completions, tests=[["assert add(1, 2) == 3", ...]])               # MBPP-style asserts
    code_execution(completions, tests=[humaneval["test"]], entry_point=["add"],
                   code_prefix=[humaneval["prompt"]])                                  # HumanEval-style
    get("code_execution", timeout_s=5)                                                 # other limits

The program is the completion's code: its longest ```python block (a full solution rather than a
usage snippet; ties go to the last), else its raw text. HumanEval-style rows give `tests` as one
test program defining `check(candidate)` plus an `entry_point`; when `check` is only asserts, each
assert becomes its own test (partial credit, as for MBPP), otherwise `check(entry_point)` is one
test. A prefix (`code_prefix`, or TRL's `prompts` when they are Python defining `entry_point`) goes
in front of the code: completions that only continue the prompt's function body need it, and full
solutions still see the prompt's helper functions. Rows without tests score None (TRL skips them).

Every completion in a batch runs in its own jailed child, all cores in parallel (rewards.sandbox).
"""

import ast
import functools
import re

from rewards.completions import completion_text
from rewards.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, run_many

FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # unclosed: a truncated completion
PYTHON_TAGS = ("python", "py", "python3")
SPLIT_CACHE_SIZE = 4096
DEFINES_CHECK = re.compile(r"^def\s+check\s*\(", re.MULTILINE)  # a HumanEval-style test program


def extract_code(text: str) -> str:
    """The longest ```python (or untagged) fenced block in `text`, ties to the last; the raw text if none."""
    blocks = FENCE.findall(text)
    python = [body for tag, body in blocks if tag.lower() in PYTHON_TAGS]
    candidates = python or [body for tag, body in blocks if not tag]
    if not candidates:
        return text
    return max(reversed(candidates), key=len)


@functools.lru_cache(maxsize=SPLIT_CACHE_SIZE)
def humaneval_tests(test_program: str, entry_point: str) -> tuple[str, ...]:
    """One test per assert of `check(candidate)` when its body is only asserts; else the whole check."""
    whole = (test_program + f"\n\ncheck({entry_point})\n",)
    try:
        module = ast.parse(test_program)
    except SyntaxError:
        return whole
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        return whole
    check = checks[0]
    body = [node for node in check.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    if not body or not all(isinstance(node, ast.Assert) for node in body):
        return whole
    preamble = "\n".join(ast.unparse(node) for node in module.body if node is not check)
    candidate = check.args.args[0].arg
    return tuple(f"{preamble}\n\ndef check({candidate}):\n    {ast.unparse(node)}\n\ncheck({entry_point})\n"
                 for node in body)


def build_program(code: str, entry_point: str | None = None, prefix: str | None = None) -> str:
    """`code`, with `prefix` in front when there is one: directly when the code continues the prefix's
    function, on a new line when the code defines `entry_point` itself (only if the prefix is Python)."""
    if not prefix:
        return code
    if _defines(code, entry_point):
        return prefix + "\n" + code if _is_python(prefix) else code
    return prefix + code


def _defines(code: str, entry_point: str | None) -> bool:
    return bool(entry_point) and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


class CodeExecution:
    """TRL reward: per completion, passed / total tests in the sandbox (None for rows without tests)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                 max_workers: int | None = None, split_humaneval: bool = True):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.max_workers, self.split_humaneval = max_workers, split_humaneval
        self.__name__ = "code_execution"

    def __call__(self, completions, tests, entry_point=None, code_prefix=None, prompts=None,
                 **unused) -> list[float | None]:
        n = len(completions)
        entry_point = _column(entry_point, n, "entry_point")
        prefixes = _column(code_prefix, n, "code_prefix") if code_prefix is not None else [
            p if isinstance(p, str) and _defines(p, e) and _is_python(p) else None
            for p, e in zip(_column(prompts, n, "prompts"), entry_point)]
        tests = _column(tests, n, "tests")
        jobs, rows = [], []
        for i, completion in enumerate(completions):
            row_tests = self._tests(tests[i], entry_point[i], i)
            if row_tests:
                code = extract_code(completion_text(completion))
                jobs.append((build_program(code, entry_point[i], prefixes[i]), row_tests))
                rows.append(i)
        results = run_many(jobs, max_workers=self.max_workers, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        rewards = [None] * n
        for i, result in zip(rows, results):
            rewards[i] = result.fraction
        return rewards

    def _tests(self, row_tests, entry_point, row: int) -> list[str]:
        """The row's tests as sources to run one by one: one program (str) or a list of sources (MBPP asserts;
        ``data_prep.load`` gives a HumanEval program as ``[program]``). A HumanEval test program only defines
        ``check(candidate)``: with an ``entry_point`` it is split into one test per assert (or ``check(entry_point)``
        appended); anything else runs as it is."""
        if row_tests is None:
            return []
        sources = [row_tests] if isinstance(row_tests, str) else list(row_tests)
        if not all(isinstance(t, str) for t in sources):
            raise TypeError(f"code_execution: tests[{row}] must be a test program (str) or a list of test "
                            f"sources (list[str]), got {type(row_tests).__name__} of other items")
        out = []
        for source in sources:
            if entry_point and DEFINES_CHECK.search(source):
                out += (humaneval_tests(source, entry_point) if self.split_humaneval
                        else [source + f"\n\ncheck({entry_point})\n"])
            else:
                out.append(source)
        return out


code_execution = CodeExecution()


def _column(values, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"code_execution got {n} completions but {len(values)} values in column {name!r}; "
                         "every dataset column must have one entry per completion")
    return values


@functools.lru_cache(maxsize=SPLIT_CACHE_SIZE)
def _is_python(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True
