"""Isolated execution of untrusted Python programs: bubblewrap + rlimits + warm fork-server workers.

What it covers (each one tested by tests/test_sandbox_hostile.py, run only through the sandbox):
- no network (own network namespace), no IPC, own PID namespace, own mount namespace;
- a read-only view of just the system libraries and the Python installation (no home folders, no
  project files, no host environment: the environment is scrubbed);
- a private, size-limited writable /tmp per worker; a fresh work dir per program;
- a non-root uid per worker slot (when started as root), so RLIMIT_NPROC bounds fork/thread bombs
  per slot; rlimits on CPU time, address space, file size, open files and processes;
- a wall-clock timeout, enforced twice (by the worker and, with a grace period, by the host);
- captured stdout/stderr, capped;
- pass requires a challenge-response handshake that starts only after the program returned
  normally (see _server.py): exit codes, printed text and files prove nothing;
- after every program, every process of the sandbox except the worker is killed (kill(-1) inside
  the sandbox's own PID namespace), so no process outlives its verdict.

What it does not cover: a program that attacks the harness from inside its own process (reads its
memory or speaks its pipe protocol during the tests) can forge a pass. Return values that lie
(`__eq__` always True) are stopped by the verifiers' strict mode (verifiers.base.strict_program),
not by the sandbox. These are reward hacks of the test, not escapes from the sandbox: the host
stays safe either way. Kernel exploits are out of scope.

Where bubblewrap is missing, `Sandbox()` refuses with instructions; `Sandbox(unsafe=True)` runs the
same workers with rlimits only and warns loudly.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue

SERVER = Path(__file__).with_name("_server.py")
INSTALL_HINT = (
    "bubblewrap (bwrap) is not installed. Install it with `sudo apt-get install -y bubblewrap` "
    "(Debian/Ubuntu; `dnf install bubblewrap` on Fedora), or re-run scripts/setup.sh, which installs it. "
    "To run untrusted code WITHOUT isolation anyway (rlimits only), pass unsafe=True / --unsafe-no-sandbox."
)


class SandboxUnavailable(RuntimeError):
    pass


@dataclass
class Limits:
    """Resource limits for one program."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_mb: int = 16  # RLIMIT_FSIZE: largest file it may write
    nofile: int = 64  # RLIMIT_NOFILE
    nproc: int = 32  # RLIMIT_NPROC: processes + threads of the slot's uid
    output_bytes: int = 64 * 1024  # stdout and stderr kept, each
    tmp_mb: int = 64  # size of the worker's private /tmp


@dataclass
class RunResult:
    status: str  # passed | failed | timeout | error
    detail: str
    seconds: float
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    exit_code: int | None = None
    signal: int | None = None
    extra: dict = field(default_factory=dict)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _python_paths() -> tuple[str, list[str]]:
    """The real interpreter (not a venv shim) and the folders it needs to start."""
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    if not any(stdlib.startswith(p) for p in prefixes):
        prefixes.add(stdlib)
    return exe, sorted(prefixes)


class _Worker:
    """One sandbox slot: a long-lived fork server inside its own bubblewrap sandbox."""

    def __init__(self, slot: int, limits: Limits, unsafe: bool, uid: int | None, spawner: ThreadPoolExecutor):
        self.slot, self.limits, self.unsafe, self.uid = slot, limits, unsafe, uid
        self.spawner = spawner
        self.proc: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        exe, prefixes = _python_paths()
        py = [exe, "-I", "-S", "-B"]
        if self.unsafe:
            return [*py, str(SERVER)]
        cmd = [bwrap_path(), "--new-session", "--die-with-parent", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"]
        if self.uid is not None:
            # As root: no user namespace (so the slot's uid is a real host uid that RLIMIT_NPROC
            # counts), every other namespace, and setpriv drops to that uid with no capabilities.
            cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                    "--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-all"]  # unprivileged: a user namespace too
        for d in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
            if os.path.islink(d):
                cmd += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                cmd += ["--ro-bind", d, d]
        for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
            cmd += ["--ro-bind-try", f, f]
        for prefix in prefixes:
            if prefix.startswith("/usr/"):
                continue
            parts = Path(prefix).parts
            for i in range(2, len(parts)):  # parents readable (bwrap would make them 0700)
                cmd += ["--perms", "0755", "--dir", str(Path(*parts[:i]))]
            cmd += ["--ro-bind", prefix, prefix]
        cmd += ["--proc", "/proc", "--dev", "/dev",
                "--size", str(self.limits.tmp_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
                "--perms", "0755", "--dir", "/opt", "--perms", "0755", "--dir", "/opt/verifier",
                "--ro-bind", str(SERVER), "/opt/verifier/server.py", "--chdir", "/tmp", "--"]
        if self.uid is not None:
            cmd += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
        return [*cmd, *py, "/opt/verifier/server.py"]

    def start(self) -> None:
        # bwrap --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that forked it
        # exits: so every worker is spawned from the sandbox's own long-lived spawner thread.
        self.proc = self.spawner.submit(
            subprocess.Popen, self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        ).result()
        _send(self.proc.stdin, {"host_pidns": os.readlink("/proc/self/ns/pid"),
                                "require_pidns": not self.unsafe})
        hello = _recv(self.proc.stdout, time.monotonic() + 30)
        if hello is None or not hello.get("ready"):
            self.stop()
            raise SandboxUnavailable(f"sandbox worker {self.slot} did not start: {hello or 'no answer'}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child (bwrap); --die-with-parent takes the sandbox with it
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None

    def run(self, program: str, limits: Limits, stdin: str | None = None) -> RunResult:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        req = {**asdict(limits), "program": program, "stdin": stdin}
        start = time.monotonic()
        try:
            _send(self.proc.stdin, req)
            reply = _recv(self.proc.stdout, start + limits.timeout_s + 10)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:  # the program killed or stopped the worker: replace it
            dead = self.proc.poll() is not None
            self.proc.kill()
            self.stop()
            detail = "the program killed the sandbox worker" if dead else "sandbox worker stopped answering"
            return RunResult("error", detail, time.monotonic() - start)
        extra = {"clean": reply.pop("clean", True)}
        return RunResult(**reply, extra=extra)


def _send(pipe, obj) -> None:
    data = json.dumps(obj).encode()
    pipe.write(struct.pack(">I", len(data)) + data)
    pipe.flush()


def _recv(pipe, deadline: float) -> dict | None:
    fd = pipe.fileno()
    buf = b""
    need = 4
    header_done = False
    while len(buf) < need:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, need - len(buf))
        if not chunk:
            return None
        buf += chunk
        if not header_done and len(buf) == 4:
            need = 4 + struct.unpack(">I", buf)[0]
            header_done = True
    return json.loads(buf[4:])


class Sandbox:
    """A pool of warm sandboxed workers. Thread-safe; `run_many` uses every slot in parallel.

        with Sandbox(workers=2) as sb:
            result = sb.run("print(1 + 1)")
    """

    def __init__(self, workers: int | None = None, limits: Limits | None = None, unsafe: bool = False,
                 uid_base: int = 61000):
        self.limits = limits or Limits()
        self.unsafe = unsafe
        if not unsafe and bwrap_path() is None:
            raise SandboxUnavailable(INSTALL_HINT)
        if unsafe:
            warnings.warn(
                "UNSAFE: running untrusted programs WITHOUT a sandbox (rlimits only). They can read your "
                "files, "
                "use the network and kill your processes. Never do this with model-written code you do not "
                "trust.",
                RuntimeWarning, stacklevel=2,
            )
        n = workers or os.cpu_count() or 1
        root = os.geteuid() == 0 and not unsafe
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sandbox")
        self._workers = [_Worker(i, self.limits, unsafe, uid_base + i if root else None, self._spawner)
                         for i in range(n)]
        self._free: Queue[_Worker] = Queue()
        for w in self._workers:
            self._free.put(w)

    @property
    def size(self) -> int:
        return len(self._workers)

    def run(self, program: str, limits: Limits | None = None, stdin: str | None = None) -> RunResult:
        """Run one program; `stdin` (text) is what it reads from standard input (default: nothing)."""
        worker = self._free.get()
        try:
            return worker.run(program, limits or self.limits, stdin)
        except Exception as e:  # a broken worker costs this program, never the caller
            worker.stop()
            return RunResult("excluded", f"sandbox failure: {type(e).__name__}: {e}", 0.0)
        finally:
            self._free.put(worker)

    def run_many(self, programs: list[str], limits: Limits | None = None) -> list[RunResult]:
        futures = [self._pool.submit(self.run, p, limits) for p in programs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for w in self._workers:
            w.stop()
        self._spawner.shutdown(wait=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
