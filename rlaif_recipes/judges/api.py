"""`judge=openai` and `judge=anthropic`: a hosted or served model judges each pair over HTTP.

Both send the rubric's judge prompt (`Rubric.messages`) through the official async client and run
many requests at once: at most `max_concurrency` in flight, paced by client-side requests- and
tokens-per-minute limits. Failures are retried here and only here (the SDK's own retries are off):
429, 5xx, timeouts and dropped connections back off exponentially with jitter, honour the
server's Retry-After, and give up after `max_retries` retries, leaving that pair abstained with
the last error as its reason. Auth failures stop the run, since every request would fail alike.

Each judgment is handed to the base class the moment it arrives, so the cache keeps everything
a killed run finished. A budget (requests, tokens, USD) stops labelling cleanly: the rest of the
pairs abstain with a message that says which budget ran out and how to raise it.

The API key is read from the environment variable named by `api_key_env` when a run starts and
is never stored in the config, the identity (cache key), logs or error messages. So are the other
places a provider may want a credential: the endpoint URL's query string (`?key=...`, sent as the
client's default query) or userinfo (`https://user:secret@host`), and `default_headers` values:
everything shown or saved names an endpoint by its redacted URL (`rlaif_recipes.redact`).
"""

import abc
import asyncio
import base64
import contextlib
import importlib
import itertools
import logging
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from rlaif_recipes.errors import ConfigError, JudgeError
from rlaif_recipes.judges.api_limits import RateLimiter, backoff_delay, retry_after_seconds
from rlaif_recipes.judges.api_parse import (
    JSON_ANSWER,
    VERDICT_SCHEMA,
    parse_verdict,
    prob_a_from_openai_logprobs,
)
from rlaif_recipes.judges.base import CALL_USAGE, Judgment, Pair, PairwiseJudge
from rlaif_recipes.judges.rubric import LETTER_ANSWER
from rlaif_recipes.redact import mask, redact_url, url_secrets

log = logging.getLogger(__name__)

STRUCTURED = ("choice", "json_schema", "none")
PROBE_TIMEOUT_S = 10.0  # connection refused fails at once; this bounds an endpoint that never answers
RETRY_STATUS = {408, 409, 429}  # plus every 5xx
FATAL_STATUS = {401: "the API rejected the key", 403: "the key may not use this model or endpoint"}


class _MaskSecrets(logging.Filter):
    """The HTTP libraries' own log lines with every API judge's secrets masked (httpx logs each
    request's URL, query string included, at INFO)."""

    secrets: Set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask(record.getMessage(), self.secrets), None
        return True


_MASK = _MaskSecrets()
for _name in ("httpx", "httpx2", "openai._base_client", "anthropic._base_client"):
    logging.getLogger(_name).addFilter(_MASK)


class JudgeUnavailableError(JudgeError):
    """The judge endpoint cannot be used at all (unreachable, or the key is rejected)."""


@dataclass
class Reply:
    """What one successful request returned."""

    text: str
    input_tokens: int
    output_tokens: int
    prob_a_tokens: Optional[List[Any]] = None  # OpenAI-shaped logprobs content, where returned
    truncated: bool = False


class APIJudge(PairwiseJudge):
    """Concurrency, pacing, retries, budget and accounting shared by the HTTP judges."""

    concurrent_calls = True

    sdk_module = ""  # "openai" or "anthropic": the official SDK, imported when a judge is made
    client_class = ""  # the SDK's async client class
    RUNTIME_SETTINGS = PairwiseJudge.RUNTIME_SETTINGS + (
        "base_url", "api_key_env", "max_concurrency", "requests_per_minute", "tokens_per_minute", "timeout_s",
        "hedge_after_s", "default_headers",
        "max_retries", "backoff_base_s", "backoff_max_s", "probe", "input_usd_per_mtok", "output_usd_per_mtok",
        "max_requests", "max_tokens", "max_cost_usd",
    )

    def __init__(
        self,
        *,
        model: str,
        api_key_env: Optional[str],
        base_url: Union[str, Sequence[str], None] = None,
        default_headers: Optional[Mapping[str, str]] = None,
        structured: str = "none",
        temperature: Optional[float] = 0.0,
        max_output_tokens: int = 8,
        max_concurrency: int = 16,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        timeout_s: float = 60.0,
        hedge_after_s: Optional[float] = None,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        probe: bool = True,
        input_usd_per_mtok: Optional[float] = None,
        output_usd_per_mtok: Optional[float] = None,
        max_requests: Optional[int] = None,
        max_tokens: Optional[int] = None,
        max_cost_usd: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.rubric is None:
            raise ConfigError(
                "judge.rubric is required: an API judge sends the rubric's criteria (e.g. rubric=false_refusal)"
            )
        if structured not in STRUCTURED:
            raise ConfigError(f"judge.structured={structured!r}: choose one of {', '.join(STRUCTURED)}")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or (hedge_after_s is not None and hedge_after_s <= 0):
            raise ConfigError(
                "judge.max_concurrency must be >= 1, judge.max_retries >= 0, judge.timeout_s > 0 and "
                "judge.hedge_after_s > 0 (or null)"
            )
        negative = [f"judge.{k}={v}" for k, v in (("input_usd_per_mtok", input_usd_per_mtok), ("output_usd_per_mtok", output_usd_per_mtok),
                    ("max_requests", max_requests), ("max_tokens", max_tokens), ("max_cost_usd", max_cost_usd)) if v is not None and v < 0]  # fmt: skip
        if negative:
            raise ConfigError(f"{', '.join(negative)}: prices and budgets must be >= 0 (or null: no price known / no budget)")
        if max_cost_usd is not None and (input_usd_per_mtok is None or output_usd_per_mtok is None):
            raise ConfigError(
                "judge.max_cost_usd needs prices: set judge.input_usd_per_mtok and judge.output_usd_per_mtok "
                "(USD per million tokens, from the provider's price list), or drop the cost budget"
            )
        self.sdk = importlib.import_module(self.sdk_module)  # its exception classes and clients
        self.api_key_env = api_key_env
        self._api_key = _read_key(api_key_env)
        self.model_name, self.structured = model, structured
        # replicas of one model (e.g. several `vllm serve`): requests spread over them, and one that
        # keeps failing to connect is skipped for the rest of the run
        self.base_urls: List[Optional[str]] = [base_url] if base_url is None or isinstance(base_url, str) else list(base_url)
        if not self.base_urls or (len(self.base_urls) > 1 and not all(self.base_urls)):
            raise ConfigError(f"judge.base_url={_shown(base_url)}: give one URL, null (the provider's default), or a list of URLs")
        for i, url in enumerate(self.base_urls):
            _check_url(url, "judge.base_url" + (f"[{i}]" if len(self.base_urls) > 1 else ""))
        self.base_url = self.base_urls[0] if len(self.base_urls) == 1 else None
        self.default_headers = {str(k): str(v) for k, v in (default_headers or {}).items()}
        self._secrets = [v for url in self.base_urls if url for v in url_secrets(url)] + list(self.default_headers.values())
        if api_key_env:
            self._secrets.append(self._api_key)
        _MASK.secrets.update(self._secrets)
        self._dead: Set[str] = set()
        self._failures: Counter = Counter()  # connection failures in a row, per endpoint
        self.temperature, self.max_output_tokens = temperature, max_output_tokens
        self.max_concurrency, self.requests_per_minute, self.tokens_per_minute = (
            max_concurrency,
            requests_per_minute,
            tokens_per_minute,
        )
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.hedge_after_s = hedge_after_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.probe = probe
        self.prices = (input_usd_per_mtok, output_usd_per_mtok)
        self.budget = {"max_requests": max_requests, "max_tokens": max_tokens, "max_cost_usd": max_cost_usd}
        self._rng = random.Random(self.seed)
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # the judge's event loop, from the first call to close()
        self._loop_lock = threading.Lock()
        self._in_flight = {"requests": 0, "tokens": 0, "cost_usd": 0.0}
        self._turns = itertools.count()  # each pair's first replica, in turn (calls may hold one pair each)

    # ---- what each API provides -----------------------------------------------------------

    def _client(self, api_key: str, base_url: Optional[str]) -> Any:
        """A new async SDK client with the SDK's own retries off, made inside the running loop, on
        the aiohttp transport (about 1 ms less CPU per request than the default httpx one). A query
        string in the URL becomes the client's default query (the SDK appends paths to the URL), and
        userinfo basic auth (as curl sends it; aiohttp refuses userinfo beside the SDK's own header)."""
        query: Dict[str, str] = {}
        headers = dict(self.default_headers)
        if base_url is not None:
            parts = urlsplit(base_url)
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            if parts.username is not None and not any(k.lower() == "authorization" for k in headers):
                userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
            netloc = parts.netloc.rpartition("@")[2]
            base_url = urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))
        return getattr(self.sdk, self.client_class)(
            api_key=api_key,
            base_url=base_url,
            default_query=query or None,
            default_headers=headers or None,
            max_retries=0,
            timeout=self.timeout_s,
            http_client=self.sdk.DefaultAioHttpClient(),
        )

    @abc.abstractmethod
    async def _request(self, client: Any, pair: Pair) -> Reply:
        """One API call for one pair; SDK exceptions propagate to the retry loop."""

    # ---- identity -------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.model_name

    def identity(self) -> Dict[str, Any]:
        """Plus the endpoint: a run may move to another server (base_url is a RUNTIME_SETTING), but
        a served name such as vLLM's "judge" says nothing about the model, so the cache keeps the
        verdicts of different endpoints apart."""
        shown = [redact_url(url) if url else url for url in self.base_urls]
        return {**super().identity(), "base_url": shown[0] if len(shown) == 1 else sorted(shown)}

    def answer_instruction(self) -> str:
        return JSON_ANSWER if self.structured == "json_schema" else LETTER_ANSWER

    # ---- the sync entry the base class calls ------------------------------------------------

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        """Runs on the judge's own event loop (a thread started by the first call, kept until
        `close`): the clients and their open connections, the rate limiter and the concurrency cap
        are shared by every call, also by several calls at once from different threads."""
        loop = self._event_loop()  # first: a failed probe raises before the coroutine exists
        asyncio.run_coroutine_threadsafe(self._compare_async(pairs, record, CALL_USAGE.get()), loop).result()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"{self.name}-http", daemon=True)
                thread.start()
                try:
                    asyncio.run_coroutine_threadsafe(self._open(), loop).result()
                except BaseException:
                    _stop_loop(loop, thread)
                    raise
                self._loop, self._loop_thread = loop, thread
            return self._loop

    async def _open(self) -> None:
        """Clients, pacing and the concurrency cap, made on the loop that uses them; then the probe."""
        self._clients = {url: self._client(self._api_key, url) for url in self.base_urls}
        self._limiter = RateLimiter(self.requests_per_minute, self.tokens_per_minute)
        self._slots = asyncio.Semaphore(self.max_concurrency)
        try:
            if self.probe:
                await self._probe(self._clients)
        except BaseException:
            await self._close_clients()
            raise

    async def _close_clients(self) -> None:
        for client in self._clients.values():
            await client.close()

    def close(self) -> None:
        with self._loop_lock:
            if self._loop is not None:
                asyncio.run_coroutine_threadsafe(self._close_clients(), self._loop).result()
                _stop_loop(self._loop, self._loop_thread)
                self._loop = None
        super().close()

    async def _compare_async(self, pairs: List[Pair], record: Callable[[int, Judgment], None], call: Optional[Counter]) -> None:
        CALL_USAGE.set(call)  # this task's context (and its children's): counts go to the caller's call

        async def one(i: int, pair: Pair) -> None:
            async with self._slots:
                judgment = await self._judge_one(pair)
            record(i, judgment)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(pairs)))

    async def _probe(self, clients: Dict[Optional[str], Any]) -> None:
        """One cheap GET /models per endpoint before the first request: an endpoint that is down or a
        rejected key fails here with one clear error instead of as N abstains after N retry budgets.
        Of several replicas, an unreachable one is skipped (and said); all of them down is an error."""
        unreachable = {}
        for url, client in clients.items():
            try:
                await client.models.list(timeout=PROBE_TIMEOUT_S)
            except self.sdk.APIConnectionError as e:
                unreachable[url] = self._scrub(_describe(e))
            except self.sdk.APIStatusError as e:
                if e.status_code in FATAL_STATUS:
                    raise JudgeUnavailableError(self._fatal_message(e.status_code)) from None
                # some compatible endpoints have no /models route; the requests themselves will tell
        if len(unreachable) == len(clients):
            raise JudgeUnavailableError(
                f"judge endpoint {self._where()} is unreachable ({next(iter(unreachable.values()))}); start the server "
                "or fix judge.base_url (judge.probe=false skips this check)"
            )
        for url, why in unreachable.items():
            log.warning("judge endpoint %s is unreachable (%s): skipped, %d replica(s) left", _shown(url), why, len(clients) - len(unreachable))
            self._dead.add(url)

    def _endpoint(self, turn: int) -> Optional[str]:
        """The replica for a pair's attempt: round robin over the live ones (retries move on)."""
        live = [u for u in self.base_urls if u not in self._dead] or self.base_urls
        return live[turn % len(live)]

    def _connection_failed(self, url: Optional[str]) -> None:
        """A replica that fails to connect more than max_retries times in a row is skipped from now on."""
        self._failures[url] += 1
        if len(self.base_urls) > 1 and url not in self._dead and self._failures[url] > self.max_retries:
            self._dead.add(url)
            self.count("endpoints_skipped", 1)
            log.warning("judge endpoint %s failed %d times in a row: skipped for the rest of the run", _shown(url), self._failures[url])


    # ---- one pair: budget, pacing, retries ------------------------------------------------

    async def _judge_one(self, pair: Pair) -> Judgment:
        first_turn = next(self._turns)  # round robin over the judge's whole life, not per call
        usage = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        est_input = self._estimate_input_tokens(pair)
        reserved = {
            "requests": 1,
            "tokens": est_input + self.max_output_tokens,
            "cost_usd": self._cost(est_input, self.max_output_tokens),
        }
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if self.stopped or self._over_budget(reserved):
                return Judgment.abstain(self.stopped, usage=usage)
            await self._limiter.acquire(reserved["tokens"])
            if self.stopped or self._over_budget(reserved):  # the budget may have run out while waiting
                return Judgment.abstain(self.stopped, usage=usage)
            url = self._endpoint(first_turn + attempt)
            try:
                with self._sending(url, reserved, usage):
                    reply = await self._hedged_request(url, pair, first_turn + attempt, reserved, usage)
            except (self.sdk.APIConnectionError, self.sdk.APIStatusError) as e:
                kind, asked = self._classify(e)
                self.count(f"errors_{kind}", 1)
                if kind in ("connection", "timeout"):
                    self._connection_failed(url)
                last_error = self._scrub(_describe(e))
                if kind == "auth":
                    self.stopped = self.stopped or self._fatal_message(e.status_code)
                    return Judgment.abstain(self.stopped, usage=usage)
                if kind.startswith("http_") or attempt == self.max_retries:
                    break
                if asked is not None and asked > self.backoff_max_s:
                    last_error += f"; the server asked to wait {asked:.0f}s, more than judge.backoff_max_s={self.backoff_max_s}"
                    break
                if kind == "rate_limit" and asked is not None:
                    self._limiter.pause(asked)
                wait = (
                    asked
                    if asked is not None
                    else backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng)
                )
                self.count("retries", 1)
                log.debug("judge request failed (%s); retry %d in %.2fs", last_error, attempt + 1, wait)
                await asyncio.sleep(wait)
                continue
            self._failures[url] = 0
            return self._judgment(reply, usage)
        return Judgment.abstain(
            f"{self.name} gave up after {usage['requests']} attempt(s): {last_error}", usage=usage
        )

    async def _hedged_request(self, url: Optional[str], pair: Pair, turn: int, reserved: Dict[str, float], usage: Dict[str, float]) -> Reply:
        """One attempt. With hedge_after_s, a request unanswered by then gets a copy (on the next
        replica, if several) and the first answer wins; the other is cancelled. A heavy latency tail
        then costs about hedge_after_s plus one ordinary request, for a few percent more requests.
        A failed copy waits for the other one; both failing raise the first error."""
        first = asyncio.ensure_future(self._request(self._clients[url], pair))
        if self.hedge_after_s is None:
            return await first
        done, _ = await asyncio.wait({first}, timeout=self.hedge_after_s)
        if done or self.stopped or self._over_budget(reserved):
            return await first
        hedge_url = self._endpoint(turn + 1)
        self.count("hedged", 1)
        with self._sending(hedge_url, reserved, usage):
            copy = asyncio.ensure_future(self._request(self._clients[hedge_url], pair))
            pending = {first, copy}
            errors = []
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if task.exception() is None:
                            self.count("hedge_wins", task is copy)
                            return task.result()
                        errors.append((task is copy, task.exception()))
                raise sorted(errors, key=lambda e: e[0])[0][1]
            finally:
                for task in pending:
                    task.cancel()

    @contextlib.contextmanager
    def _sending(self, url: Optional[str], reserved: Dict[str, float], usage: Dict[str, float]) -> Iterator[None]:
        """One request on the wire: counted when sent, and its estimate held against the budget
        until it is answered or has failed (not through a retry's backoff)."""
        usage["requests"] += 1
        self.count("requests", 1)
        if len(self.base_urls) > 1:
            self.count(f"requests@{_shown(url)}", 1)
        for k, v in reserved.items():
            self._in_flight[k] += v
        try:
            yield
        finally:
            for k, v in reserved.items():
                self._in_flight[k] -= v

    def _judgment(self, reply: Reply, usage: Dict[str, float]) -> Judgment:
        cost = self._cost(reply.input_tokens, reply.output_tokens)
        usage.update(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens, cost_usd=cost)
        self.count("input_tokens", reply.input_tokens)
        self.count("output_tokens", reply.output_tokens)
        self.count("cost_usd", cost)
        verdict, rationale, reason = parse_verdict(reply.text)
        if verdict is None:
            self.count("errors_unparseable", 1)
            if reply.truncated:
                reason = f"{reason} (cut off at judge.max_output_tokens={self.max_output_tokens})"
            return Judgment.abstain(reason, usage=usage)
        prob_a = prob_a_from_openai_logprobs(reply.prob_a_tokens, verdict) if reply.prob_a_tokens else None
        return Judgment(verdict, prob_a=prob_a, rationale=rationale, usage=usage)

    def _classify(self, e: Exception) -> Tuple[str, Optional[float]]:
        """(error kind, the wait the server asked for). Kinds: timeout, connection, rate_limit,
        server (all retried), auth (stops the run), http_<status> (this pair abstains)."""
        if isinstance(e, self.sdk.APIConnectionError):
            # judged by the root cause: the aiohttp transport reports any dropped connection as a
            # ConnectTimeout (so as APITimeoutError), even when nothing timed out
            root = _root_cause(e)
            return (
                "timeout"
                if isinstance(root, TimeoutError) or "Timeout" in type(root).__name__
                else "connection"
            ), None
        status = e.status_code
        if status in FATAL_STATUS:
            return "auth", None
        if status in RETRY_STATUS or status >= 500:
            return "rate_limit" if status == 429 else "server", retry_after_seconds(e.response.headers)
        return f"http_{status}", None

    # ---- budget and cost ------------------------------------------------------------------

    def estimate(self, pairs: Sequence[Pair], what: str) -> str:
        """One line saying what judging `pairs` will cost (requests, tokens, USD when prices are set),
        and which budget would stop it before the end; said before the first request."""
        queries = self.uncached_queries(pairs)
        shown = sum(len(self._orders(p)) for p in pairs)
        input_tokens = sum(self._estimate_input_tokens(q) for q in queries)
        output_tokens = self.max_output_tokens * len(queries)
        cost = self._cost(input_tokens, output_tokens)
        line = (f"judge cost estimate for {what}: {len(pairs)} comparisons -> {len(queries)} requests "
                f"({shown - len(queries)} cached), "
                f"~{input_tokens} input + {output_tokens} output tokens"
                + (f", ~${cost:.2f}" if self.prices[0] is not None and self.prices[1] is not None else ", USD unknown (set judge.input_usd_per_mtok and judge.output_usd_per_mtok)"))
        projected = {"max_requests": len(queries), "max_tokens": input_tokens + output_tokens, "max_cost_usd": cost}
        short = [f"judge.{k}={self.budget[k]} (estimate {projected[k]:.4g})" for k in projected
                 if self.budget[k] is not None and self.budget[k] < projected[k]]
        if short:
            line += f"; below the estimate: {', '.join(short)}: the run will stop at that budget (raise it to finish)"
        return line

    def _estimate_input_tokens(self, pair: Pair) -> int:
        """About 4 characters per token: only for pacing and for budget reservations in flight."""
        chars = (
            len(self.rubric.criteria if self.rubric else "")
            + len(pair.prompt)
            + len(pair.response_a)
            + len(pair.response_b)
        )
        return (chars + 1200) // 4  # 1200: the judge prompt's fixed text

    def _cost(self, input_tokens: int, output_tokens: int) -> float:
        price_in, price_out = self.prices
        if price_in is None or price_out is None:
            return 0.0
        return (input_tokens * price_in + output_tokens * price_out) / 1e6

    def _over_budget(self, reserved: Dict[str, float]) -> bool:
        """Would one more request (with everything in flight counted at its estimate) pass a budget?
        If so, set `self.stopped` to say which one and how to raise it."""
        m = self.metrics
        projected = {
            "max_requests": (m["requests"] + 1, f"{m['requests']} requests sent"),
            "max_tokens": (
                m["input_tokens"] + m["output_tokens"] + self._in_flight["tokens"] + reserved["tokens"],
                f"{m['input_tokens'] + m['output_tokens']} tokens used",
            ),
            "max_cost_usd": (
                m["cost_usd"] + self._in_flight["cost_usd"] + reserved["cost_usd"],
                f"{m['cost_usd']:.4f} USD spent",
            ),
        }
        for key, limit in self.budget.items():
            value, spent = projected[key]
            if limit is not None and value > limit:
                self.stopped = (
                    f"judge budget reached: judge.{key}={limit} ({spent}, {m['requests']} requests); raise it "
                    f"(e.g. judge.{key}={limit * 2}) or set judge.{key}=null and re-run: judgments made so far "
                    "are cached and are not paid for again"
                )
                return True
        return False

    # ---- messages -------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """Error text with the key, header values and URL secrets masked, in case an endpoint
        echoes them back."""
        return mask(text, self._secrets)

    def _where(self) -> str:
        if self.base_url is None and len(self.base_urls) == 1:
            return f"the default {self.sdk.__name__} endpoint"
        return ", ".join(_shown(url) for url in self.base_urls)

    def _fatal_message(self, status: int) -> str:
        return (
            f"judge endpoint {self._where()} answered HTTP {status}: {FATAL_STATUS[status]}; check the key in "
            f"${self.api_key_env} and judge.model={self.model_name!r}"
        )


class OpenAIJudge(APIJudge):
    """Any OpenAI-compatible chat-completions endpoint: OpenAI, `vllm serve`, hosted providers.

    `structured=choice` uses vLLM's guided choice (`structured_outputs: {choice: [A, B]}`), so the
    reply is always one letter; `json_schema` uses OpenAI's `response_format`; `none` asks for a
    letter and parses strictly. With `logprobs=True` P(A) comes from the verdict token's top-5
    log-probabilities (for vLLM, start the server with `--logprobs-mode processed_logprobs` so they
    are taken after the choice constraint and A and B are always among them).
    """

    sdk_module, client_class = "openai", "AsyncOpenAI"

    def __init__(self, *, logprobs: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logprobs = logprobs

    async def _request(self, client: Any, pair: Pair) -> Reply:
        body: Dict[str, Any] = {
            "model": self.model_name,
            "messages": self.rubric.messages(
                pair.prompt, pair.response_a, pair.response_b, self.answer_instruction()
            ),
            "max_completion_tokens": self.max_output_tokens,
            "seed": self.seed,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=5)
        if self.structured == "choice":
            body["structured_outputs"] = {"choice": ["A", "B"]}
        elif self.structured == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA},
            }
        resp = await _post(
            client, "/chat/completions", self.sdk.types.chat.ChatCompletion, body, self.timeout_s
        )
        choice = resp.choices[0]
        usage = resp.usage
        return Reply(
            text=choice.message.content or "",
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            prob_a_tokens=choice.logprobs.content if choice.logprobs and choice.logprobs.content else None,
            truncated=choice.finish_reason == "length",
        )


class AnthropicJudge(APIJudge):
    """The Anthropic Messages API. The rubric's system message goes in `system=`; `structured` is
    `json_schema` (structured outputs via `output_config`) or `none` (a strictly parsed letter).
    The Messages API returns no log-probabilities, so `prob_a` is None."""

    sdk_module, client_class = "anthropic", "AsyncAnthropic"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.temperature is not None:
            raise ConfigError(
                "judge.temperature: the Anthropic Messages API takes no sampling temperature; set judge.temperature=null"
            )
        if self.structured == "choice":
            raise ConfigError(
                "judge.structured=choice is a vLLM extension; the Anthropic judge takes json_schema or none"
            )

    async def _request(self, client: Any, pair: Pair) -> Reply:
        system, user = self.rubric.messages(
            pair.prompt, pair.response_a, pair.response_b, self.answer_instruction()
        )
        body: Dict[str, Any] = {
            "model": self.model_name,
            "system": system["content"],
            "messages": [user],
            "max_tokens": self.max_output_tokens,
        }
        if self.structured == "json_schema":
            body["output_config"] = {"format": {"type": "json_schema", "schema": VERDICT_SCHEMA}}
        resp = await _post(client, "/v1/messages", self.sdk.types.Message, body, self.timeout_s)
        return Reply(
            text="".join(block.text for block in resp.content if block.type == "text"),
            input_tokens=resp.usage.input_tokens,
            output_tokens=resp.usage.output_tokens,
            truncated=resp.stop_reason == "max_tokens",
        )


async def _post(client: Any, path: str, cast_to: type, body: Dict[str, Any], timeout_s: float) -> Any:
    """POST through the official client's generic `post` (its auth, base URL, error classes and
    response models) rather than the typed `create`, which walks the TypedDict annotations of every
    parameter on each call. Our body is plain JSON already. With the aiohttp transport this takes
    the client from 4-5 ms to 1.3-1.7 ms of CPU per request on a 2-core machine: at 64 requests in
    flight and 200 ms latency (320 requests/s) that is the difference between fitting and not."""
    return await client.post(path, cast_to=cast_to, body=body, options={"timeout": timeout_s})


def _shown(url: Any) -> str:
    """An endpoint (or a list of them) as it may be shown or saved: secrets in URLs redacted."""
    if isinstance(url, str):
        return redact_url(url)
    if isinstance(url, Sequence):
        return "[" + ", ".join(_shown(u) for u in url) + "]"
    return repr(url)


def _check_url(url: Optional[str], key: str) -> None:
    """With the config, not when a request first goes there: an http(s) URL with a host, or null."""
    if url is None:
        return
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
    except ValueError:  # e.g. an unclosed [ in the host
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}={_shown(url)} is not an http(s) URL with a host; write it as http://HOST:PORT/v1 (or https://...)")


def _read_key(env: Optional[str]) -> str:
    """The key from the named environment variable, checked before any request (None: a local
    server without auth)."""
    if env is None:
        return "EMPTY"
    key = os.environ.get(env)
    if not key:
        raise ConfigError(
            f"judge.api_key_env: environment variable {env} is not set; export {env}=<your key> "
            "(keys are read from the environment only, never from a config), or set judge.api_key_env=null "
            "for a local server without auth"
        )
    return key


def _describe(e: Exception) -> str:
    """One line for an SDK error: its kind and status, never request headers."""
    status = getattr(e, "status_code", None)
    message = str(e).splitlines()[0] if str(e) else ""
    cause = _root_cause(e)
    if cause is not e and status is None:  # connection errors: the socket-level reason
        message += f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    return (
        f"{type(e).__name__}"
        + (f" (HTTP {status})" if status else "")
        + (f": {message[:200]}" if message else "")
    )


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
