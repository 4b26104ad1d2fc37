import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from verifiers import PythonTestVerifier, Task, Verifier, load_tasks
from verifiers.registry import get_verifier
from verifiers.remote import RemoteVerifier, make_server
from verifiers.sandbox import Limits, Sandbox
from verifiers.trl import RewardFunctionVerifier, as_reward_function

from .conftest import ROOT, run_cli

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
ADD = Task("t/add", "def add(a, b):\n", "add",
           "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n")


def wrong_completion(task: Task, name: str) -> str:
    """A completion that defines the entry point but returns None."""
    if name == "humaneval":
        return "    return None\n"
    return f"def {task.entry_point}(*args, **kwargs):\n    return None\n"


@pytest.fixture(scope="module")
def verifier():
    with PythonTestVerifier(limits=Limits(timeout_s=10, cpu_s=10), strict=True) as v:
        yield v


@needs_bwrap
@pytest.mark.parametrize("name,count", [("humaneval", 164), pytest.param("mbpp", 974, marks=pytest.mark.slow),
                                        pytest.param("mbpp-sanitized", 427, marks=pytest.mark.slow)])
def test_reference_solutions_pass_and_wrong_ones_fail(verifier, name, count):
    """All 1,565 references pass in strict mode (their return values are honest builtins)."""
    tasks = load_tasks(name)
    assert len(tasks) == count
    good = verifier.verify(tasks, [t.canonical_solution for t in tasks])
    failures = [(v.task_id, v.status, v.detail) for v in good if not v.passed]
    assert not failures, failures[:5]
    bad = verifier.verify(tasks, [wrong_completion(t, name) for t in tasks])
    assert not [v.task_id for v in bad if v.passed]
    assert all(v.score == 0.0 and v.detail for v in bad)


@needs_bwrap
def test_verdict_fields():
    with PythonTestVerifier(workers=2, limits=Limits(timeout_s=2, cpu_s=2)) as verifier:
        ok, wrong, hang = verifier.verify([ADD] * 3,
                                          ["    return a + b\n", "    return a - b\n",
                                           "    while True: pass\n"])
        assert isinstance(verifier, Verifier)
    assert (ok.passed, ok.score, ok.status) == (True, 1.0, "passed")
    assert (wrong.passed, wrong.status, wrong.detail) == (False, "failed", "AssertionError")
    assert hang.status == "timeout" and 0 < ok.seconds < 5


def test_registry_by_name_path_and_errors():
    class Fixed:
        def verify(self, tasks, completions):
            return []

    assert isinstance(get_verifier("tests.test_verifiers:FixedVerifier"), FixedVerifier)
    with pytest.raises(ValueError, match="known: .*python-tests"):
        get_verifier("no-such-verifier")
    with pytest.raises(ValueError, match="cannot import module"):
        get_verifier("no_such_pkg.mod:Thing")
    with pytest.raises(TypeError, match="no verify"):
        get_verifier("tests.test_verifiers:NotAVerifier")


class FixedVerifier:
    def verify(self, tasks, completions):
        from verifiers import Verdict

        return [Verdict(t.task_id, True, 1.0, "passed", "", 0.0) for t in tasks]


class NotAVerifier:
    pass


def test_trl_reward_function_as_verifier_and_back():
    def length_reward(prompts, completions, completion_ids=None, **columns):
        assert columns["task_id"] == ["t/add", "t/add", "t/add"]
        return [len(c) / 10 for c in completions[:2]] + [None]

    verdicts = RewardFunctionVerifier(length_reward).verify([ADD] * 3, ["12345", "1234567890123", "x"])
    assert [v.score for v in verdicts] == [0.5, 1.0, 0.0]
    assert [v.status for v in verdicts] == ["failed", "passed", "excluded"]

    def crashing(prompts, completions, **kw):
        raise RuntimeError("boom")

    assert {v.status for v in RewardFunctionVerifier(crashing).verify([ADD], ["x"])} == {"excluded"}

    reward = as_reward_function(FixedVerifier(), {"t/add": ADD})
    assert reward(prompts=["p"], completions=["c"], completion_ids=None, task_id=["t/add"]) == [1.0]
    assert reward.__name__ == "FixedVerifier_reward"
    # conversational completions and tasks built from dataset columns
    reward = as_reward_function(FixedVerifier())
    out = reward(prompts=[ADD.prompt], completions=[[{"role": "assistant", "content": "    return a + b"}]],
                 task_id=["t/add"], entry_point=["add"], test=[ADD.test])
    assert out == [1.0]


@needs_bwrap
def test_remote_client_against_local_server_and_dead_server():
    with Sandbox(workers=2, limits=Limits(timeout_s=5, cpu_s=5)) as sb:
        server = make_server("127.0.0.1", 0, sb)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            client = RemoteVerifier(f"http://127.0.0.1:{server.server_port}", timeout_s=3)
            ok, wrong, early_exit = client.verify([ADD] * 3,
                                                  ["    return a + b\n", "    return 0\n",
                                                   "    import os; os._exit(0)\n"])
            assert ok.passed and ok.status == "passed"
            assert not wrong.passed and wrong.status == "failed"
            assert not early_exit.passed
        finally:
            server.shutdown()
            server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    (dead,) = RemoteVerifier(f"http://127.0.0.1:{port}", retries=1,
                             request_timeout_s=2).verify([ADD], ["    return a + b\n"])
    assert dead.status == "excluded" and "unreachable" in dead.detail and dead.score == 0.0
    assert time.monotonic() - start < 10


@needs_bwrap
def test_fleet_shards_fails_over_and_guards_with_a_token(monkeypatch):
    monkeypatch.delenv("VERIFIERS_TOKEN", raising=False)
    with pytest.raises(ValueError, match="beyond loopback, without a shared token"):
        make_server("0.0.0.0", 0, None)
    with socket.socket() as s:  # a server that is down from the start
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with Sandbox(workers=2, limits=Limits(timeout_s=5, cpu_s=5)) as sb:
        servers = [make_server("127.0.0.1", 0, sb), make_server("127.0.0.1", 0, sb, token="s3cret")]
        for server in servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        open_url, guarded_url = (f"http://127.0.0.1:{server.server_port}" for server in servers)
        try:
            fleet = RemoteVerifier([open_url, dead], timeout_s=3, retries=1, concurrency=2)
            assert fleet.health()[open_url]["status"] == "ok" and fleet.health()[dead]["status"] == "down"
            verdicts = fleet.verify([ADD] * 12, ["    return a + b\n", "    return 0\n"] * 6)
            assert [v.passed for v in verdicts] == [True, False] * 6
            assert fleet.answered[open_url] == 12 and fleet.answered[dead] == 0 and fleet.failures[dead] >= 1
            # the guarded server: no token or a wrong one is refused (excluded, with the reason)
            (refused,) = RemoteVerifier(guarded_url, retries=0).verify([ADD], ["    return a + b\n"])
            assert refused.status == "excluded" and "401" in refused.detail
            (wrong,) = RemoteVerifier(guarded_url, retries=0,
                                      token="guess").verify([ADD], ["    return a + b\n"])
            assert wrong.status == "excluded"
            monkeypatch.setenv("VERIFIERS_TOKEN", "s3cret")
            (ok,) = RemoteVerifier(guarded_url).verify([ADD], ["    return a + b\n"])
            assert ok.passed
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()


class _Canned(BaseHTTPRequestHandler):
    """A stand-in server: `truncate` promises a body and closes after the headers (a server killed
    mid-reply); otherwise it answers every program as passed."""

    truncate = False
    reply: object = {"status": "Success", "onpolicy_passed": True, "run_result": {}}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(self.reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self.truncate:
            self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_server_dying_mid_reply_is_benched_and_the_program_goes_elsewhere():
    """The reply's headers arrive, its body never does (http.client.IncompleteRead, which is neither
    an OSError nor a URLError): the client must treat it as a failed request, not crash the batch."""
    dying = ThreadingHTTPServer(("127.0.0.1", 0), type("Dying", (_Canned,), {"truncate": True}))
    healthy = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    for server in (dying, healthy):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    dying_url, healthy_url = (f"http://127.0.0.1:{server.server_port}" for server in (dying, healthy))
    try:
        fleet = RemoteVerifier([dying_url, healthy_url], retries=0, concurrency=1, cooldown_s=60)
        verdicts = fleet.verify([ADD] * 4, ["    return a + b\n"] * 4)
        assert [v.status for v in verdicts] == ["passed"] * 4
        assert (fleet.failures[dying_url] >= 1 and fleet.answered[healthy_url] == 4
                and fleet.answered[dying_url] == 0)
        (alone,) = RemoteVerifier(dying_url, retries=1).verify([ADD], ["    return a + b\n"])
        assert alone.status == "excluded" and "IncompleteRead" in alone.detail
        # valid JSON that is not an object: the same (excluded with the reason, the batch goes on)
        odd = ThreadingHTTPServer(("127.0.0.1", 0),
                                  type("Odd", (_Canned,), {"reply": ["not", "an", "object"]}))
        threading.Thread(target=odd.serve_forever, daemon=True).start()
        try:
            (bad,) = RemoteVerifier(f"http://127.0.0.1:{odd.server_port}",
                                    retries=0).verify([ADD], ["    return a + b\n"])
            assert bad.status == "excluded" and "not a JSON object" in bad.detail
        finally:
            odd.shutdown()
            odd.server_close()
    finally:
        for server in (dying, healthy):
            server.shutdown()
            server.server_close()


@pytest.mark.slow
@needs_bwrap
def test_five_thousand_programs_through_a_fleet_with_a_server_killed(tmp_path):
    """Two `verifiers serve` processes, the second killed after 30% of the verdicts: every program
    gets exactly one verdict, in order, and each one is right or excluded with its reason."""
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "remote_load.py"), "--programs", "5000",
                    "--out", str(out)],
                   check=True, timeout=600, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["in_order"]
    assert report["wrong_verdicts"] == 0
    assert sum(report["statuses"].values()) == 5000
    assert all(e["reason"] for e in report["excluded"])
    assert report["killed"]["after_verdicts"] >= 1500
    killed = report["per_server"][report["killed"]["url"]]
    assert 0 < killed["answered"] < 5000 and killed["failed_requests"] >= 1
    assert all(s["answers_per_s"] > 0 for s in report["per_server"].values())


@needs_bwrap
def test_onpolicy_verify_cli(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(ADD.to_json()) + "\n")
    comps = tmp_path / "comps.jsonl"
    comps.write_text("\n".join(json.dumps({"task_id": "t/add", "completion": c})
                               for c in ["    return a + b\n", "    return 1\n"]))
    out = tmp_path / "res.jsonl"
    r = run_cli("verify", str(tasks), str(comps), "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "pass rate 1/2" in r.stdout and "failed 1, passed 1" in r.stdout
    # several samples per task
    assert "pass@1 0.500, pass@2 1.000 over 1 tasks (>= 2 samples each)" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(row) for row in rows] == [{"task_id", "passed", "score", "status", "detail", "seconds"}] * 2
    r = run_cli("verify", str(tmp_path / "missing.jsonl"), str(comps), "--out", str(out))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr


@pytest.mark.slow
@needs_bwrap
def test_ten_thousand_runs_leave_nothing_behind(tmp_path):
    """10,000 verifications: no processes, temp files or file descriptors left afterwards."""
    from .test_sandbox_hostile import _my_descendants

    fds_before = len(os.listdir("/proc/self/fd"))
    tmp_before = set(os.listdir("/tmp"))
    procs_before = _my_descendants()
    programs = ["def f(x):\n    return x * 2\nassert f(3) == 6\n", "assert 1 == 2\n",
                "import os\nos._exit(0)\n",
                "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nx = 1\n"]
    with Sandbox(limits=Limits(timeout_s=5, cpu_s=5)) as sb:
        results = sb.run_many([programs[i % 4] for i in range(10_000)])
        statuses = [r.status for r in results]
        assert statuses.count("passed") == 5000 and statuses.count("failed") == 5000
        assert all(r.extra["clean"] for r in results)
        worker_pids = {w.proc.pid for w in sb._workers}
    # the sandbox is closed: no process of ours remains, no fd leaked, no temp file created on the host
    assert not (_my_descendants() & worker_pids)
    assert _my_descendants() <= procs_before
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert set(os.listdir("/tmp")) - tmp_before == set()


@needs_bwrap
def test_workers_survive_the_threads_that_used_them():
    """bwrap's --die-with-parent fires when the forking *thread* exits; workers must not depend on callers'
    threads."""
    with Sandbox(workers=1, limits=Limits(timeout_s=5, cpu_s=5)) as sb:
        for _ in range(3):
            t = threading.Thread(target=lambda: sb.run("x = 1"))
            t.start()
            t.join()
            pid = sb._workers[0].proc.pid
            assert sb.run("assert 2 + 2 == 4").status == "passed"
            assert sb._workers[0].proc.pid == pid, "the worker was restarted"


def test_registry_wraps_a_trl_reward_function_and_pool_excludes_failures():
    from onpolicy.rollout import VerifierPool
    from verifiers.registry import get_verifier
    from verifiers.trl import RewardFunctionVerifier

    v = get_verifier("tests.plugins:coin_reward")
    assert isinstance(v, RewardFunctionVerifier)
    verdicts = v.verify([ADD, ADD], ["    return a + b\n", "    return a - b\n"])
    assert [x.status in ("passed", "failed") for x in verdicts] == [True, True]

    class Broken:
        def verify(self, tasks, completions):
            raise OSError("server down")

    pool = VerifierPool(Broken(), timeout_s=5)
    out = pool.verify([ADD], ["x"])
    assert out[0].status == "excluded" and "raised OSError: server down" in out[0].detail


# Lying return values: each defines the entry point (generated tasks' `solve(xs)`, or any name via
# {name}) so that what it returns claims to equal whatever the test expects.
LIARS = {
    "always-equal object": "class Liar:\n    def __eq__(self, other):\n        return True\n    __hash__ = "
                           "None\n",
    "int subclass": "class Liar(int):\n    def __eq__(self, other):\n        return True\n",
    "list subclass": "class Liar(list):\n    def __eq__(self, other):\n        return True\n",
    "fake __len__/__iter__": ("class Liar:\n    def __len__(self):\n        return 0\n    def "
                              "__iter__(self):\n"
                              "        return iter(())\n    def __eq__(self, other):\n        return True\n"),
    "patched Counter": ("import collections\ncollections.Counter.__eq__ = lambda self, other: True\n"
                        "Liar = collections.Counter\n"),
    "builtins rebound": ("import builtins\nclass Liar(list):\n    def __eq__(self, other):\n        return "
                         "True\n"
                         "builtins.type = lambda x: list\nbuiltins.list = Liar\n"),
}


def liar_program(kind: str, name: str, nested: bool = False, args: str = "*args") -> str:
    value = "[Liar()]" if nested else "Liar()"
    return f"\n{LIARS[kind]}\n\ndef {name}({args}):\n    return {value}\n"


@needs_bwrap
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_strict_mode_fails_lying_return_values(nested):
    from onpolicy.data.generated import generate_tasks

    gen = generate_tasks("validation", 3, seed=0)
    humaneval = [t for t in load_tasks("humaneval")
                 if t.task_id in ("HumanEval/0", "HumanEval/1", "HumanEval/7")]
    kinds = list(LIARS)
    with PythonTestVerifier(workers=2, limits=Limits(timeout_s=10, cpu_s=10)) as default, \
            PythonTestVerifier(workers=2, limits=Limits(timeout_s=10, cpu_s=10), strict=True) as strict, \
            PythonTestVerifier(workers=2, limits=Limits(timeout_s=10, cpu_s=10), strict=False) as lax:
        # generated tasks are strict by default, HumanEval with the switch. The completion ends the
        # prompt's function with `pass` and defines the entry point again (the last definition wins).
        for tasks, v in ((gen, default), (humaneval, strict)):
            batch = [t for t in tasks for _ in kinds]
            completions = ["    pass\n" + liar_program(k, t.entry_point, nested=nested) for t in tasks
                           for k in kinds]
            verdicts = v.verify(batch, completions)
            leaks = [(t.task_id, k) for t, k, r in zip(batch, kinds * len(tasks), verdicts) if r.passed]
            assert not leaks, leaks
            # the strict check is what stops them (generated tests' exact-type compare catches only
            # a lie at the top level)
            assert all(r.status == "failed" and "strict mode" in r.detail for r in verdicts), \
                [(r.task_id, r.detail) for r in verdicts if "strict mode" not in r.detail]
        # without the switch, HumanEval's `assert candidate(x) == y` trusts the liar: the hack is real
        liars = ["    pass\n" + liar_program("always-equal object", t.entry_point, nested=False)
                 for t in humaneval]
        lax_verdicts = lax.verify(humaneval, liars)
        assert [r.passed for r in lax_verdicts] == [True] * len(humaneval)


def test_pass_at_ks_leaves_excluded_samples_out():
    from verifiers.base import Verdict
    from verifiers.passk import pass_at_ks

    def v(task, passed, status=None):
        return Verdict(task, passed, float(passed), status or ("passed" if passed else "failed"), "", 0.0)

    verdicts = [v("a", True), v("a", False), v("a", False, "excluded"), v("b", False), v("b", False),
                v("b", True, "excluded")]
    ks, n_tasks, n_min = pass_at_ks(verdicts)
    assert (n_tasks, n_min) == (2, 2) and ks == {1: 0.25, 2: 0.5}
