"""The sandbox: honest programs score what they pass; hostile ones score 0, stay contained, harm nothing."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from rewards import sandbox
from rewards.sandbox import run_many, run_tests
from tests.conftest import REPO

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(5, 0) == 5", "assert add('a', 'b') == 'ab'"]
SHORT_TIMEOUT_S = 2.0
SLACK_S = 3.0  # process start, kill and clean-up on a loaded 2-core machine
HOSTILE_BATCH_LIMIT_S = 60.0

# program, tests, expected status, expected per-test outcomes
OUTCOMES = [
    (ADD, ADD_TESTS, "ok", (True, True, True)),
    ("def add(a, b):\n    return a - b\n", ADD_TESTS, "ok", (False, True, False)),
    ("def add(a, b) return a + b", ADD_TESTS, "syntax_error", (False, False, False)),
    ("raise ValueError('boom')\n" + ADD, ADD_TESTS, "runtime_error", (False, False, False)),
    (ADD, ["assert add(1, 2) == 3", "assert add(1, 2) ==", "assert add(2, 2) == 4"], "ok", (True, False, True)),
    (ADD, ["assert add(1, 2) == 3", "while True: pass", "assert add(2, 2) == 4"], "timeout", (True, False, False)),
    (ADD, ["assert add(1, 2) == 3", "import os; os._exit(0)", "assert add(2, 2) == 4"], "crash", (True, False, False)),
    (ADD, ["assert add(1, 2) == 3", "x = ' ' * (1 << 40)", "assert add(2, 2) == 4"], "memory", (True, False, True)),
    (ADD, [], "ok", ()),
    # Tested functions must return builtin data, nested and cyclic included; anything else fails the test.
    ("def f():\n    return {'k': [(1, 2.0, 'x', b'y', None, True, {3}, frozenset({4}), range(2))]}",
     ["assert f() == {'k': [(1, 2.0, 'x', b'y', None, True, {3}, frozenset({4}), range(2))]}"], "ok", (True,)),
    ("def f():\n    a = [1]\n    a.append(a)\n    return a", ["assert f()[0] == 1"], "ok", (True,)),
    ("from fractions import Fraction\ndef f():\n    return Fraction(1, 2)", ["assert f() == 0.5"], "ok", (False,)),
]


@pytest.mark.parametrize("program,tests,status,outcomes", OUTCOMES)
def test_outcomes(program, tests, status, outcomes):
    result = run_tests(program, tests, timeout_s=SHORT_TIMEOUT_S)
    assert (result.status, result.outcomes) == (status, outcomes), result.stderr
    assert result.passed == sum(outcomes) and result.total == len(outcomes)


# Honest programs that use the standard library the way solutions do: the jail must not break them.
LEGIT = {
    "namedtuple": "from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f(x): return P(x, 1).x + 1",
    "typing": "from typing import List, NamedTuple\nclass P(NamedTuple):\n    x: int\n"
              "def f(x: int) -> int: return P(x).x + 1",
    "dataclass": "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int\ndef f(x): return P(x).x + 1",
    "enum": "import enum\nColor = enum.Enum('Color', 'RED GREEN')\ndef f(x): return x + Color.RED.value",
    "files_in_cwd": "import os, tempfile\nopen('data.txt', 'w').write('1')\nos.mkdir('d')\n"
                    "tempfile.NamedTemporaryFile(delete=True).close()\n"
                    "def f(x): return x + int(open('data.txt').read())",
    "threads": "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\nt.start(); t.join()\n"
               "def f(x): return x + out[0]",
    "stdlib": "import math, hashlib, heapq, bisect, itertools, functools, re, fractions, statistics, random\n"
              "import weakref, inspect, traceback, copy, string, json, operator\n"
              "def f(x): return int(math.sqrt(x * x)) + len(re.findall('a', 'a'))",
    "prints": "print('hello'); import sys; print('warn', file=sys.stderr)\ndef f(x): return x + 1",
    "counter": "from collections import Counter\ndef f(x): return Counter([x])[x] + x",
    "logging": "import logging\nlogging.getLogger('solution').warning('hi')\ndef f(x): return x + 1",
    "caught_errors": "def f(x):\n    try:\n        return {}[x]\n    except KeyError:\n        return x + 1",
}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legit_programs_pass(name):
    result = run_tests(LEGIT[name], ["assert f(1) == 2", "assert f(2) == 3"])
    assert (result.status, result.passed) == ("ok", 2), result.stderr


# ---------------------------------------------------------------- adversarial programs

SENTINEL_NAME = f"sandbox-escape-{uuid.uuid4().hex}"
SENTINELS = (f"/tmp/{SENTINEL_NAME}", str(REPO / SENTINEL_NAME))
CORRECT = "def f(x):\n    return x + 1\n"  # hostile programs start with a correct f: the hack must still cost
WITHOUT_CORRECT = {"print fake pass"}  # here the claim itself is the hack
HOSTILE_TESTS = ["assert f(1) == 2", "assert abs(f(1) - 2) < 1e-9", "assert f(2) == 3"]


def hostile_programs(port: int) -> dict[str, str]:
    tmp, repo = SENTINELS
    return {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "fork bomb via multiprocessing": "import multiprocessing\nwhile True:\n"
                                         "    multiprocessing.Process(target=id).start()",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', '{tmp}'])",
        "ctypes fork": "import ctypes\nctypes.CDLL(None).fork()",
        "thread bomb": "import threading, time\nwhile True:\n"
                       "    threading.Thread(target=time.sleep, args=(60,)).start()",
        "memory bomb": "x = [0] * (1 << 40)",
        "memory creep": "x = []\nwhile True:\n    x.append(' ' * (1 << 24))",
        "write /tmp": f"open('{tmp}', 'w').write('escaped')",
        "write repo": f"open('{repo}', 'w').write('escaped')",
        "write via ..": f"open('../../../../../..{tmp}', 'w').write('escaped')",
        "write via dir fd": f"import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
                            f"os.open('{SENTINEL_NAME}', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        "write via symlink": f"import os\nos.symlink('{tmp}', 'link')\nopen('link', 'w').write('escaped')",
        "write via pathlike": f"import pathlib\npathlib.Path('{tmp}').write_text('escaped')",
        "socket connect": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "raw _socket": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "killpg parent": "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "sys.exit(0)": "import sys\nsys.exit(0)",
        "os._exit(0)": "import os\nos._exit(0)",
        "raise SystemExit": "raise SystemExit(0)",
        "raise KeyboardInterrupt": "raise KeyboardInterrupt",
        "exit inside f": "import os\ndef f(x):\n    os._exit(0)",
        "print fake pass": "print('PASSED'); print('all tests passed'); print('{\"passed\": 3, \"total\": 3}')",
        "forge records on every fd": "import os\nfor fd in range(64):\n    for i in range(3):\n        try:\n"
                                     "            os.write(fd, b'0' * 32 + b' T %d 1\\n' % i)\n"
                                     "        except OSError:\n            pass\nos._exit(0)",
        "fill the disk": "for i in range(10 ** 6):\n    with open(f'f{i}', 'wb') as f:\n"
                         "        f.write(b'x' * (1 << 30))",
        "fill the disk via renames": "import os\nos.mkdir('d')\nfor i in range(10 ** 6):\n"
                                     "    open('d/f', 'wb').write(b'x' * (1 << 20))\n    os.rename('d', f'd{i}')\n"
                                     "    os.mkdir('d')",
        "flood stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "flood stderr": "import os\nwhile True:\n    os.write(2, b'x' * 65536)",
        "huge print": "print('x' * (1 << 34))",
        "__eq__ always true": "class Yes:\n    def __eq__(self, other): return True\n"
                              "    def __sub__(self, other): return 0\ndef f(x):\n    return Yes()",
        "int subclass": "class Yes(int):\n    def __eq__(self, other): return True\ndef f(x):\n    return Yes(0)",
        "patch AssertionError": "import builtins\nbuiltins.AssertionError = KeyboardInterrupt\ndef f(x):\n    return 0",
        "patch builtins": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.__dict__['len'] = lambda x: 0\n"
                          "def f(x):\n    return 0",
        "replace __builtins__": "__builtins__ = {'abs': lambda x: 0}\ndef f(x):\n    return 0",
        "rewrite caller's globals": "import sys\ndef f(x):\n"
                                    "    sys._getframe(1).f_globals['f'] = lambda x: x + 1\n    return 0",
        "walk traceback frames": "def f(x):\n    try:\n        1 / 0\n    except ZeroDivisionError as e:\n"
                                 "        frame = e.__traceback__.tb_frame.f_back\n"
                                 "        frame.f_globals['f'] = lambda x: x + 1\n    return 0",
        "gc object walk": "import gc\nfor o in gc.get_objects():\n    pass",
        "settrace": "import sys\nsys.settrace(lambda *a: None)",
        "signal handler introspection": "import signal, sys\n"
                                        "signal.signal(signal.SIGALRM, lambda *a: sys._getframe(1))\n"
                                        "signal.setitimer(signal.ITIMER_REAL, 1e-4, 1e-4)\ndef f(x):\n    return 0",
        "read /proc/self/mem": "open('/proc/self/mem', 'rb').read(1)",
        "import __main__": "import __main__\n__main__._child_main = None",
        "marshal code": "import marshal\nmarshal.loads(marshal.dumps(compile('1', 'x', 'eval')))",
        "code.replace": "def g():\n    return 1\ng.__code__ = g.__code__.replace(co_consts=(None, 2))",
        "raise rlimits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "own audit hook, then fork": "import os, sys\nsys.addaudithook(lambda *a: None)\nos.fork()",
    }


def _isolation_levels():
    return [level for level in sandbox.ISOLATION_LEVELS if sandbox._works(level)]  # "hook" always works


@pytest.fixture(scope="module")
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def canary():
    """A process in pytest's own process group: it dies if a program reaches out and kills our group."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module", params=_isolation_levels())
def hostile_results(request, listener, canary):
    programs = hostile_programs(listener.getsockname()[1])
    names = sorted(programs)
    temp_dirs_before = set(os.listdir("/tmp"))
    start = time.monotonic()
    results = run_many([(("" if n in WITHOUT_CORRECT else CORRECT) + programs[n], HOSTILE_TESTS) for n in names],
                       timeout_s=SHORT_TIMEOUT_S, level=request.param)
    left_behind = {d for d in set(os.listdir("/tmp")) - temp_dirs_before if d.startswith("sandbox-")}
    return request.param, dict(zip(names, results)), time.monotonic() - start, left_behind


# These run to completion (status "ok") with every test failing; all others must end in another status.
RETURNS_BAD_VALUES = {"__eq__ always true", "int subclass", "patch AssertionError", "patch builtins",
                      "replace __builtins__", "rewrite caller's globals", "walk traceback frames",
                      "signal handler introspection", "print fake pass"}


@pytest.mark.parametrize("name", sorted(hostile_programs(0)))
def test_hostile_program_scores_zero(hostile_results, name):
    level, results, _, _ = hostile_results
    result = results[name]
    assert result.passed == 0, f"[{level}] {name}: {result}"
    assert result.status != "ok" or name in RETURNS_BAD_VALUES, f"[{level}] {name}: {result}"
    assert result.wall_s < SHORT_TIMEOUT_S + SLACK_S, f"[{level}] {name} ran {result.wall_s:.1f}s"



def test_hostile_programs_harm_nothing(hostile_results, listener, canary):
    level, results, elapsed, left_behind = hostile_results
    for path in SENTINELS:
        assert not os.path.exists(path), f"[{level}] a program wrote {path}"
    with pytest.raises(OSError):  # socket.timeout: nobody connected
        listener.accept()
    assert canary.poll() is None, f"[{level}] a process in pytest's group was killed"
    os.kill(os.getpid(), 0)  # and we are alive to say so
    assert elapsed < HOSTILE_BATCH_LIMIT_S, f"[{level}] the hostile batch took {elapsed:.0f}s"
    assert not left_behind, f"[{level}] temporary directories left behind: {left_behind}"


@pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="needs root, unshare and setpriv")
def test_jail_contains_even_without_the_audit_hook(listener, canary):
    """The second layer: a program that got past the hook still has no network, cannot signal us or write
    root-owned files, and its fork count is capped."""
    port = listener.getsockname()[1]
    probe = f"""
import os, signal, socket
for attempt in (lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1),
                lambda: os.kill({os.getpid()}, signal.SIGKILL),
                lambda: os.kill({canary.pid}, signal.SIGKILL),
                lambda: open('{SENTINELS[1]}', 'w')):
    try:
        attempt()
        print('ESCAPED')
    except OSError as error:
        print('contained', type(error).__name__)
"""
    jail = sandbox._jail_argv("namespaces", sandbox.UID_BASE + 7)
    out = subprocess.run([*jail, sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True,
                         timeout=30, cwd="/")
    assert out.returncode == 0 and out.stdout.count("contained") == 4 and "ESCAPED" not in out.stdout, out


def test_only_nonce_signed_records_count():
    nonce = "ab" * 16
    records = (b"00000000000000000000000000000000 T 0 1\n"  # wrong nonce
               + f"{nonce} T 1 0\n{nonce} T 1 1\n".encode()  # first record per test wins
               + f"{nonce} T 2 1\n{nonce} T 9 1\n{nonce} S ok\n".encode())  # out-of-range index ignored
    assert sandbox._score(records, nonce, 3) == ((False, False, True), "ok")
    assert sandbox._score(b"PASSED\nall tests passed\n", nonce, 2) == ((False, False), None)


def test_unknown_isolation_level_says_what_to_use():
    with pytest.raises(ValueError, match="isolation"):
        run_tests(ADD, ADD_TESTS, level="docker")


WRONG = "def f(x):\n    return 0\n"
FAKE_ISCLOSE = "lambda *a, **k: True"
# Programs that change how the tests see stdlib modules, then answer wrong: each test must still fail.
STDLIB_PATCHES = {
    "patch math.isclose, tests import math": (
        f"import math\nmath.isclose = {FAKE_ISCLOSE}\n" + WRONG, ["import math\nassert math.isclose(f(1), 2)"]),
    "patch math.isclose, tests use the program's import": (
        f"import math\nmath.isclose = {FAKE_ISCLOSE}\n" + WRONG, ["assert math.isclose(f(1), 2)"]),
    "patch from inside the tested function": (
        f"import math\ndef f(x):\n    math.isclose = {FAKE_ISCLOSE}\n    return 0\n",
        ["import math\nassert math.isclose(f(1), 2)", "assert math.isclose(f(1), 2)"]),
    "replace the sys.modules entry": (
        f"import sys, types\nfake = types.ModuleType('math')\nfake.isclose = {FAKE_ISCLOSE}\nsys.modules['math'] = fake\n"
        + WRONG, ["import math\nassert math.isclose(f(1), 2)", "from math import isclose\nassert isclose(f(1), 2)"]),
    "bind the module's name to a fake object": (
        f"class Fake:\n    isclose = staticmethod({FAKE_ISCLOSE})\nmath = Fake()\n" + WRONG,
        ["assert math.isclose(f(1), 2)"]),
    "bind the module's name to a fake module": (
        f"import types\nmath = types.ModuleType('math')\nmath.isclose = {FAKE_ISCLOSE}\n" + WRONG,
        ["assert math.isclose(f(1), 2)"]),
    "rename the module, then patch it": (
        f"import math\nmath.__name__ = 'other'\nmath.isclose = {FAKE_ISCLOSE}\n" + WRONG,
        ["assert math.isclose(f(1), 2)", "import math\nassert math.isclose(f(1), 2)"]),
    "patch a submodule": (
        "import os.path\nos.path.join = lambda *a: 'x'\ndef f(x):\n    return 'x'\n",
        ["import os.path\nassert f(1) == os.path.join('a', 'b')", "from os import path\nassert f(1) == path.join('a', 'b')"]),
    "patch a builtin from inside the tested function": (
        "import builtins\ndef f(x):\n    builtins.abs = lambda v: 0\n    return 0\n", ["assert abs(f(1) - 2) < 1e-9"]),
}


@pytest.mark.parametrize("name", sorted(STDLIB_PATCHES))
def test_a_patched_stdlib_module_never_turns_a_wrong_answer_into_a_pass(name):
    program, tests = STDLIB_PATCHES[name]
    result = run_tests(program, tests, timeout_s=SHORT_TIMEOUT_S)
    assert result.status == "ok" and result.passed == 0, f"{name}: {result}"


def test_tests_still_use_the_stdlib_as_the_program_imported_it():
    """The clean copies behave as the modules: an honest program's tests pass, imported or not, whole or in part."""
    program = "import math\nfrom collections import Counter\ndef f(x):\n    return math.sqrt(x)\n"
    tests = ["import math\nassert math.isclose(f(4), 2.0)", "assert math.isclose(f(9), 3.0)",
             "from math import isclose, pi\nassert isclose(f(16), 4) and pi > 3", "assert Counter('aab')['a'] == 2",
             "import os.path\nassert os.path.join('a', 'b') == 'a/b'"]
    result = run_tests(program, tests, timeout_s=SHORT_TIMEOUT_S)
    assert (result.passed, result.total, result.status) == (5, 5, "ok"), result
