"""A local HTTP server speaking the Anthropic Messages API (POST /v1/messages), for tests and the
benchmark. It answers like a diligent Interpreter / Predictor would, so F1s mean something:

- Interpreter (system prompt mentions "neuron"): names the most frequent `<<marked>>` spans.
- Predictor (system prompt says "Python list"): 1 for each example containing a quoted keyword
  of the explanation, else 0.
- Diversity (user text asks for "Diversity Score"): a score from the number of keywords.

`faults` is a queue of scripted failures consumed by the next requests: a status (429, 529, 500...)
answered with an error body and `retry-after: 0`, or (status, retry-after); `malformed_predictor=True` makes every
Predictor answer prose. `requests` counts POSTs; `api_keys` records the keys seen (x-api-key or bearer). GET /stats
returns the counters (for a server in another process: `python fake_anthropic_server.py LATENCY`).
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeAnthropic:
    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s
        self.faults: collections.deque[int | tuple[int, str]] = collections.deque()
        self.malformed_predictor = False
        self.fail_from: int | None = None
        """When set, every request after the first `fail_from` is answered HTTP 503 (the API went down)."""
        self.requests = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self.api_keys: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        ThreadingHTTPServer.request_queue_size = 256  # many clients connect at once
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- answers ------------------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> tuple[str, str]:
        system = body.get("system") or ""
        if isinstance(system, list):
            system = " ".join(b.get("text", "") for b in system)
        user = body["messages"][-1]["content"]
        if isinstance(user, list):
            user = " ".join(b.get("text", "") for b in user)
        if "neuron" in system:
            spans = collections.Counter(s.strip() for s in re.findall(r"<<(.+?)>>", user))
            top = [s for s, _ in spans.most_common(3)]
            quoted = ", ".join(f'"{s}"' for s in top)
            return "interpreter", f"The marked tokens are {quoted}.\n[EXPLANATION]: The tokens {quoted}."
        if "Python list" in system:
            if self.malformed_predictor:
                return "predictor", "I believe examples 0 and 2 have the feature."
            expl = re.search(r"Feature explanation: (.*)", user)
            keys = re.findall(r'"(.+?)"', expl.group(1)) if expl else []
            examples = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
            labels = [int(any(k in ex for k in keys)) for ex in examples]
            return "predictor", json.dumps(labels)
        if "Diversity Score" in user:
            n = len(re.findall(r'"(.+?)"', user))
            return (
                "diversity",
                f"Unified explanation:\nTokens.\n\nDiversity Score: {min(100, 10 * n + 5)}\n\nJustification: few.",
            )
        return "other", "Unified explanation: tokens."

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body wait on a delayed ACK (~40 ms a call)

            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", "req_fake")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") == "/stats":
                    return self._send(200, {"requests": fake.requests, "max_in_flight": fake.max_in_flight})
                self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

            def do_POST(self) -> None:  # noqa: N802
                with fake._lock:
                    fake.requests += 1
                    auth = self.headers.get("authorization", "").removeprefix("Bearer ")
                    fake.api_keys.add(self.headers.get("x-api-key") or auth)
                    fault = fake.faults.popleft() if fake.faults else None
                    if fake.fail_from is not None and fake.requests > fake.fail_from:
                        fault = 503
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                    if fake.latency_s:
                        time.sleep(fake.latency_s)
                    if self.path.rstrip("/") != "/v1/messages":
                        return self._send(
                            404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}}
                        )
                    if fault is not None:
                        status, wait = fault if isinstance(fault, tuple) else (fault, "0")
                        kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
                        err = {"type": "error", "error": {"type": kind, "message": f"fake {status}"}}
                        return self._send(status, err, {"retry-after": wait})
                    kind, text = fake.answer(body)
                    with fake._lock:
                        fake.kinds[kind] += 1
                    n_in = (
                        sum(len(json.dumps(m)) for m in body["messages"]) // 4
                        + len(str(body.get("system", ""))) // 4
                    )
                    self._send(
                        200,
                        {
                            "id": f"msg_fake_{fake.requests}",
                            "type": "message",
                            "role": "assistant",
                            "model": body.get("model", "fake"),
                            "content": [{"type": "text", "text": text}],
                            "stop_reason": "end_turn",
                            "stop_sequence": None,
                            "usage": {"input_tokens": n_in, "output_tokens": len(text) // 4 + 1},
                        },
                    )
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        return Handler


if __name__ == "__main__":
    import sys

    with FakeAnthropic(latency_s=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as srv:
        print(srv.url, flush=True)
        threading.Event().wait()
