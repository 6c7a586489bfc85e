"""The PairwiseJudge interface: which of two responses to a prompt is better, or an explicit abstain.

Every judge returns one `Judgment` per pair: verdict A, B, tie or abstain (with a reason), the
probability that A is preferred where the judge can give one, an optional rationale, and its
provenance. A failed judgment is an abstain, never a silent label.

Position bias: with `order=both` each pair is judged as (A, B) and as (B, A); the two verdicts are
combined, and when they disagree the pair becomes a tie with `orders_agree=False` (counted in
`metrics["order_disagreements"]`). If either order abstains the pair abstains: a one-sided verdict
is exactly what `order=both` is there to avoid. `order=random` shows one order picked per pair by a
seeded hash, `order=fixed` shows (A, B). Judges that score each response on its own
(`symmetric = True`) and composites whose member judges handle the order themselves
(`delegates_order = True`) are asked once per pair whatever the order.

Subclasses implement `_compare` for pairs in the order shown. Results go through the optional
SQLite cache (`cache_path`) one at a time, as they arrive, keyed by `identity()`: the class, the
rubric and every constructor argument, recorded from the call that built the judge, except
secrets, the class's RUNTIME_SETTINGS and its COMBINE_SETTINGS (`order` and `tie_margin`, which act
on top of cached judgments). A new judge's settings are therefore in its cache key without any
code of its own; a subclass adds only facts its arguments do not pin down (which weights).

Counters: `metrics` holds everything a judge counted over its life. `judge_with_usage(pairs)` also
returns what that one call counted, which stays right when several calls run at once on threads
(the online loop judging several steps ahead): every count goes through `count()`, which adds to
`metrics` and to the counter of the call it is part of (a context variable, so it follows the call
into the API judges' event loop).
"""

import abc
import contextvars
import functools
import hashlib
import inspect
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from rlaif_recipes.errors import ConfigError
from rlaif_recipes.judges.cache import JudgmentCache, cache_key
from rlaif_recipes.judges.rubric import Rubric
from rlaif_recipes.redact import SECRET_KEY

ORDERS = ("both", "random", "fixed")
# the counter of the `judge_with_usage` call running in this context (None outside one)
CALL_USAGE: contextvars.ContextVar[Optional[Counter]] = contextvars.ContextVar("judge_call_usage", default=None)


class Verdict(str, Enum):
    A = "A"
    B = "B"
    TIE = "tie"
    ABSTAIN = "abstain"


@dataclass(frozen=True)
class Pair:
    prompt: str
    response_a: str
    response_b: str


@dataclass
class Judgment:
    verdict: Verdict
    prob_a: Optional[float] = None  # P(A preferred), where the judge can give one
    rationale: Optional[str] = None
    reason: Optional[str] = None  # why it abstained (or why it is a tie)
    orders_agree: Optional[bool] = None  # order=both: did both orders pick the same winner
    source: str = "ai"  # "ai" or "human"
    judge: str = ""  # provenance: which judge ...
    model: Optional[str] = None  # ... which model behind it ...
    rubric: Optional[str] = None  # ... and which rubric version ("false_refusal@v1")
    usage: Dict[str, float] = field(default_factory=dict)  # requests, tokens, cost_usd spent on it
    # A tie the judge is sure of, and why ("both_right", "both_wrong"): the two replies are alike by
    # the rubric, so the pair teaches nothing and needs no person (the router does not queue it).
    settled: Optional[str] = None

    @property
    def labelled(self) -> bool:
        return self.verdict in (Verdict.A, Verdict.B)

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Judgment":
        return cls(**{**d, "verdict": Verdict(d["verdict"]), "usage": dict(d.get("usage") or {})})

    @classmethod
    def abstain(cls, reason: str, **provenance: Any) -> "Judgment":
        return cls(Verdict.ABSTAIN, reason=reason, **provenance)


def verdict_from_prob(prob_a: float, tie_margin: float = 0.0) -> Verdict:
    if abs(prob_a - 0.5) <= tie_margin:
        return Verdict.TIE
    return Verdict.A if prob_a > 0.5 else Verdict.B


def _records_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a judge's __init__ so that the arguments it was called with (defaults filled in) are
    kept in `self._arguments` for `identity()`. The outermost class runs first, so its values win;
    each parent adds the parameters only it names (defaults a subclass passed on through **kwargs)."""
    signature = inspect.signature(init)
    named = [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]

    @functools.wraps(init)
    def recording_init(self: "PairwiseJudge", *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # let the call itself raise its usual error
            return init(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = self.__dict__.setdefault("_arguments", {})
        for name in named:
            arguments.setdefault(name, bound.arguments[name])
        return init(self, *args, **kwargs)

    return recording_init


class PairwiseJudge(abc.ABC):
    """Order handling, caching and counting; subclasses compare pairs in the order shown."""

    symmetric = False  # True: scores each response alone, so the order shown cannot matter
    delegates_order = False  # True: a composite whose member judges handle the order; asked once per pair
    concurrent_calls = False  # True: several `judge` calls may run at once on threads (no shared engine)
    # constructor arguments that never change a verdict: a run may change them and still continue
    # the same output directory (rlaif_recipes.run_dir), and they are not in the cache key;
    # subclasses add their own
    RUNTIME_SETTINGS: Tuple[str, ...] = ("cache_path",)
    # arguments this class applies around `_compare` (which orders are shown, the tie margin on
    # the combined P(A)): they never change one cached judgment, so changing them reuses the cache.
    # A judge that reads them inside `_compare` sets this to ()
    COMBINE_SETTINGS: Tuple[str, ...] = ("order", "tie_margin")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _records_arguments(cls.__dict__["__init__"])

    @_records_arguments
    def __init__(
        self,
        *,
        rubric: Optional[Mapping[str, Any]] = None,
        order: str = "both",
        seed: int = 0,
        tie_margin: float = 0.0,
        cache_path: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        if order not in ORDERS:
            raise ConfigError(f"judge.order={order!r}: choose one of {', '.join(ORDERS)}")
        if not 0 <= tie_margin < 0.5:
            raise ConfigError(f"judge.tie_margin={tie_margin}: must be in [0, 0.5); it widens 'tie' around P(A)=0.5")
        self.rubric = rubric if isinstance(rubric, Rubric) or rubric is None else Rubric.from_config(rubric)
        self.order = order
        self.seed = seed
        self.tie_margin = tie_margin
        self.name = name or type(self).__name__
        self.cache = JudgmentCache(cache_path) if cache_path else None
        self.metrics: Counter = Counter()
        self._count_lock = threading.Lock()
        self.stopped: Optional[str] = None  # set when a budget ran out: the rest of the pairs abstain

    # ---- what subclasses provide ----------------------------------------------------------

    @abc.abstractmethod
    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        """Judge each pair in the order shown and call `record(i, judgment)` as each one is done
        (a verdict or an abstain, never an exception for one failed pair)."""

    def identity(self) -> Dict[str, Any]:
        """Everything that decides a verdict, for the cache key (never secrets): the class, the
        rubric's id and the constructor's arguments less RUNTIME_SETTINGS and COMBINE_SETTINGS.
        Subclasses add facts the arguments do not pin down (which weights), never plain settings."""
        skip = {*self.RUNTIME_SETTINGS, *self.COMBINE_SETTINGS}
        settings = {
            k: identity_value(v)
            for k, v in self.__dict__.get("_arguments", {}).items()
            if k not in skip and not SECRET_KEY.search(k)
        }
        return {**settings, "class": _dotted(type(self)), "rubric": self.rubric and self.rubric.id}

    @property
    def model(self) -> Optional[str]:
        return None

    # ---- the public entry ----------------------------------------------------------------

    def judge(self, pairs: Sequence[Pair]) -> List[Judgment]:
        """One judgment per pair, in input order."""
        pairs = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
        shown = [(i, swapped) for i, p in enumerate(pairs) for swapped in self._orders(p)]
        queries = [_orient(pairs[i], swapped) for i, swapped in shown]
        identity = self.identity()
        keys = [cache_key(identity, q.prompt, q.response_a, q.response_b) for q in queries]
        results: Dict[int, Judgment] = {}
        if self.cache is not None:
            hits = self.cache.get_many(keys)
            for j, key in enumerate(keys):
                if key in hits:
                    results[j] = Judgment.from_dict(hits[key])
            self.count("cache_hits", len(results))
        todo = [j for j in range(len(queries)) if j not in results]

        def record(k: int, judgment: Judgment) -> None:
            j = todo[k]
            judgment = self._stamp(judgment)
            results[j] = judgment
            if self.cache is not None and judgment.verdict is not Verdict.ABSTAIN:
                self.cache.put(keys[j], judgment.to_dict())

        if todo:
            self._compare([queries[j] for j in todo], record)
        for j in todo:
            if j not in results:
                results[j] = self._stamp(Judgment.abstain(f"{self.name} returned no judgment"))
        self.count("queries", len(queries))
        by_pair: Dict[int, List[Tuple[bool, Judgment]]] = {}
        for j, (i, swapped) in enumerate(shown):
            by_pair.setdefault(i, []).append((swapped, _unorient(results[j], swapped)))
        out = [self._combine(by_pair[i]) for i in range(len(pairs))]
        self.count("pairs", len(out))
        for j in out:
            self.count(f"verdict_{j.verdict.value}", 1)
        return out

    def judge_with_usage(self, pairs: Sequence[Pair]) -> Tuple[List[Judgment], Counter]:
        """`judge(pairs)` and what this call alone counted (queries, cache hits, requests ...)."""
        usage: Counter = Counter()
        token = CALL_USAGE.set(usage)
        try:
            return self.judge(pairs), usage
        finally:
            CALL_USAGE.reset(token)

    def count(self, key: str, n: float = 1) -> None:
        """Add to `metrics` and to the running `judge_with_usage` call's counter (thread-safe)."""
        call = CALL_USAGE.get()
        with self._count_lock:
            self.metrics[key] += n
            if call is not None:
                call[key] += n

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "PairwiseJudge":
        return self

    def __exit__(self, *exc: Any) -> None:
        """`with judge:` closes it: an API judge's connections and thread, a cache's database."""
        self.close()

    # ---- internals ------------------------------------------------------------------------

    def uncached_queries(self, pairs: Sequence[Pair]) -> List[Pair]:
        """The queries `judge(pairs)` would put to `_compare`: every order shown, less cache hits
        (what a run will pay for, before it pays)."""
        queries = [_orient(p, swapped) for p in pairs for swapped in self._orders(p)]
        if self.cache is None:
            return queries
        identity = self.identity()
        keys = [cache_key(identity, q.prompt, q.response_a, q.response_b) for q in queries]
        hits = self.cache.get_many(keys)
        return [q for q, key in zip(queries, keys) if key not in hits]

    def _orders(self, pair: Pair) -> List[bool]:
        if self.symmetric or self.delegates_order or self.order == "fixed":
            return [False]
        if self.order == "both":
            return [False, True]
        h = hashlib.sha256(f"{self.seed}\x00{pair.prompt}\x00{pair.response_a}\x00{pair.response_b}".encode())
        return [h.digest()[0] % 2 == 1]

    def _stamp(self, judgment: Judgment) -> Judgment:
        judgment.judge = judgment.judge or self.name
        judgment.model = judgment.model or self.model
        judgment.rubric = judgment.rubric or (self.rubric and self.rubric.id)
        return judgment

    def _combine(self, views: List[Tuple[bool, Judgment]]) -> Judgment:
        if len(views) == 1:
            judgment = views[0][1]
        else:
            (_, first), (_, second) = views
            usage = Counter(first.usage) + Counter(second.usage)
            failed = [j for j in (first, second) if j.verdict is Verdict.ABSTAIN]
            if failed:
                return Judgment.abstain(
                    "; ".join(dict.fromkeys(j.reason or "abstained" for j in failed)),
                    judge=first.judge, model=first.model, rubric=first.rubric, usage=dict(usage),
                )
            probs = [j.prob_a for j in (first, second) if j.prob_a is not None]
            agree = first.verdict == second.verdict
            if not agree:
                self.count("order_disagreements", 1)
            judgment = Judgment(
                verdict=first.verdict if agree else Verdict.TIE,
                prob_a=sum(probs) / len(probs) if probs else None,
                rationale=first.rationale,
                reason=None if agree else f"orders disagree: {first.verdict.value} shown first, {second.verdict.value} swapped",
                orders_agree=agree,
                judge=first.judge, model=first.model, rubric=first.rubric, usage=dict(usage),
                settled=first.settled if first.settled == second.settled else None,
            )
        if judgment.labelled and judgment.prob_a is not None and self.tie_margin > 0:
            if verdict_from_prob(judgment.prob_a, self.tie_margin) is Verdict.TIE:
                judgment.verdict, judgment.reason = Verdict.TIE, f"P(A)={judgment.prob_a:.3f} within tie_margin"
        return judgment


def _orient(pair: Pair, swapped: bool) -> Pair:
    return Pair(pair.prompt, pair.response_b, pair.response_a) if swapped else pair


def _unorient(judgment: Judgment, swapped: bool) -> Judgment:
    """A verdict on the swapped pair, expressed for the original order."""
    if not swapped:
        return judgment
    flip = {Verdict.A: Verdict.B, Verdict.B: Verdict.A}
    return Judgment(
        **{
            **judgment.__dict__,
            "verdict": flip.get(judgment.verdict, judgment.verdict),
            "prob_a": None if judgment.prob_a is None else 1.0 - judgment.prob_a,
            "usage": dict(judgment.usage),
        }
    )


def identity_value(value: Any) -> Any:
    """A constructor argument as plain JSON for the cache key: a nested judge by its identity, a
    rubric by its id, a function or class by its dotted name, a callable object by its class and
    state, mappings without secret-named keys."""
    if isinstance(value, PairwiseJudge):
        return value.identity()
    if isinstance(value, Rubric):
        return value.id
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): identity_value(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, Sequence):
        return [identity_value(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):
        # a lambda or a function defined inside another has no importable name: its repr (with its
        # address) keeps it apart from every other callable, at the price of no hits across runs
        named = "<" not in value.__qualname__
        return _dotted(value) if named else repr(value)
    state = getattr(value, "__dict__", None)
    if callable(value) and state:
        return {"_component_": _dotted(type(value)), **identity_value(state)}
    return repr(value)  # e.g. a functools.partial: its repr names the function (at its address)


def _dotted(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"
