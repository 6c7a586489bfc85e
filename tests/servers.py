"""Loopback HTTP servers for the API-judge tests and benchmark.

`FaultServer` speaks real HTTP with the OpenAI chat-completions and Anthropic messages JSON shapes
and injects the faults a real provider produces but will not produce on demand: 429 with
Retry-After, 500, requests that outlive the client's timeout, dropped connections and unparseable
verdicts, at seeded rates. It knows the right answer: the response that contains `marker` wins,
so a test can check that no pair was ever labelled wrongly.

`vllm_server` starts vLLM's own OpenAI-compatible server on a model directory, for the real thing.
"""

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from aiohttp import web

FAULTS = ("rate_limit", "server_error", "timeout", "drop", "garbage")
GARBAGE = "Both responses have merit; it depends on the user."
_QUOTED = re.compile(r"<response-([AB])-([0-9a-f]{16})>\n(.*?)\n</response-\1-\2>", re.S)


class FaultServer:
    """Judge endpoint on 127.0.0.1 with seeded faults; use as a context manager (runs in a thread).

    rates: fault name -> probability per request (see FAULTS). script: faults for the first
    requests in arrival order (None = answer), before `rates` apply. `log` has one entry per request.
    """

    def __init__(
        self,
        *,
        marker: str = "WINNER",
        rates: Optional[Dict[str, float]] = None,
        script: Sequence[Optional[str]] = (),
        retry_after: str = "1",
        latency_s: float = 0.0,
        slow_rate: float = 0.0,
        slow_s: float = 5.0,
        hang_s: float = 3.0,
        prob_winner: float = 0.9,
        api_key: Optional[str] = None,
        seed: int = 0,
        port: int = 0,
    ) -> None:
        unknown = (set(rates or {}) | {s for s in script if s}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {FAULTS}")
        self.marker, self.rates, self.script = marker, dict(rates or {}), list(script)
        self.retry_after, self.latency_s, self.hang_s = retry_after, latency_s, hang_s
        self.slow_rate, self.slow_s = slow_rate, slow_s  # a heavy tail: this share of requests takes slow_s
        self.prob_winner, self.api_key, self.port = prob_winner, api_key, port
        self.log: List[Dict[str, Any]] = []
        self.in_flight = self.peak_in_flight = 0  # requests being answered now, and the most at once
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "FaultServer":
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/v1/messages", self._messages)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-server", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("fault server did not start within 30 s")
        return self

    def __exit__(self, *exc: Any) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()
            hung = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # "timeout" faults
            for t in hung:
                t.cancel()
            await asyncio.gather(*hung, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    # ---- behaviour ------------------------------------------------------------------------

    def _fault(self) -> Optional[str]:
        with self._lock:
            if self.script:
                return self.script.pop(0)
            r, edge = self._rng.random(), 0.0
            for name in FAULTS:
                edge += self.rates.get(name, 0.0)
                if r < edge:
                    return name
            return None

    def winner(self, text: str) -> str:
        """The quoted response that contains the marker (A if neither or both do)."""
        quoted = {label: body for label, _, body in _QUOTED.findall(text)}
        return "B" if self.marker in quoted.get("B", "") and self.marker not in quoted.get("A", "") else "A"

    async def _answer(self, request: web.Request, api: str, authorized: bool) -> Dict[str, Any]:
        """Log the request, wait the latency (and a "timeout" fault's hang); what to answer with."""
        body = await request.json()
        texts = [body.get("system") or ""] + [_content(m) for m in body.get("messages", [])]
        fault = None if not authorized else self._fault()
        entry = {
            "t": time.monotonic(),
            "api": api,
            "fault": fault,
            "authorized": authorized,
            "text": texts[-1],
            "query": dict(request.query),
            "headers": dict(request.headers),
        }
        self.log.append(entry)
        with self._lock:
            slow = self._rng.random() < self.slow_rate
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.latency_s or slow:
                await asyncio.sleep(self.slow_s if slow else self.latency_s)
            if fault == "timeout":
                await asyncio.sleep(self.hang_s)
        finally:
            with self._lock:
                self.in_flight -= 1
        return {
            "body": body,
            "fault": fault,
            "winner": self.winner(texts[-1]),
            "tokens": sum(map(len, texts)) // 4,
        }

    def _authorized(self, request: web.Request) -> bool:
        """The key as `Authorization: Bearer` (OpenAI; Anthropic's SDK too) or `x-api-key` (Anthropic)."""
        sent = {request.headers.get("Authorization"), f"Bearer {request.headers.get('x-api-key')}"}
        return self.api_key is None or f"Bearer {self.api_key}" in sent

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "openai", "invalid_api_key", "Incorrect API key provided.")
        return web.json_response(
            {"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "test"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        authorized = self._authorized(request)
        a = await self._answer(request, "openai", authorized)
        if not authorized:  # like OpenAI, echo (here: all of) the key sent: our side must not repeat it
            return _error(
                401, "openai", "invalid_api_key", f"Incorrect API key provided: {_sent_key(request)}."
            )
        if a["fault"] in ("rate_limit", "server_error", "drop"):
            return _fail(request, a["fault"], "openai", self.retry_after)
        body, winner = a["body"], a["winner"]
        json_mode = (body.get("response_format") or {}).get("type") == "json_schema"
        text = GARBAGE if a["fault"] == "garbage" else _verdict_text(winner, json_mode)
        choice: Dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        if body.get("logprobs") and a["fault"] != "garbage":
            p = {winner: self.prob_winner, "AB".replace(winner, ""): 1 - self.prob_winner}
            top = [{"token": k, "logprob": math.log(v), "bytes": list(k.encode())} for k, v in p.items()]
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
        return web.json_response(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": a["tokens"],
                    "completion_tokens": 1,
                    "total_tokens": a["tokens"] + 1,
                },
            }
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        authorized = self._authorized(request)
        a = await self._answer(request, "anthropic", authorized)
        if not authorized:
            return _error(
                401, "anthropic", "authentication_error", f"invalid x-api-key: {_sent_key(request)}"
            )
        if a["fault"] in ("rate_limit", "server_error", "drop"):
            return _fail(request, a["fault"], "anthropic", self.retry_after)
        body = a["body"]
        json_mode = bool((body.get("output_config") or {}).get("format"))
        text = GARBAGE if a["fault"] == "garbage" else _verdict_text(a["winner"], json_mode)
        return web.json_response(
            {
                "id": "msg_test",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": a["tokens"], "output_tokens": 1},
            }
        )


def _sent_key(request: web.Request) -> str:
    return request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix(
        "Bearer "
    )


def _content(message: Dict[str, Any]) -> str:
    content = message.get("content", "")
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _verdict_text(winner: str, json_mode: bool) -> str:
    return json.dumps({"verdict": winner, "rationale": "it contains the marker"}) if json_mode else winner


def _error(
    status: int, api: str, kind: str, message: str, headers: Optional[Dict[str, str]] = None
) -> web.Response:
    body = (
        {"error": {"message": message, "type": kind}}
        if api == "openai"
        else {"type": "error", "error": {"type": kind, "message": message}}
    )
    return web.json_response(body, status=status, headers=headers)


def _fail(request: web.Request, fault: str, api: str, retry_after: str) -> web.StreamResponse:
    if fault == "rate_limit":
        return _error(
            429, api, "rate_limit_error", "Rate limit reached; slow down.", {"Retry-After": retry_after}
        )
    if fault == "server_error":
        return _error(500, api, "server_error", "The server had an error while processing your request.")
    request.transport.abort()  # drop: close the connection without an answer
    return web.Response()


def main() -> None:
    """`python tests/servers.py --port P --latency 0.2`: serve until killed (the benchmark runs it
    in its own process, so the server does not compete with the judge for one interpreter)."""
    import argparse

    p = argparse.ArgumentParser(description="loopback judge server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--slow-rate", type=float, default=0.0, help="share of requests that take --slow-s instead")
    p.add_argument("--slow-s", type=float, default=5.0)
    args = p.parse_args()
    with FaultServer(port=args.port, latency_s=args.latency, slow_rate=args.slow_rate, slow_s=args.slow_s) as server:
        print(f"serving on {server.url}", flush=True)
        threading.Event().wait()


# ---- vLLM's own OpenAI-compatible server -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    model_dir: str, name: str, log_path: Path, timeout_s: float = 600, extra: Sequence[str] = ()
) -> Iterator[str]:
    """Run `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1; yields the base URL
    (.../v1) once /v1/models answers. The process group is terminated on exit."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--gpu-memory-utilization",
        "0.05",
        # vLLM's CPU backend sizes its KV cache from node 0's free memory minus what the process
        # holds, which fails on a busy machine: give it a fixed size instead (256 MiB)
        "--kv-cache-memory-bytes",
        str(256 << 20),
        "--enforce-eager",
        *extra,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ}
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    main()
