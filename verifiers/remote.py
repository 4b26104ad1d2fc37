"""Scale-out over HTTP with SandboxFusion's `POST /run_code` API (the subset we use):

    request:  {"code", "language": "python", "run_timeout", "memory_limit_MB"}
    response: {"status": "Success"|"Failed"|"SandboxError", "message",
               "run_result": {"status": "Finished"|"TimeLimitExceeded"|"Error", "return_code",
                              "stdout", "stderr", "execution_time"}}

`RemoteVerifier` is the client: point it at a SandboxFusion deployment or at `verifiers serve`,
which answers the same API from our own sandbox (loopback only by default). Our server adds
`"onpolicy_passed"`, the sandbox's pass proof; against a third-party server the client falls back
to return code 0 *and* a per-request marker printed after the tests (weaker: a hostile program can
read the marker in its own source). Timeouts and retries are bounded; a dead server costs each
sample a zero score with the reason, never a hung trainer.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from verifiers.base import Task, Verdict
from verifiers.sandbox import Sandbox


class RemoteVerifier:
    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:8080", timeout_s: float = 10.0, memory_mb: int = 1024,
                 retries: int = 2, concurrency: int = 8, request_timeout_s: float | None = None, strict: bool | None = None):
        self.strict = strict
        self.url = url.rstrip("/") + "/run_code"
        self.timeout_s, self.memory_mb, self.retries, self.concurrency = timeout_s, memory_mb, retries, concurrency
        self.request_timeout_s = request_timeout_s or timeout_s + 10

    def _one(self, task: Task, completion: str) -> Verdict:
        marker = f"__onpolicy_done_{secrets.token_hex(16)}__"
        code = task.program(completion, self.strict) + f"print({marker!r})\n"
        body = json.dumps({"code": code, "language": "python", "run_timeout": self.timeout_s, "memory_limit_MB": self.memory_mb}).encode()
        start, last_error = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.request_timeout_s) as resp:
                    reply = json.loads(resp.read())
                return self._verdict(task, reply, marker, time.monotonic() - start)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                if attempt < self.retries:
                    time.sleep(min(2.0, 0.2 * 2**attempt))
        return Verdict(task.task_id, False, 0.0, "excluded", f"verifier server unreachable after {self.retries + 1} tries ({last_error})",
                       round(time.monotonic() - start, 4))

    @staticmethod
    def _verdict(task: Task, reply: dict, marker: str, seconds: float) -> Verdict:
        run = reply.get("run_result") or {}
        if "onpolicy_passed" in reply:
            passed = bool(reply["onpolicy_passed"])
            status = reply.get("onpolicy_status", "passed" if passed else "failed")
            detail = reply.get("onpolicy_detail", "")
        else:
            passed = run.get("status") == "Finished" and run.get("return_code") == 0 and (run.get("stdout") or "").rstrip().endswith(marker)
            status = "passed" if passed else {"TimeLimitExceeded": "timeout", "Finished": "failed",
                                                   "SandboxError": "excluded"}.get(run.get("status"), "error")
            detail = "" if passed else ((run.get("stderr") or "").strip().splitlines() or [reply.get("message", "")])[-1]
        return Verdict(task.task_id, passed, 1.0 if passed else 0.0, status, detail[:500], round(seconds, 4))

    def verify(self, tasks: list[Task], completions: list[str]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, tasks, completions))


_RUN_STATUS = {"passed": "Finished", "failed": "Finished", "timeout": "TimeLimitExceeded", "error": "Error", "excluded": "SandboxError"}


def make_server(host: str, port: int, sandbox: Sandbox) -> ThreadingHTTPServer:
    """An HTTP server answering SandboxFusion's /run_code from `sandbox`."""

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

        def do_POST(self):  # noqa: N802
            if self.path != "/run_code":
                return self._reply(404, {"status": "SandboxError", "message": f"unknown path {self.path}"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if req.get("language", "python") != "python":
                    return self._reply(200, {"status": "SandboxError", "message": "only language=python is served"})
                timeout = float(req.get("run_timeout", sandbox.limits.timeout_s))
                limits = replace(sandbox.limits, timeout_s=timeout, cpu_s=max(1, int(timeout + 1)),
                                 memory_mb=int(req.get("memory_limit_MB", sandbox.limits.memory_mb)))
                r = sandbox.run(str(req["code"]), limits)
            except Exception as e:  # malformed request
                return self._reply(400, {"status": "SandboxError", "message": f"{type(e).__name__}: {e}"})
            self._reply(200, {
                "status": "Success" if r.status == "passed" else "Failed",
                "message": r.detail,
                "run_result": {"status": _RUN_STATUS[r.status], "return_code": 0 if r.status == "passed" else (r.exit_code or 1),
                               "stdout": r.stdout, "stderr": r.stderr, "execution_time": r.seconds},
                "onpolicy_passed": r.status == "passed", "onpolicy_status": r.status, "onpolicy_detail": r.detail,
            })

    return ThreadingHTTPServer((host, port), Handler)
