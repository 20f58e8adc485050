"""The sandbox: run untrusted code (a model's completion) against tests, and count what passed.

    result = run_tests("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3"])
    result.passed, result.total, result.status        # 1, 1, "ok"
    results = run_many([(program, tests), ...])       # in parallel, one child per job, all cores

How a run works. The parent makes a fresh temporary directory and a private pipe, and starts a child
Python (`-I -S -B`: no environment, no site-packages, no bytecode writes) in a new session, inside
whatever jail this host allows (`isolation()`):

  "namespaces"  (root)  `unshare` gives the child its own network namespace (no interfaces but a
                        downed loopback), PID namespace (it cannot see or signal anything outside; when
                        it dies every process it made dies) and IPC namespace; `setpriv` then drops it
                        to a random unprivileged uid with no supplementary groups, no-new-privs and one
                        capability, CAP_DAC_READ_SEARCH (the interpreter lives under /root, mode 700).
                        As that uid it cannot write root-owned files or signal our processes, and
                        RLIMIT_NPROC (per uid, useless for root) caps its processes and threads.
  "userns"      (no root, user namespaces enabled) the same namespaces inside a user namespace; no
                        uid drop, so no RLIMIT_NPROC.
  "hook"        neither works: the audit hook below and the resource limits are all there is.

In every mode the child (this file, run as a script) sets resource limits (CPU seconds, address
space, file size, open files, core dumps, processes), then installs an audit hook (PEP 578) that
refuses: sockets; fork/exec/spawn/subprocess/system; kill/killpg; ctypes and the C modules that
bypass audited APIs (_posixsubprocess, _xxsubinterpreters, _test*); writing, creating, renaming or
deleting anything outside its directory (paths with `..` refused, symlinks/hardlinks refused,
directory fds outside refused, /proc refused; at most MAX_FILES_WRITTEN files, each capped by
RLIMIT_FSIZE, so one run cannot fill the disk); stack and frame introspection (sys._getframe,
tracebacks' and generators' frames, settrace/setprofile, gc's object graph); crafting code objects
(code.__new__, marshal.loads, swapping a function's __code__); adding audit hooks; setrlimit.

Scoring never trusts the child's exit status or its printed text. The parent draws a random 128-bit
nonce per run and hands it over stdin; the harness keeps it inside a suspended generator (reachable
only through refused introspection) and, after each test returns without raising, writes
"<nonce> T <i> 1" to the private pipe ("0" when it raised). A test with no record failed. So
`sys.exit(0)`, `os._exit(0)`, SystemExit/KeyboardInterrupt/BaseException, printing "PASSED" or fake
JSON, or killing the harness all earn nothing beyond the tests already recorded. Tests are compiled
before the program runs and each runs in a fresh namespace with a copy of the builtins taken before
the program ran, so patching `builtins` (AssertionError, len, abs, ...) does not change the tests;
functions the program defines are wrapped so that a return value must be plain builtin data
(numbers, strings, bytes, None and containers of them), which stops `__eq__`-always-True objects. The
tests see stdlib modules as they were before the program ran: private copies of every module loaded
then (their attributes, submodules included), handed to the tests' imports and put in place of the
program's module names, so `math.isclose = lambda *a, **k: True`, a fake `sys.modules["math"]`, a
`math = Fake()` rebinding, or any of these done from inside the tested function, change nothing the
tests call. The modules the tests name (`import x` or `x.attr`) are among those loaded first when they
are on the preload allowlist.

What honest programs give up: importing subprocess, multiprocessing, asyncio, ctypes and socket;
paths that are not str/bytes (pathlib objects) or that use `..`; sys._getframe (raises ValueError,
which namedtuple, typing and logging already tolerate) and traceback formatting (tb_frame); returning
non-builtin values (Fraction, generators, numpy) from a tested function; signal handlers (reset before
each record is written, so none can run in the recorder's frame). Modules first imported after
lock-down compile from source (no .pyc), so the harness pre-imports common stdlib modules the program
mentions.

What it does not stop. This is in-process isolation of CPython, the same standard as human-eval, TRL
and open-r1 with more layers: a determined attacker who finds a CPython memory-safety bug, or an
introspection path the hook misses, can reach the harness and forge records. Programs can still
patch attributes of stdlib classes (a class object is shared, not copied: `collections.Counter.__eq__`)
and modules off the preload allowlist that they import first, define classes whose methods tests
call, read any file (CAP_DAC_READ_SEARCH / root), and use up to the CPU, memory and time given. In
"hook" mode the audit hook is the only barrier for the network, the filesystem and other processes;
in the namespace modes network, process and (root) filesystem/signal containment hold even if the
hook is bypassed, but world-writable directories (/tmp, /dev/shm) are then writable. Outputs are
contained: stdout goes to /dev/null, stderr to an unnamed file capped by RLIMIT_FSIZE, of which
`stderr` keeps the tail. Wall-clock overrun kills the child's whole process group (and PID namespace).

Layout: the child half comes first and ends the process, so the child never imports the parent half
(in particular `subprocess`, whose C helper forks without an audit event).
"""

import _signal as signal  # the C module: `signal` imports enum and re, 10 ms of every child's start
import marshal
import os
import resource
import sys

CHILD_PROGRAM_FILENAME = "<program>"  # compile() name of the untrusted program
# After lock-down, .pyc loads (marshal) are refused, so a module first imported then compiles from source
# (typing: 124 ms instead of 15). So the harness imports, beforehand, those of these stdlib modules that
# the program or tests mention -- an allowlist, because importing runs module code before the hook exists.
PRELOADABLE = frozenset({
    "typing", "collections", "re", "math", "cmath", "itertools", "functools", "heapq", "bisect", "string",
    "fractions", "decimal", "statistics", "datetime", "calendar", "random", "hashlib", "copy", "operator",
    "json", "array", "numbers", "enum", "dataclasses", "textwrap", "unicodedata", "time",
})
ALWAYS_PRELOAD = ("types",)  # reads a traceback's .tb_frame at import, which lock-down refuses; weakref,
#                              threading, tempfile, inspect, ... all import it
NO_PYCACHE = "/nonexistent-sandbox-pycache"  # sys.pycache_prefix after lock-down: no .pyc (marshal) loads
STDERR_LINE_CHARS = 300  # per reported failure
MAX_THREADS = 64  # RLIMIT_NPROC under the per-run uid, threads included (namespaces mode only: root ignores it)
MAX_OPEN_FILES = 128
MAX_FILES_WRITTEN = 64  # distinct files opened for writing: with RLIMIT_FSIZE, bounds the disk one run can fill
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

BLOCKED_EVENTS = frozenset({
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
    "os.symlink", "os.link", "os.chroot", "os.mknod", "subprocess.Popen", "pty.spawn", "signal.pthread_kill",
    "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile", "sys.addaudithook",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__", "marshal.loads", "marshal.load",
    "resource.setrlimit", "resource.prlimit", "setopencodehook", "sqlite3.enable_load_extension",
    "sqlite3.load_extension",
})
BLOCKED_PREFIXES = ("socket.", "ctypes.")
BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels"})
FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
               "os.truncate": 1, "os.utime": 1, "os.setxattr": 1, "os.removexattr": 1, "os.chflags": 1,
               "os.lchflags": 1, "shutil.rmtree": 1, "sqlite3.connect": 1}  # event -> how many leading args are paths
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


# ---------------------------------------------------------------- child half (runs inside the jail)

def _take_job():
    """Read the job from stdin; return it without the nonce, plus the record writer that holds the nonce."""
    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    job = marshal.loads(b"".join(chunks))  # same interpreter on both ends; needs no import
    nonce = job.pop("nonce").encode()
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    record = _recorder(job.pop("result_fd"), nonce)
    next(record)
    return job, record


def _recorder(fd, nonce, _write=os.write, _BaseException=BaseException):
    """Append nonce-signed lines to the result pipe. The nonce lives only in this frame while suspended;
    reaching it takes gi_frame / gc / tracing, which the hook refuses. No allocation of GC-tracked objects
    happens here, so no untrusted __del__ can run inside this frame."""
    while True:
        try:
            line = yield
            _write(fd, nonce + line)
        except _BaseException:  # a closed or hijacked pipe: the parent sees missing records, i.e. failures
            pass


def _limit(job):
    limits = [(resource.RLIMIT_CPU, job["cpu_s"]), (resource.RLIMIT_AS, job["memory_mb"] << 20),
              (resource.RLIMIT_FSIZE, job["file_size_mb"] << 20), (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
              (resource.RLIMIT_CORE, 0)]
    if job["nproc"]:
        limits.append((resource.RLIMIT_NPROC, job["nproc"]))
    for which, value in limits:  # soft == hard, so the program cannot raise them back
        resource.setrlimit(which, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-size writes fail with EFBIG instead of killing us


def _make_audit_hook(root):
    """The hook refuses what the module docstring lists. Everything it uses is bound here (default
    arguments, closure cells), so the program's monkeypatching of os, sys or builtins does not reach it."""
    root_slash = root.rstrip("/") + "/"
    written = set()

    def resolve(path, _fsdecode=os.fsdecode, _getcwd=os.getcwd, _str=str, _bytes=bytes, _type=type):
        """Absolute lexical path, or None when we cannot tell where it leads. Only str/bytes: a PathLike
        could answer __fspath__ differently to us and to the real open()."""
        if _type(path) is _bytes:
            path = _fsdecode(path)
        elif _type(path) is not _str:
            return None
        if not path.startswith("/"):
            if ".." in path.split("/"):  # relative to a dir_fd we never see, `..` could lead anywhere
                return None
            path = _getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path):
        where = resolve(path)
        return where is not None and (where + "/").startswith(root_slash)

    def is_dir(path, _stat=os.stat, _OSError=OSError):
        try:
            return (_stat(path).st_mode & 0o170000) == 0o040000
        except _OSError:
            return False

    def hook(event, args, _int=int, _type=type, _str=str, _PermissionError=PermissionError,
             _ValueError=ValueError, _blocked=BLOCKED_EVENTS, _prefixes=BLOCKED_PREFIXES,
             _modules=BLOCKED_MODULES, _frames=FRAME_ATTRS, _paths=PATH_EVENTS, _devices=DEVICE_FILES,
             _write_flags=WRITE_FLAGS, _max_written=MAX_FILES_WRITTEN, _len=len):
        if event in _blocked or event.startswith(_prefixes):
            raise _PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return
            where = resolve(path)
            if where is None or where == "/proc" or where.startswith("/proc/"):
                raise _PermissionError(f"sandbox: opening {path!r} is not allowed (use a plain relative path)")
            if where in _devices:
                return
            writes = (flags or 0) & _write_flags
            if _type(mode) is _str:
                writes = writes or "w" in mode or "a" in mode or "x" in mode or "+" in mode
            if inside(where):
                if writes and where not in written:
                    if _len(written) >= _max_written:
                        raise _PermissionError(f"sandbox: at most {_max_written} files may be written")
                    written.add(where)
                return
            if writes or is_dir(where):
                raise _PermissionError(f"sandbox: only the working directory is writable, not {path!r}")
        elif event in _paths:
            for path in args[: _paths[event]]:
                if _type(path) is not _int and not inside(path):
                    raise _PermissionError(f"sandbox: {event} outside the working directory ({path!r})")
            if event == "os.rename":  # written files keep counting under their new names
                source, target = resolve(args[0]), resolve(args[1])
                for moved in [p for p in written if p == source or p.startswith(source + "/")]:
                    written.discard(moved)
                    written.add(target + moved[len(source):])
        elif event == "import":
            if args[0] in _modules or args[0].startswith("_test"):
                raise _PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "sys._getframe":
            raise _ValueError("sandbox: call-stack introspection is disabled")  # what namedtuple/typing catch
        elif event == "object.__getattr__" and args[1] in _frames:
            raise _PermissionError(f"sandbox: reading .{args[1]} is not allowed")
        elif event == "object.__setattr__" and args[1] == "__code__":
            raise _PermissionError("sandbox: replacing a function's __code__ is not allowed")

    return hook


def _make_guard(collections_types):
    """Wrap functions the program defines so their results must be plain builtin data (stops objects whose
    __eq__/__bool__/__sub__ lie). Returns the `wrap(value)` to apply to each name the tests will see."""
    plain_scalars = frozenset({int, float, complex, bool, str, bytes, type(None)})
    plain_containers = frozenset({list, tuple, set, frozenset, dict, range, *collections_types})
    dict_like = frozenset(t for t in plain_containers if issubclass(t, dict))

    def is_plain(value, _type=type, _id=id, _set=set, _keys=dict.keys, _values=dict.values):
        stack, seen = [value], _set()
        while stack:
            v = stack.pop()
            t = _type(v)
            if t in plain_scalars:
                continue
            if t not in plain_containers:
                return False
            if _id(v) in seen:
                continue
            seen.add(_id(v))
            if t is range:
                continue
            if t in dict_like:
                stack.extend(_keys(v))
                stack.extend(_values(v))
            else:
                stack.extend(v)
        return True

    def wrap(value, _type=type, _FunctionType=type(_make_guard), _MethodType=type(is_plain.__get__(0)),
             _TypeError=TypeError):
        if _type(value) not in (_FunctionType, _MethodType):
            return value

        def guarded(*args, **kwargs):
            result = value(*args, **kwargs)
            if not is_plain(result):
                raise _TypeError(f"sandbox: {_type(result).__name__} returned; tests accept builtin data only")
            return result

        return guarded

    return wrap


def _make_clean_modules(modules, real_import):
    """The tests' view of the modules loaded before the program ran: for each, a private module object holding its
    attributes as they were then (submodules likewise), and an ``__import__`` that hands out those copies. The
    program may patch the real modules (``math.isclose = ...``, ``sys.modules["math"] = fake``, even from inside a
    function the tests call); the tests never see it. Returns ``(clean(name, value) or None, clean_import)``: the
    copy of the module ``value`` is (by identity), else of the module called ``name``."""
    _ModuleType, _id, _type = type(sys), id, type
    snapshot = {name: dict(module.__dict__) for name, module in modules.items() if _type(module) is _ModuleType}
    names_by_id = {_id(module): name for name, module in modules.items() if name in snapshot}
    proxies = {}

    def proxy(name):
        if name not in snapshot:
            return None
        if name not in proxies:
            copy = proxies[name] = _ModuleType(name)
            for key, value in snapshot[name].items():
                if _type(value) is _ModuleType and _id(value) in names_by_id:
                    value = proxy(names_by_id[_id(value)])
                copy.__dict__[key] = value
        return proxies[name]

    def clean(name, value):
        return proxy(names_by_id[_id(value)]) if _id(value) in names_by_id else proxy(name)

    def clean_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in snapshot:
            top = name.partition(".")[0]
            return proxy(name) if fromlist or top not in snapshot else proxy(top)
        return real_import(name, globals, locals, fromlist, level)

    return clean, clean_import


def _mentioned_modules(sources):
    """Top-level module names in `import x, y.z as w` / `from x.y import z` lines (no `re`: it costs 8 ms)."""
    names = set()
    for source in sources:
        for line in source.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "from":
                names.add(words[1].split(".")[0])
            elif len(words) >= 2 and words[0] == "import":
                parts = line.split(None, 1)[1].split(",")
                names.update(part.split()[0].split(".")[0] for part in parts if part.split())
    return names


def _report(what, error, _write=os.write, _type=type, _str=str, _BaseException=BaseException):
    """One line on stderr for whoever debugs a reward ("test 2: AssertionError: ..."); never trusted."""
    try:
        line = f"{what}: {_type(error).__name__}: {_str(error)[:STDERR_LINE_CHARS]}\n"
        _write(2, line.encode("utf-8", "replace"))
    except _BaseException:
        pass


def _child_main():
    job, record = _take_job()
    _limit(job)
    # also the modules tests use by name without importing them (`math.isclose(...)` after the prompt's import),
    # so that the tests get clean copies of them whatever the program binds to that name
    used = {name for name in PRELOADABLE if any(name + "." in test for test in job["tests"])}
    for name in ALWAYS_PRELOAD + tuple((_mentioned_modules([job["program"], *job["tests"]]) | used) & PRELOADABLE):
        try:
            __import__(name)
        except BaseException:  # missing here: the program's own import will say so
            pass
    import builtins

    collections = sys.modules.get("collections")  # loaded if anything mentioned it; else its types cannot occur
    wrap = _make_guard((collections.OrderedDict, collections.defaultdict, collections.Counter, collections.deque)
                       if collections else ())
    clean_builtins = tuple(builtins.__dict__.items())
    clean_module, clean_import = _make_clean_modules(dict(sys.modules), builtins.__import__)
    clean_builtins += (("__import__", clean_import),)
    tests = []
    for i, source in enumerate(job["tests"]):
        try:
            tests.append(compile(source, f"<test {i}>", "exec"))
        except BaseException:  # a broken test fails; it says nothing about the program
            tests.append(None)
    tests = tuple(tests)
    try:
        program = compile(job["program"], CHILD_PROGRAM_FILENAME, "exec")
    except BaseException:
        record.send(b" S syntax_error\n")
        os._exit(0)

    # Lock down. From here on, use only locals bound above: the program may patch any module.
    _exec, _dict, _enumerate, _exit, _report_ = exec, dict, enumerate, os._exit, _report
    _ModuleType, _type, _callable = type(sys), type, callable
    _MemoryError, _BaseException = MemoryError, BaseException
    _signal, _SIG_IGN, _handlers = signal.signal, signal.SIG_IGN, tuple(s for s in signal.valid_signals() if s not in
                                              (signal.SIGKILL, signal.SIGSTOP, signal.SIGXFSZ))
    hook = _make_audit_hook(os.getcwd())
    del sys.modules["__main__"]  # the program must not find this module's functions by import
    sys.pycache_prefix = NO_PYCACHE
    sys.addaudithook(hook)
    del job, hook

    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    status = b"ok"
    try:
        _exec(program, namespace)
        program_ran = True
    except _MemoryError as error:
        status, program_ran = b"memory", False
        _report_("program", error)
    except _BaseException as error:  # SystemExit and KeyboardInterrupt included: exiting early fails every test
        status, program_ran = b"runtime_error", False
        _report_("program", error)
    for i, test in _enumerate(tests):
        passed = False
        if program_ran and test is not None:
            test_namespace = {name: wrap(value) for name, value in namespace.items()}
            for name, value in namespace.items():  # the program's modules, as the tests see them: clean copies
                # `import math` / `import numpy as np` (patched or not), a fake module object, or `math = Fake()`
                if _type(value) is _ModuleType or not _callable(value):
                    module = clean_module(name, value)
                    if module is not None:
                        test_namespace[name] = module
            test_namespace["__builtins__"] = _dict(clean_builtins)
            test_namespace["__name__"] = "__test__"
            try:
                _exec(test, test_namespace)
                passed = True
            except _MemoryError as error:
                status = b"memory"
                _report_(f"test {i}", error)
            except _BaseException as error:
                _report_(f"test {i}", error)
            del test_namespace
        for signum in _handlers:  # no program signal handler may run while the record frame is live
            try:
                _signal(signum, _SIG_IGN)
            except _BaseException:
                pass
        record.send(b" T %d %d\n" % (i, passed))
    record.send(b" S " + status + b"\n")
    _exit(0)


if __name__ == "__main__":
    _child_main()
    os._exit(1)  # unreachable; never fall through into the parent half


# ---------------------------------------------------------------- parent half

import functools  # noqa: E402  (after the child's exit: see the module docstring)
import secrets  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

DEFAULT_TIMEOUT_S = 10.0  # wall clock for the program plus all its tests
DEFAULT_MEMORY_MB = 1024  # address space (RLIMIT_AS); Python itself needs ~30 MB
DEFAULT_FILE_SIZE_MB = 8  # largest file the child may write, stderr included (x MAX_FILES_WRITTEN files)
STDERR_TAIL_BYTES = 4096
MAX_RECORD_BYTES = 1 << 20  # result-pipe bytes kept; more is drained and dropped
CPU_GRACE_S = 1  # RLIMIT_CPU = ceil(timeout) + this, so the wall clock normally fires first
PROBE_TIMEOUT_S = 20
EXIT_POLL_S = 0.001  # after the records end, the child exits within a few ms
UID_BASE, UID_SPAN = 1_500_000_000, 100_000_000  # per-run uids: far from real accounts, rarely colliding
STATUSES = ("ok", "syntax_error", "runtime_error", "timeout", "memory", "crash")
ISOLATION_LEVELS = ("namespaces", "userns", "hook")


@dataclass(frozen=True)
class SandboxResult:
    """What the parent could verify about one run. `outcomes[i]` is True only for a nonce-signed pass record."""

    status: str  # one of STATUSES
    outcomes: tuple[bool, ...]
    stderr: str = ""  # the last STDERR_TAIL_BYTES of the child's stderr
    wall_s: float = 0.0

    @property
    def passed(self) -> int:
        return sum(self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _jail_argv(level: str, uid: int) -> list[str]:
    namespaces = ["--net", "--pid", "--ipc", "--fork", "--kill-child"]
    if level == "namespaces":
        caps = "-all,+dac_read_search"  # read-only reach into /root, where this interpreter lives
        return [shutil.which("unshare"), *namespaces, "--", shutil.which("setpriv"), f"--reuid={uid}",
                f"--regid={uid}", "--clear-groups", "--no-new-privs", f"--inh-caps={caps}",
                "--ambient-caps=+dac_read_search", f"--bounding-set={caps}", "--"]
    if level == "userns":
        return [shutil.which("unshare"), "--user", "--map-root-user", *namespaces, "--"]
    return []


@functools.cache
def _works(level: str) -> bool:
    if level == "hook":
        return True
    if not shutil.which("unshare") or (level == "namespaces" and (os.geteuid() != 0 or not shutil.which("setpriv"))):
        return False
    try:
        probe = subprocess.run([*_jail_argv(level, UID_BASE), sys.executable, "-I", "-S", "-c", "import typing"],
                               capture_output=True, timeout=PROBE_TIMEOUT_S, cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def isolation() -> str:
    """The strongest jail that works on this host (probed once per process): see the module docstring."""
    return next(level for level in ISOLATION_LEVELS if _works(level))


def run_tests(program: str, tests, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
              file_size_mb: int = DEFAULT_FILE_SIZE_MB, site_packages: bool = False,
              level: str | None = None) -> SandboxResult:
    """Run `program`, then each test source in `tests` (e.g. "assert f(1) == 2"), in a fresh jailed child.
    A test passes when it runs to its end without raising; the result says which did and how the run ended.

    `site_packages=True` lets the program import installed packages (numpy, ...), at some startup cost.
    `level` forces an isolation level (tests use "hook" to check the audit hook alone); default: isolation().
    """
    tests = list(tests)
    if not isinstance(program, str) or not all(isinstance(test, str) for test in tests):
        raise TypeError(f"run_tests needs the program as str and tests as a list of str, got "
                        f"{type(program).__name__} and [{', '.join(sorted({type(t).__name__ for t in tests}))}]")
    level = level or isolation()
    if level not in ISOLATION_LEVELS or not _works(level):
        raise ValueError(f"sandbox isolation {level!r} is unavailable here; use one of {ISOLATION_LEVELS} "
                         f"that works on this host (isolation() = {isolation()!r})")
    start, deadline = time.monotonic(), time.monotonic() + timeout_s
    nonce = secrets.token_hex(16)
    uid = UID_BASE + secrets.randbelow(UID_SPAN)
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    read_fd, write_fd = os.pipe()
    try:
        if level == "namespaces":
            os.chown(workdir, uid, uid)
        argv = [*_jail_argv(level, uid), sys.executable, "-I", "-B", *([] if site_packages else ["-S"]),
                os.path.abspath(__file__)]
        job = {"nonce": nonce, "result_fd": write_fd, "program": program, "tests": tests,
               "cpu_s": int(timeout_s) + 1 + CPU_GRACE_S, "memory_mb": int(memory_mb),
               "file_size_mb": int(file_size_mb), "nproc": MAX_THREADS if level == "namespaces" else 0}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                    cwd=workdir, env=env, pass_fds=(write_fd,), start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            try:
                proc.stdin.write(marshal.dumps(job))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            records, timed_out = _read_until(read_fd, deadline)
            timed_out = timed_out or not _exited(proc.pid, deadline)
            _kill_group(proc)  # always: stragglers die with the group, while the unreaped leader pins its id
            cpu_used = _reap(proc)
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - STDERR_TAIL_BYTES))
            stderr_tail = stderr.read().decode("utf-8", "replace")
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    outcomes, status = _score(records, nonce, len(tests))
    if timed_out or (status is None and cpu_used >= job["cpu_s"] - CPU_GRACE_S):
        status = "timeout"
    return SandboxResult(status or "crash", outcomes, stderr_tail, time.monotonic() - start)


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything the child writes to the result pipe until EOF; (bytes, timed_out)."""
    os.set_blocking(fd, False)
    kept = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return bytes(kept), False
            if len(kept) < MAX_RECORD_BYTES:
                kept += chunk
    return bytes(kept), True


def _exited(pid: int, deadline: float) -> bool:
    """Wait until `pid` exits or the deadline passes, without reaping it (WNOWAIT)."""
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:  # already reaped (SIGCHLD ignored in this process)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(EXIT_POLL_S)


def _reap(proc: subprocess.Popen) -> float:
    """Reap the child; the CPU seconds it and its descendants used (0.0 if someone else reaped it)."""
    try:
        _, wait_status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        proc.returncode = -signal.SIGKILL
        return 0.0
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return usage.ru_utime + usage.ru_stime


def _kill_group(proc: subprocess.Popen) -> None:
    for kill in (os.killpg, os.kill):  # the group; the leader too, in case it left the group
        try:
            kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _score(records: bytes, nonce: str, n_tests: int) -> tuple[tuple[bool, ...], str | None]:
    """Per-test outcomes from nonce-signed records (first record per test wins; missing = failed), and the
    harness's final status if it got that far."""
    outcomes, status, prefix = [False] * n_tests, None, nonce.encode() + b" "
    recorded = set()
    for line in records.split(b"\n"):
        if not line.startswith(prefix):
            continue
        fields = line[len(prefix):].split()
        if len(fields) == 3 and fields[0] == b"T" and fields[1].isdigit() and fields[2] in (b"0", b"1"):
            i = int(fields[1])
            if i < n_tests and i not in recorded:
                recorded.add(i)
                outcomes[i] = fields[2] == b"1"
        elif len(fields) == 2 and fields[0] == b"S" and status is None:
            status = fields[1].decode("ascii", "replace")
    if status not in STATUSES:
        status = None
    return tuple(outcomes), status


def run_many(jobs, *, max_workers: int | None = None, **limits) -> list[SandboxResult]:
    """run_tests over `jobs`, an iterable of (program, tests) pairs, in parallel; results in job order.
    Threads suffice: each job's work happens in its own child process. `limits` go to every run_tests."""
    jobs = list(jobs)
    workers = max(1, min(max_workers or len(os.sched_getaffinity(0)), len(jobs) or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], **limits), jobs))
