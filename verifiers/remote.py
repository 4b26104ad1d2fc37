"""Scale-out over HTTP with SandboxFusion's `POST /run_code` API (the subset we use):

    request:  {"code", "language": "python", "run_timeout", "memory_limit_MB", "stdin"}
    response: {"status": "Success"|"Failed"|"SandboxError", "message",
               "run_result": {"status": "Finished"|"TimeLimitExceeded"|"Error", "return_code",
                              "stdout", "stderr", "execution_time"}}

`stdin` (SandboxFusion's field, for stdin/stdout tasks as LiveCodeBench-style datasets have) is fed to
the program as its standard input by `verifiers serve`; `RemoteVerifier.run_code(code, stdin=...)`
sends it and returns the run (stdout included).

`RemoteVerifier` is the client: point it at one SandboxFusion deployment or `verifiers serve`, or
at a fleet of them. Requests are sharded round-robin over the servers with `concurrency` requests in
flight per server; a server that fails a request (refused, reset, timed out, 5xx) is benched for
`cooldown_s` and the request goes to the next live server, so a server dying mid-run costs nothing
but time. Only a program that no server could answer in `retries + 1` rounds is *excluded*, with
each server's error as the reason; every program gets exactly one verdict.

Our server adds `"onpolicy_passed"`, the sandbox's pass proof; against a third-party server the
client falls back to return code 0 *and* a per-request marker printed after the tests (weaker: a
hostile program can read the marker in its own source). `GET /health` answers {"status": "ok",
"workers", "served"}. A server bound beyond loopback requires a shared token (`--token` or
VERIFIERS_TOKEN), which the client sends as `Authorization: Bearer ...`.
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from verifiers.base import Task, Verdict
from verifiers.sandbox import Sandbox

TOKEN_ENV = "VERIFIERS_TOKEN"
URL_ENV = "VERIFIERS_URL"
# What a failed request to a server raises: refused or reset connections and timeouts (OSError, URLError),
# a server killed mid-reply (HTTPException: IncompleteRead, BadStatusLine), a reply that is not a JSON
# object (ValueError).
REQUEST_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


class RemoteVerifier:
    """`url`: one server, a comma-separated list, or a list of URLs (http://host:port); default
    $VERIFIERS_URL, else http://127.0.0.1:8080 (so `rollout.verifier: remote` finds a fleet)."""

    name = "remote"

    def __init__(self, url: str | list[str] | None = None, timeout_s: float = 10.0, memory_mb: int = 1024,
                 retries: int = 2, concurrency: int = 8, request_timeout_s: float | None = None,
                 strict: bool | None = None, token: str | None = None, cooldown_s: float = 5.0):
        url = url if url is not None else os.environ.get(URL_ENV, "http://127.0.0.1:8080")
        urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
        if not urls or not all(urls):
            raise ValueError(f"RemoteVerifier needs at least one server URL, got {url!r}")
        self.servers = [u.rstrip("/") for u in urls]
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.retries, self.concurrency = retries, concurrency
        self.request_timeout_s = request_timeout_s or timeout_s + 10
        self.strict, self.cooldown_s = strict, cooldown_s
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._lock = threading.Lock()
        self._benched_until = dict.fromkeys(self.servers, 0.0)
        self._next = 0
        self.answered: Counter[str] = Counter()  # verdicts per server, over this verifier's life
        self.failures: Counter[str] = Counter()  # failed requests per server

    def _order(self) -> list[str]:
        """Servers to try for the next request: round-robin from the next one, benched ones last."""
        with self._lock:
            start, self._next = self._next, self._next + 1
        now = time.monotonic()
        ring = [self.servers[(start + i) % len(self.servers)] for i in range(len(self.servers))]
        return sorted(ring, key=lambda u: self._benched_until[u] > now)  # stable: live ones first

    def _post(self, server: str, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(server + "/run_code", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=self.request_timeout_s) as resp:
            reply = json.loads(resp.read())
        if not isinstance(reply, dict):
            raise ValueError(f"the reply is not a JSON object: {str(reply)[:80]}")
        return reply

    def _one(self, task: Task, completion: str) -> Verdict:
        marker = f"__onpolicy_done_{secrets.token_hex(16)}__"
        code = task.program(completion, self.strict) + f"print({marker!r})\n"
        body = {"code": code, "language": "python", "run_timeout": self.timeout_s,
                "memory_limit_MB": self.memory_mb}
        start = time.monotonic()
        reply, errors = self._request(body)
        if reply is not None:
            return self._verdict(task, reply, marker, time.monotonic() - start)
        why = "; ".join(f"{u}: {e}" for u, e in errors.items())
        return Verdict(task.task_id, False, 0.0, "excluded",
                       f"verifier server unreachable after {self.retries + 1} tries of {len(self.servers)} "
                       f"server(s) ({why})"[:500],
                       round(time.monotonic() - start, 4))

    def _request(self, body: dict) -> tuple[dict | None, dict[str, str]]:
        """POST `body` to the fleet: live servers first, a failing one benched for cooldown_s and the
        next tried, `retries + 1` rounds. (reply, {}) or (None, each server's last error)."""
        data, errors = json.dumps(body).encode(), {}
        for attempt in range(self.retries + 1):
            for server in self._order():
                try:
                    reply = self._post(server, data)
                except REQUEST_ERRORS as e:
                    reason = (e.reason if isinstance(e, urllib.error.URLError)
                              and not isinstance(e, urllib.error.HTTPError) else e)
                    errors[server] = f"{type(e).__name__}: {reason}"
                    with self._lock:
                        self._benched_until[server] = time.monotonic() + self.cooldown_s
                        self.failures[server] += 1
                    continue
                with self._lock:
                    self.answered[server] += 1
                return reply, {}
            if attempt < self.retries:
                time.sleep(min(2.0, 0.2 * 2**attempt))
        return None, errors

    @staticmethod
    def _verdict(task: Task, reply: dict, marker: str, seconds: float) -> Verdict:
        run = reply.get("run_result") or {}
        if "onpolicy_passed" in reply:
            passed = bool(reply["onpolicy_passed"])
            status = reply.get("onpolicy_status", "passed" if passed else "failed")
            detail = reply.get("onpolicy_detail", "")
        else:
            passed = (run.get("status") == "Finished" and run.get("return_code") == 0
                      and (run.get("stdout") or "").rstrip().endswith(marker))
            status = "passed" if passed else {"TimeLimitExceeded": "timeout", "Finished": "failed",
                                                   "SandboxError": "excluded"}.get(run.get("status"), "error")
            detail = "" if passed else ((run.get("stderr") or "").strip().splitlines()
                                        or [reply.get("message", "")])[-1]
        return Verdict(task.task_id, passed, 1.0 if passed else 0.0, status, detail[:500], round(seconds, 4))

    def run_code(self, code: str, stdin: str | None = None, timeout_s: float | None = None) -> dict:
        """One program on the fleet, as SandboxFusion runs it: the reply's run_result (status,
        return_code, stdout, stderr, execution_time), with `stdin` as the program's standard input.
        Raises ConnectionError when no server answers (failover and retries as `verify`)."""
        body = {"code": code, "language": "python", "run_timeout": timeout_s or self.timeout_s,
                "memory_limit_MB": self.memory_mb}
        if stdin is not None:
            body["stdin"] = stdin
        reply, errors = self._request(body)
        if reply is None:
            raise ConnectionError(f"no verifier server answered: {errors}")
        return reply.get("run_result") or {}

    def verify(self, tasks: list[Task], completions: list[str]) -> list[Verdict]:
        if len(tasks) != len(completions):
            raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions")
        with ThreadPoolExecutor(max_workers=self.concurrency * len(self.servers)) as pool:
            return list(pool.map(self._one, tasks, completions))

    def health(self) -> dict[str, dict]:
        """Each server's GET /health answer, or {"status": "down", "error": ...}."""
        out = {}
        for server in self.servers:
            try:
                with urllib.request.urlopen(server + "/health", timeout=5) as resp:
                    out[server] = json.loads(resp.read())
            except REQUEST_ERRORS as e:
                out[server] = {"status": "down", "error": f"{type(e).__name__}: {e}"}
        return out


_RUN_STATUS = {"passed": "Finished", "failed": "Finished", "timeout": "TimeLimitExceeded", "error": "Error",
               "excluded": "SandboxError"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to serve on {host}, beyond loopback, without a shared token: anyone who "
                         "can reach "
                         f"the port could run code here. Pass --token SECRET (or set {TOKEN_ENV}) and give "
                         "clients the same.")


def make_server(host: str, port: int, sandbox: Sandbox, token: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server answering SandboxFusion's /run_code from `sandbox`, and GET /health.

    Beyond loopback it runs only with a shared `token` (anyone who can reach the port could
    otherwise run programs on this machine); with a token, every /run_code request must carry it."""
    require_token(host, token)
    served = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet by default
            pass

        def _reply(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path != "/health":
                return self._reply(404, {"status": "SandboxError", "message": f"unknown path {self.path}"})
            self._reply(200, {"status": "ok", "workers": sandbox.size, "served": served["programs"]})

        def do_POST(self):  # noqa: N802
            if self.path != "/run_code":
                return self._reply(404, {"status": "SandboxError", "message": f"unknown path {self.path}"})
            if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                return self._reply(401, {"status": "SandboxError", "message": "missing or wrong token"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if req.get("language", "python") != "python":
                    return self._reply(200, {"status": "SandboxError",
                                             "message": "only language=python is served"})
                timeout = float(req.get("run_timeout", sandbox.limits.timeout_s))
                limits = replace(sandbox.limits, timeout_s=timeout, cpu_s=max(1, int(timeout + 1)),
                                 memory_mb=int(req.get("memory_limit_MB", sandbox.limits.memory_mb)))
                stdin = req.get("stdin")
                if stdin is not None and not isinstance(stdin, str):
                    return self._reply(400, {"status": "SandboxError", "message": "stdin must be a string"})
                r = sandbox.run(str(req["code"]), limits, stdin)
                served["programs"] += 1
            except Exception as e:  # malformed request
                return self._reply(400, {"status": "SandboxError", "message": f"{type(e).__name__}: {e}"})
            self._reply(200, {
                "status": "Success" if r.status == "passed" else "Failed",
                "message": r.detail,
                "run_result": {"status": _RUN_STATUS[r.status],
                               "return_code": 0 if r.status == "passed" else (r.exit_code or 1),
                               "stdout": r.stdout, "stderr": r.stderr, "execution_time": r.seconds},
                "onpolicy_passed": r.status == "passed", "onpolicy_status": r.status,
                "onpolicy_detail": r.detail,
            })

    return ThreadingHTTPServer((host, port), Handler)
