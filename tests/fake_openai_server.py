"""A fake OpenAI-compatible server on 127.0.0.1 for judge tests and the judge benchmark.

It answers ``POST /v1/chat/completions`` with one token and ``top_logprobs`` (or, when the request
asks for no logprobs or the server has ``logprobs=False``, with the score as text), after an
optional latency, and injects faults chosen by markers in the prompt text, so tests decide per sample:

- ``[score=N]``: the judge answers N (default: 50 + len(prompt) % 50).
- ``[refuse]``: the judge answers "REFUSAL" (non-numeric tokens only).
- ``[say=TEXT]``: the judge writes TEXT (text answers only; TEXT ends at the next ``]``).
- ``[nologprobs]``: a 200 response without logprobs.
- ``[429xK]``, ``[500xK]``, ``[timeoutxK]``, ``[badjsonxK]``, ``[nanxK]``, ``[dropxK]``: the first K
  requests for this prompt get a 429 (with ``Retry-After``), a 500, a response slower than any client
  timeout (``hang`` seconds), a truncated JSON body, a NaN top logprob, or a closed connection; later
  requests succeed.
- ``[always=NNN]``: every request fails with HTTP status NNN.

Server-wide faults (attributes, changeable while it runs): ``logprobs=False`` (a server that ignores
``logprobs``, as ``transformers serve`` does), ``outage=NNN`` (every request fails with NNN),
``fail_after=N`` (requests after the N-th fail with ``outage`` or 503: an outage mid-run).

The Batch API: ``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}/content``,
``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches``. A batch stays "in_progress" for
``batch_polls`` retrievals, then ends as ``batch_outcome`` ("completed", "failed", or "expired" with
half the answers). Markers in a batched prompt: ``[batcherr]`` (the line goes to the error file),
``[badline]`` (a malformed output line), ``[nologprobs]``, ``[nanx...]`` (always NaN in a batch).

Run as a script (``python tests/fake_openai_server.py --latency 0.1``) it prints its URL and serves
until killed; the benchmark and the commands in docs/failures.md use it that way (``--no-logprobs``,
``--outage 503``, ``--fail-after N``, ``--hang S``, ``--port P``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import sys
import threading
import time
from collections import Counter
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_FAULT = re.compile(r"\[(429|500|timeout|badjson|nan|drop)x(\d+)\]")
_SCORE = re.compile(r"\[score=(\d+)\]")
_SAY = re.compile(r"\[say=([^\]]*)\]")
_ALWAYS = re.compile(r"\[always=(\d{3})\]")


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog (5) refuses bursts of concurrent connections
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are not errors
            super().handle_error(request, client_address)


class FakeOpenAIServer:
    """Serve in a background thread; use as a context manager.

    >>> with FakeOpenAIServer(latency=0.0) as server:      # doctest: +SKIP
    ...     client = AsyncOpenAI(base_url=server.url, api_key="test")
    """

    def __init__(
        self,
        latency: float = 0.0,
        retry_after: float = 0.05,
        hang: float = 2.0,
        *,
        logprobs: bool = True,
        batch_polls: int = 1,
        batch_outcome: str = "completed",
        port: int = 0,
    ):
        self.latency = latency
        self.retry_after = retry_after
        self.hang = hang
        self.logprobs = logprobs
        self.outage: int | None = None
        self.fail_after: int | None = None
        self.batch_polls = batch_polls
        self.batch_outcome = batch_outcome
        self.requests = 0
        self.inflight = 0
        self.max_inflight = 0
        self.per_prompt: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.headers_seen: list[dict[str, str]] = []
        self.bodies: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_requests: list[str] = []  # paths of every /files and /batches request, in order
        self._lock = threading.RLock()
        self._httpd = _Server(("127.0.0.1", port), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def done(self) -> None:
        with self._lock:
            self.inflight -= 1

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0

    def record(self, prompt: str, headers: dict[str, str], body: dict) -> int:
        """Count a request; return how many earlier requests carried the same prompt."""
        with self._lock:
            self.requests += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            seen = self.per_prompt[prompt]
            self.per_prompt[prompt] += 1
            self.times.setdefault(prompt, []).append(time.monotonic())
            self.headers_seen.append(headers)
            self.bodies.append(body)
            return seen

    def add_file(self, data: bytes) -> str:
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
            return file_id

    def answer(self, prompt: str, body: dict, *, nan: bool = False) -> dict:
        """The successful completion body for ``prompt`` (logprobs when asked for and the server has them)."""
        want_logprobs = bool(body.get("logprobs")) and self.logprobs and "[nologprobs]" not in prompt
        if "[refuse]" in prompt:
            tokens = {"REFUSAL": math.log(0.97), "I": math.log(0.02), "50": math.log(0.01)}
        else:
            m = _SCORE.search(prompt)
            tokens = score_tokens(int(m.group(1)) if m else 50 + len(prompt) % 50)
        if nan:
            tokens = {**tokens, str(max(tokens, key=tokens.get)): float("nan")}
        payload = completion(tokens, logprobs=want_logprobs)
        if not want_logprobs and (m := _SAY.search(prompt)):
            payload["choices"][0]["message"]["content"] = m.group(1)
        return payload

    def run_batch(self, batch: dict) -> None:
        """Finish ``batch``: write its output (and error) file as the Batch API does."""
        lines = self.files[batch["input_file_id"]].decode().splitlines()
        out, err = [], []
        if self.batch_outcome == "failed":
            batch["errors"] = {"object": "list", "data": [{"code": "invalid", "message": "injected batch failure"}]}
            lines = []
        if self.batch_outcome == "expired":
            lines = lines[: len(lines) // 2]
        for n, line in enumerate(lines):
            request = json.loads(line)
            body = request["body"]
            prompt = body["messages"][-1]["content"]
            row = {"id": f"batch_req_{n}", "custom_id": request["custom_id"], "error": None}
            if "[batcherr]" in prompt:
                row["response"] = {"status_code": 500, "body": {"error": {"message": "injected request failure"}}}
                err.append(json.dumps(row))
                continue
            if "[badline]" in prompt:
                out.append('{"id": "batch_req_broken", "custom_id": ')
                continue
            payload = self.answer(prompt, body, nan="[nanx" in prompt)
            row["response"] = {"status_code": 200, "request_id": f"req_{n}", "body": payload}
            out.append(json.dumps(row))
        if out:
            batch["output_file_id"] = self.add_file(("\n".join(out) + "\n").encode())
        if err:
            batch["error_file_id"] = self.add_file(("\n".join(err) + "\n").encode())
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        batch["status"] = self.batch_outcome


def completion(tokens: dict[str, float], *, logprobs: bool = True) -> dict:
    """A chat.completion body whose single generated token is the most likely of ``tokens``."""
    finite = {t: lp for t, lp in tokens.items() if not math.isnan(lp)}
    top = max(finite, key=finite.get)
    choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": top}}
    if logprobs:
        top_list = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tokens.items()]
        choice["logprobs"] = {
            "content": [{"token": top, "logprob": tokens[top], "bytes": list(top.encode()), "top_logprobs": top_list}]
        }
    else:
        choice["logprobs"] = None
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake-judge",
        "choices": [choice],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
    }


def score_tokens(score: int) -> dict[str, float]:
    """Top logprobs peaked on ``score``: 80% on it, 10% on each neighbour, a sliver on a word."""
    lo, hi = max(score - 10, 0), min(score + 10, 100)
    out = {str(score): math.log(0.8), f" {lo}": math.log(0.1), f"{hi} ": math.log(0.1)}
    out["The"] = math.log(1e-4)
    return out


def _batch_object(batch_id: str, input_file_id: str, endpoint: str, window: str) -> dict:
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": "validating",
        "created_at": int(time.time()),
        "output_file_id": None,
        "error_file_id": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
    }


def _make_handler(server: FakeOpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes; avoid 40 ms stalls

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(
            self, status: int, body: bytes, headers: dict[str, str] | None = None, ctype: str = "application/json"
        ) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0].rstrip("/")
            with server._lock:
                server.batch_requests.append(f"GET {path}")
            if m := re.fullmatch(r"/v1/files/([\w-]+)/content", path):
                data = server.files.get(m.group(1))
                if data is None:
                    self._json(404, {"error": {"message": "no such file"}})
                else:
                    self._send(200, data, ctype="application/octet-stream")
            elif m := re.fullmatch(r"/v1/batches/([\w-]+)", path):
                with server._lock:
                    batch = server.batches.get(m.group(1))
                    if batch is not None and batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                        batch["polls"] = batch.get("polls", 0) + 1
                        batch["status"] = "in_progress"
                        if batch["polls"] > server.batch_polls:
                            server.run_batch(batch)
                if batch is None:
                    self._json(404, {"error": {"message": "no such batch"}})
                else:
                    self._json(200, {k: v for k, v in batch.items() if k != "polls"})
            elif path == "/v1/batches":
                data = [{k: v for k, v in b.items() if k != "polls"} for b in server.batches.values()]
                self._json(200, {"object": "list", "data": data[-1:], "has_more": False})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/files":
                self._upload(raw)
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._json(400, {"error": {"message": "bad request"}})
                return
            if path == "/v1/batches":
                with server._lock:
                    server.batch_requests.append(f"POST {path}")
                    if body.get("input_file_id") not in server.files:
                        self._json(400, {"error": {"message": "no such input file"}})
                        return
                    batch_id = f"batch_{len(server.batches) + 1}"
                    server.batches[batch_id] = _batch_object(
                        batch_id, body["input_file_id"], body.get("endpoint", ""), body.get("completion_window", "")
                    )
                    self._json(200, server.batches[batch_id])
                return
            try:
                prompt = body["messages"][-1]["content"]
            except (KeyError, IndexError, TypeError):
                self._json(400, {"error": {"message": "bad request"}})
                return
            if not path.endswith("/chat/completions"):
                self._json(404, {"error": {"message": "not found"}})
                return
            seen = server.record(prompt, dict(self.headers), body)
            try:
                self._respond(prompt, body, seen)
            finally:
                server.done()

        def _upload(self, raw: bytes) -> None:
            ctype = self.headers.get("Content-Type", "")
            message = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
            fields = {}
            if message.is_multipart():
                for part in message.iter_parts():
                    fields[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
            with server._lock:
                server.batch_requests.append("POST /v1/files")
            if fields.get("purpose") != b"batch" or "file" not in fields:
                self._json(400, {"error": {"message": "expected multipart fields 'purpose=batch' and 'file'"}})
                return
            file_id = server.add_file(fields["file"])
            self._json(
                200,
                {
                    "id": file_id,
                    "object": "file",
                    "bytes": len(fields["file"]),
                    "created_at": int(time.time()),
                    "filename": "input.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                },
            )

        def _respond(self, prompt: str, body: dict, seen: int) -> None:
            if server.latency:
                time.sleep(server.latency)
            down = server.outage is not None or server.fail_after is not None
            if down and (server.fail_after is None or server.requests > server.fail_after):
                self._json(server.outage or 503, {"error": {"message": "injected outage"}})
                return
            if m := _ALWAYS.search(prompt):
                self._send(int(m.group(1)), b'{"error": {"message": "injected failure"}}')
                return
            nan = False
            for kind, count in _FAULT.findall(prompt):
                if seen < int(count):
                    if kind == "429":
                        self._send(
                            429, b'{"error": {"message": "rate limited"}}', {"Retry-After": str(server.retry_after)}
                        )
                    elif kind == "500":
                        self._send(500, b'{"error": {"message": "internal error"}}')
                    elif kind == "timeout":
                        time.sleep(server.hang)
                        self._send(500, b'{"error": {"message": "too late"}}')
                    elif kind == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    elif kind == "nan":
                        nan = True
                        continue
                    else:
                        self._send(200, b'{"id": "chatcmpl-fake", "choices": [{"ind')
                    return
            self._send(200, json.dumps(server.answer(prompt, body, nan=nan)).encode())

    return Handler


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--hang", type=float, default=2.0, help="seconds a [timeoutxK] request hangs")
    p.add_argument("--no-logprobs", action="store_true", help="ignore logprobs, as transformers serve does")
    p.add_argument("--outage", type=int, default=None, help="answer every request with this HTTP status")
    p.add_argument("--fail-after", type=int, default=None, help="fail requests after the N-th (an outage mid-run)")
    p.add_argument("--batch-polls", type=int, default=1, help="batch retrievals before a batch completes")
    args = p.parse_args()
    server = FakeOpenAIServer(
        latency=args.latency, hang=args.hang, logprobs=not args.no_logprobs, batch_polls=args.batch_polls, port=args.port
    )
    server.outage, server.fail_after = args.outage, args.fail_after
    server.start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
