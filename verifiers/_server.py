"""The warm worker that runs inside one sandbox slot (bubblewrap: own PID, network, IPC, mount
namespaces; read-only system; private /tmp). Standard library only; started as
`python -I -S -B _server.py` by verifiers.sandbox, it talks to the host over fds 0/1 (length-
prefixed JSON) and forks one child per program.

Per program: the child gets its own session, a fresh work dir, rlimits (CPU, address space, file
size, open files, processes) and a scrubbed environment, and runs the program with compile/exec.
Only if the program returns normally does the child's harness start the pass handshake: it sends
'D' on a private pipe, the worker kills every other process in the sandbox, checks that the child
is single-threaded, and sends a fresh random challenge, which the harness must answer. The
challenge exists nowhere before the tests have run, so no exit code, output, file or text in the
program can stand in for it.

Cleanup after every program: `kill(-1, SIGKILL)` inside the sandbox's own PID namespace (only the
sandbox's processes are visible there: bwrap's init is exempt, the worker itself too), then reap.
If the worker is not in its own PID namespace (the explicit unsafe mode), kill(-1) is never used:
only the child's process group and descendants reparented to the worker are killed.
"""

import ctypes
import hashlib
import json
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback  # imported once here, so failing programs do not pay for it

# Warm: modules that test programs commonly import are loaded once in the worker; every forked
# child shares them copy-on-write instead of importing them again.
WARM_MODULES = ("bisect", "collections", "copy", "functools", "heapq", "itertools", "math", "re", "string",
                "typing")
PR_SET_CHILD_SUBREAPER = 36
PROOF_SALT = b"onpolicy-verifier-pass"


def read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd: int) -> dict:
    (n,) = struct.unpack(">I", read_exact(fd, 4))
    return json.loads(read_exact(fd, n))


def send(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    write_all(fd, struct.pack(">I", len(data)) + data)


def other_pids(keep: set) -> list:
    """Live processes in /proc other than `keep` (zombies are dead already: their parent reaps them)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in keep:
            try:
                with open(f"/proc/{name}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                out.append(int(name))
    return out


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_sandbox(own_pidns: bool, child: int, spare: tuple = ()) -> bool:
    """Kill every process of this sandbox but ourselves, pid 1 and `spare`; reap them."""
    me = os.getpid()
    for _ in range(200):
        if own_pidns and not spare:
            try:
                os.kill(-1, signal.SIGKILL)  # this PID namespace only: the sandbox's own processes
            except ProcessLookupError:
                pass
        else:
            targets = other_pids({1, me, *spare})
            if not own_pidns:  # unsafe mode: only what descends from the child
                targets = [p for p in targets if _descends_from(p, me)]
                if not spare:
                    try:
                        os.killpg(child, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            for pid in targets:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        reap()
        left = other_pids({1, me, *spare})
        if not own_pidns:
            left = [p for p in left if _descends_from(p, me)]
        if not left:
            return True
        time.sleep(0.002)
    return False


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if ppid == ancestor:
            return True
        if ppid <= 1:
            return False
        pid = ppid
    return False


def run_child(code, res_w: int, chal_r: int, out_w: int, err_w: int, req: dict) -> None:
    os.setsid()
    if req.get("stdin"):  # the program's standard input: an in-memory file (no pipe to fill and block on)
        data = os.memfd_create("stdin")
        os.write(data, req["stdin"].encode())
        os.lseek(data, 0, os.SEEK_SET)
        os.dup2(data, 0)
    else:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(res_w, 3)
    os.dup2(chal_r, 4)
    os.closerange(5, 1 << 16)
    work = f"/tmp/run-{os.getpid()}"
    os.mkdir(work, 0o700)
    os.chdir(work)
    os.umask(0o077)
    for key in list(os.environ):
        del os.environ[key]
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"})
    mb = 1 << 20
    limits = [
        (resource.RLIMIT_CPU, req["cpu_s"]),  # soft: SIGXCPU; hard (+1 s, below): SIGKILL
        (resource.RLIMIT_AS, req["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, req["file_mb"] * mb),
        (resource.RLIMIT_NOFILE, req["nofile"]),
        (resource.RLIMIT_NPROC, req["nproc"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in limits:
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))
    write, read, exit_ = os.write, os.read, os._exit  # held before the program can patch os
    sha256 = hashlib.sha256
    sys.stdin = open(0, closefd=False)  # fd 0 as it is now (the worker's own stdin was its request pipe)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # noqa: BLE001  SystemExit too: exiting is not passing
        try:
            if isinstance(e, SystemExit):
                print(f"SystemExit({e.code}) before the tests completed", file=sys.stderr)
            else:
                traceback.print_exc()
            sys.stderr.flush()
        finally:
            exit_(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    write(3, b"D")
    challenge = read(4, 32)
    write(3, sha256(PROOF_SALT + challenge).digest())
    exit_(0)


MAX_PROGRAM_BYTES = 1 << 20


def _compiled(source: str) -> tuple:
    """(code, None), or (None, the verdict) for a program too large or that does not compile. Compiled
    here, before the fork: compiling runs none of the program's code, and doing it in the forked child
    costs ~1.5 ms of copy-on-write faults per program."""
    if len(source) > MAX_PROGRAM_BYTES:
        return None, _verdict_without_run("error", f"program larger than {MAX_PROGRAM_BYTES} bytes")
    try:
        return compile(source, "<program>", "exec"), None
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
        return None, _verdict_without_run("failed", f"{type(e).__name__}: {e}")


def run_one(req: dict, own_pidns: bool) -> dict:
    """Run one program (`req`: program, limits, stdin) in a forked child; its verdict (a dict)."""
    code, verdict = _compiled(req["program"])
    if verdict is not None:
        return verdict
    res_r, res_w = os.pipe()
    chal_r, chal_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(code, res_w, chal_r, out_w, err_w, req)
        finally:
            os._exit(1)
    for fd in (res_w, chal_r, out_w, err_w):
        os.close(fd)
    cap = req["output_bytes"]
    out, err, truncated = bytearray(), bytearray(), False
    deadline = start + req["timeout_s"]
    proof, detail, timed_out, refused = False, "", False, False
    open_fds = {out_r, err_r, res_r}
    status_code, usage, exited = None, None, False
    exit_fd = os.pidfd_open(pid)  # readable once the child has exited: no polling
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready = select.select([*open_fds, exit_fd], [], [], remaining)[0]
        for fd in ready:
            if fd == exit_fd:
                continue
            data = os.read(fd, 65536)
            if not data:
                open_fds.discard(fd)
                continue
            if fd == res_r:
                if data[:1] != b"D" or proof:
                    detail, refused = "bad handshake from the program", True
                    os.kill(pid, signal.SIGKILL)
                else:
                    proof, detail = _pass_proof(pid, own_pidns, res_r, chal_w, deadline)
                    refused = not proof
                open_fds.discard(res_r)
            else:
                truncated |= _keep(out if fd == out_r else err, data, cap)
        # The verdict is due when the child exits, even if its descendants still hold the pipes.
        try:
            done, status_code, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            done, status_code = pid, None
        if done:
            exited = True
            break
    if exited:  # collect what is already in the pipes, without waiting for descendants
        truncated |= _drain({out_r: out, err_r: err}, open_fds, cap)
    seconds = time.monotonic() - start
    clean = kill_sandbox(own_pidns, pid)
    for fd in (res_r, chal_w, out_r, err_r, exit_fd):
        try:
            os.close(fd)
        except OSError:
            pass
    _remove_tree(f"/tmp/run-{pid}")
    exit_code = os.WEXITSTATUS(status_code) if status_code is not None and os.WIFEXITED(status_code) else None
    sig = os.WTERMSIG(status_code) if status_code is not None and os.WIFSIGNALED(status_code) else None
    status, detail = _status(req, proof, timed_out, refused, sig, usage, exit_code, detail, err)
    return {
        "status": status,
        "detail": detail[:500],
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "truncated": truncated,
        "seconds": seconds,
        "exit_code": exit_code,
        "signal": sig,
        "clean": clean,
    }


def _pass_proof(pid: int, own_pidns: bool, res_r: int, chal_w: int, deadline: float) -> tuple:
    """The tests ran to the end (the child wrote "D"): nothing but the child may remain in the sandbox, it
    must be alone (one thread), and it must answer a fresh challenge with the salt only the test harness
    held. Returns (proof, detail); a refusal kills the child."""
    kill_sandbox(own_pidns, pid, spare=(pid,))
    try:
        with os.scandir(f"/proc/{pid}/task") as it:
            n_threads = sum(1 for _ in it)
    except OSError:
        n_threads = 0
    if n_threads != 1:
        os.kill(pid, signal.SIGKILL)
        return False, f"program left {n_threads - 1} extra threads running after the tests"
    challenge = os.urandom(32)
    answer = b""
    try:
        write_all(chal_w, challenge)
        while len(answer) < 32 and time.monotonic() < deadline:
            r, _, _ = select.select([res_r], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(res_r, 32 - len(answer))
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    proof = answer == hashlib.sha256(PROOF_SALT + challenge).digest()
    return proof, "" if proof else "pass handshake failed"


def _drain(buffers: dict, open_fds: set, cap: int) -> bool:
    """What is already in the output pipes ({fd: buffer}), without waiting for descendants; True if cut."""
    truncated = False
    for fd, buf in buffers.items():
        while fd in open_fds and select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 65536)
            if not data or _keep(buf, data, cap):
                truncated |= bool(data)
                break
    return truncated


def _status(req, proof, timed_out, refused, sig, usage, exit_code, detail, err):
    """(status, detail) of a finished run: passed only with the proof and in time."""
    if proof and not timed_out:
        return "passed", detail
    if timed_out:
        return "timeout", f"wall-clock limit of {req['timeout_s']} s"
    if refused:
        return "failed", detail
    if (sig == signal.SIGXCPU or (sig == signal.SIGKILL and usage is not None
                                  and usage.ru_utime + usage.ru_stime >= req["cpu_s"])):
        return "timeout", f"CPU-time limit of {req['cpu_s']} s"
    if sig is not None:
        return "error", f"killed by signal {signal.Signals(sig).name}"
    if not detail:
        tail = err.decode(errors="replace").strip().splitlines()
        detail = (tail[-1] if tail else "exited before the tests completed (no pass proof)" if exit_code == 0
                  else f"exit code {exit_code}")
    return "failed", detail


def _keep(buf: bytearray, data: bytes, cap: int) -> bool:
    """Append to an output buffer up to `cap` bytes; True if anything was cut."""
    room = cap - len(buf)
    if room > 0:
        buf += data[:room]
    return len(data) > room


def _verdict_without_run(status: str, detail: str) -> dict:
    return {"status": status, "detail": detail[:500], "stdout": "", "stderr": detail, "truncated": False,
            "seconds": 0.0, "exit_code": None, "signal": None, "clean": True}


def _remove_tree(path: str) -> None:
    if not os.path.isdir(path):
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            try:
                os.unlink(os.path.join(root, name))
            except OSError:
                pass
        for name in dirs:
            p = os.path.join(root, name)
            try:
                os.chmod(p, 0o700)
                os.rmdir(p)
            except OSError:
                pass
    try:
        os.chmod(path, 0o700)
        os.rmdir(path)
    except OSError:
        pass


def _warm_tracebacks() -> None:
    """Format one traceback through run_child's frame now, so forked children inherit the warm
    linecache and formatting machinery instead of re-reading this file per failing program."""
    import io
    import linecache

    linecache.getlines(__file__)
    try:
        exec(compile("assert False", "<program>", "exec"), {})
    except AssertionError:
        traceback.print_exc(file=io.StringIO())


def main() -> None:
    for name in WARM_MODULES:
        __import__(name)
    _warm_tracebacks()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a dead child must cost an EPIPE, never the worker
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    hello = recv(proto_in)
    own_pidns = os.readlink("/proc/self/ns/pid") != hello["host_pidns"]
    if hello.get("require_pidns", True) and not own_pidns:
        send(proto_out, {"fatal": "worker is not in its own PID namespace"})
        return
    send(proto_out, {"ready": True, "own_pidns": own_pidns, "pid": os.getpid()})
    while True:
        try:
            req = recv(proto_in)
        except EOFError:
            return
        send(proto_out, run_one(req, own_pidns))


if __name__ == "__main__":
    main()
