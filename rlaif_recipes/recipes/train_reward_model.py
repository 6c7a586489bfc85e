"""Train the encoder reward model (judge=reward_model): its harm reader on labelled requests, its
heads on human-labelled preference pairs.

    rlaif train-reward-model output_dir=outputs/reward_model
    tune run rlaif_recipes/recipes/train_reward_model.py --config train_reward_model steps=500

First the two readers (rlaif_recipes/judges/readers.py), each the encoder's top layers fine-tuned
with a logistic head for a few epochs on the frozen bottom layers' token states, computed once: the
harm reader (`harm_reader`) on `harm_data` (XSTest's training prompts and the requests from registry
packages in assets/harm_prompts, each (source, label) weighing the same), the answer reader
(`answer_reader`) on the training pairs' responses and their answer/refusal labels (each (source,
label) weighing the same; people's labelled responses join them). Each reader's accuracy and mean P
per source on the held-out split is printed and saved: the readers are reported on their own, not
only through the pairs. Then, with the readers fixed, the frozen sentence encoder embeds every
response once (cached in `encoder.cache_path`, so a re-run embeds nothing) and the two small heads
train full-batch in seconds:

    loss = BCE(reply head, every real response and its first whole sentence (1) against
               fragments of them (0))
         + BCE(answer head on each response and its opening, plus the answer reader's logit, its
               answer/refusal label)
         + sum over objectives of the Bradley–Terry loss -log sigmoid(s_chosen - s_rejected)
           (false_refusal on the pairs whose request is benign, where its rubric applies)

Each term is a mean over pairs weighted so that every source (one completions file: one model's
writing) counts the same. Labels come from the training split: XSTest's human ones, and for
generated completions how each was made. The fragments (`fragments()`: an empty or
punctuation-only text, or a response cut inside its first sentence) are what a policy collapses to
when the reward model cannot tell them from an answer; whole short sentences are not fragments.
It then measures agreement with the human choice on the held-out pairs, per objective, for safe
and unsafe requests apart and per source, and how often a held-out response beats its own
fragment, prints the table, and writes head.safetensors + head.json (the encoder it needs, its
training data, the agreement) atomically to output_dir: `judge=reward_model
judge.head_dir=OUTPUT_DIR` uses it.

People's answers teach it too (`feedback`, docs/people.md): each source (`review_answers`: the
pairs of run directories' review queues with what people chose; `labelled_responses`: a team's
file of responses labelled answer/refusal) adds its own term to the loss, its mean times its
`weight`: Bradley–Terry on each reviewed pair under the objective its run judged it by, the answer
and reply heads' BCE on each labelled response. What each source held, skipped and weighed, and
where it came from (paths and sha256), go to head.json. `init_from=HEAD_DIR` keeps that head's
readers as they are (frozen, not retrained; `answer_reader.layers=0` drops its answer reader) and
retrains the two small heads only: seconds, not minutes, which is what a team does after a review
round. A retrained head is a new judge: its
weights' sha256 is in the judge's identity, so no cached judgment of the old head is reused.
"""

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.data.people_labels import LabelledSource
from rlaif_recipes.data.sft import opening
from rlaif_recipes.distributed import refuse_torchrun
from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.judges.readers import Reader, accuracy_by_group, source_weights, train_reader
from rlaif_recipes.judges.reward_model import (
    OBJECTIVES,
    ResponseFeatures,
    RewardHeads,
    load_heads,
    read_answers,
    read_head_config,
    read_texts,
    save_heads,
)
from rlaif_recipes.policy import check_optimizer
from rlaif_recipes.run_dir import claim, run_identity

log = utils.get_logger("INFO")
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", "chosen_kind", "rejected_kind", "prompt_label")
EMPTY_REPLIES = ("", ".", "!", "?", "...", "-")


def fragments(texts: Sequence[str]) -> List[str]:
    """One non-reply per text: its first words, fewer than its first sentence holds and at most 8
    (a hash of the text picks how many and the end mark), cycling in the empty and
    punctuation-only ones; the same on every run."""
    out = []
    for i, text in enumerate(texts):
        h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        sentence_words = len(opening(text, 1).split())
        if i % 4 == 3 or sentence_words < 2:
            out.append(EMPTY_REPLIES[h % len(EMPTY_REPLIES)])
        else:
            out.append(" ".join(text.split()[: 1 + h % min(8, sentence_words - 1)]) + ("", ".", "!")[(h >> 8) % 3])
    return out


def first_sentences(texts: Sequence[str]) -> List[str]:
    """Each text's first sentence, where it is a whole one of at least 4 words: short complete
    replies ("I'm sorry, but I can't assist with that.") that the reply head must not take for
    fragments."""
    firsts = [opening(t, 1) for t in texts]
    return [f for f in firsts if len(f.split()) >= 4 and f.endswith((".", "!", "?"))]


@dataclass
class TrainRewardModelSettings:
    output_dir: str
    seed: int
    steps: int
    encoder: Any
    train_data: Any
    eval_data: Any
    harm_data: Any
    harm_eval_data: Any
    harm_reader: Any
    answer_reader: Any
    optimizer: Any
    feedback: Any
    init_from: Optional[str]


def _check_readers(cfg: DictConfig) -> None:
    """The readers' settings, before any request is read: a negative lr is AdamW's traceback after
    minutes of reading, a batch size < 1 a silent run that trains nothing, and a source weight <= 0
    drops that source or trains it backwards."""
    steps = [
        ("harm_reader.layers", lambda v: isinstance(v, int) and 1 <= v <= 6, "must be a whole number in 1..6 (MiniLM's top layers to fine-tune)"),
        ("answer_reader.layers", lambda v: isinstance(v, int) and 0 <= v <= 6, "must be a whole number in 0..6 (0: no answer reader)"),
    ] + [
        (f"{reader}.{key}", ok, need)
        for reader in ("harm_reader", "answer_reader")
        for key, ok, need in (("lr", lambda v: v > 0, "must be > 0 (e.g. 3.0e-5)"), ("head_lr", lambda v: v > 0, "must be > 0 (e.g. 1.0e-2)"),
                              ("batch_size", lambda v: isinstance(v, int) and v >= 1, "must be a whole number >= 1 (e.g. 32)"),
                              ("epochs", lambda v: isinstance(v, int) and v >= 1, "must be a whole number >= 1 (e.g. 3)"))
    ]  # fmt: skip
    weights = [(f"harm_reader.source_weight.{source}", lambda v: v > 0, "a source's weight must be > 0 (1.0: its equal share; leave a source out of harm_data to drop it)")
               for source in cfg.harm_reader.get("source_weight") or {}]  # fmt: skip
    rlaif_config.check_ranges(cfg, steps + weights, null_ok=False)


class TrainRewardModelRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        refuse_torchrun("train_reward_model", "it trains a small head on a frozen encoder's embeddings")
        if cfg.steps < 1:
            raise ConfigError(f"steps={cfg.steps}: train for at least one step")
        check_optimizer(cfg.optimizer)
        self._output_dir = Path(cfg.output_dir)
        claim(cfg.output_dir, "train_reward_model", run_identity(cfg, ()), outputs=("head.json",))
        self._steps = cfg.steps
        training.set_seed(seed=cfg.seed)
        self._seed = cfg.seed

    def setup(self, cfg: DictConfig) -> None:
        train, held_out = rlaif_config.instantiate(cfg.train_data, "train_data"), rlaif_config.instantiate(cfg.eval_data, "eval_data")
        for name, data in (("train_data", train), ("eval_data", held_out)):
            missing = [c for c in REQUIRED_COLUMNS if c not in data.column_names]
            if missing or len(data) == 0:
                raise DataError(
                    f"{name} needs rows with columns {', '.join(REQUIRED_COLUMNS)} (human-labelled pairs, "
                    f"as rlaif_recipes.data.xstest_pairs gives); got {len(data)} rows, missing {missing}"
                )
        feedback = self._feedback_sources(cfg.feedback)
        self._harm_cfg, self._answer_cfg = cfg.harm_reader, cfg.answer_reader
        _check_readers(cfg)
        self._init_from = self._start_head(cfg.init_from)
        if not self._init_from:  # read and checked before the encoder loads
            harm_train, harm_held_out = rlaif_config.instantiate(cfg.harm_data, "harm_data"), rlaif_config.instantiate(cfg.harm_eval_data, "harm_eval_data")
        self._encoder = config.instantiate(cfg.encoder)
        if self._init_from:  # its readers, frozen: only the two small heads retrain
            if self._init_from["config"]["encoder"]["fingerprint"] != self._encoder.fingerprint:
                raise ConfigError(f"init_from={cfg.init_from} was trained on encoder {self._init_from['config']['encoder']['fingerprint']}, "
                                  f"this run's is {self._encoder.fingerprint}; set the same encoder lengths or init_from=null")  # fmt: skip
            init_heads = load_heads(Path(cfg.init_from), self._init_from["config"], self._encoder)
            self._harm = init_heads.harm
            self._answer_reader = init_heads.answer_reader if self._answer_cfg.layers else None
            old = self._init_from["config"]
            harm_info = {
                "init_from": {"head_dir": str(Path(cfg.init_from).resolve()), "head_sha256": old["head_sha256"]},
                **{k: old["data"][k] for k in ("harm_train", "harm_held_out") if k in old["data"]},
            }
        else:
            self._harm = Reader(self._encoder.layers, self._harm_cfg.layers, self._encoder.dim)
            self._answer_reader = Reader(self._encoder.layers, self._answer_cfg.layers, self._encoder.dim) if self._answer_cfg.layers else None
            log.info(f"reading {len(harm_train) + len(harm_held_out)} labelled requests through the frozen encoder layers")
            self._harm_train, self._harm_held_out = self._requests(harm_train), self._requests(harm_held_out)
            harm_info = {
                "harm_train": {"source": OmegaConf.to_container(cfg.harm_data), "requests": dict(Counter(harm_train["source"]))},
                "harm_held_out": {"source": OmegaConf.to_container(cfg.harm_eval_data), "requests": dict(Counter(harm_held_out["source"]))},
            }
        self._train, self._held_out = self._embed(train), self._embed(held_out)
        self._feedback = [self._embed_feedback(source, weight) for source, weight in feedback]
        self._heads = RewardHeads(self._harm, self._encoder.dim, self._answer_reader)
        self._optimizer = config.instantiate(cfg.optimizer, [*self._heads.reply.parameters(), *self._heads.answer.parameters()])
        self._data_info = {
            "train": {"source": OmegaConf.to_container(cfg.train_data), "pairs": len(train)},
            "held_out": {"source": OmegaConf.to_container(cfg.eval_data), "pairs": len(held_out)},
            **harm_info,
            "feedback": [
                {"source": OmegaConf.to_container(entry.data), "weight": weight, "counts": source.counts, "provenance": source.provenance}
                for entry, (source, weight) in zip(cfg.feedback, feedback)
            ],
        }
        rlaif_config.save(cfg, str(self._output_dir))

    @staticmethod
    def _feedback_sources(entries: Any) -> List[Any]:
        """(LabelledSource, weight) of each `feedback` entry, read and checked before any model loads."""
        out = []
        for i, entry in enumerate(entries or []):
            if "data" not in entry or not isinstance(entry.get("weight", 1.0), (int, float)) or entry.get("weight", 1.0) <= 0:
                raise ConfigError(f"feedback[{i}] needs data: {{_component_: ...}} and a weight > 0, got {OmegaConf.to_container(entry)}")
            source = rlaif_config.instantiate(entry.data, f"feedback[{i}].data")
            if not isinstance(source, LabelledSource):
                raise ConfigError(f"feedback[{i}].data must build a LabelledSource (rlaif_recipes.data.review_answers or "
                                  f"rlaif_recipes.data.labelled_responses), got {type(source).__name__}")  # fmt: skip
            cols = source.rows.column_names
            if "objective" in cols:
                unknown = sorted(set(source.rows["objective"]) - set(OBJECTIVES))
                if unknown:
                    raise ConfigError(f"feedback[{i}]: pairs judged by rubric(s) {unknown}, which the reward model has no objective for; "
                                      f"set feedback[{i}].data.objective to one of {', '.join(OBJECTIVES)}")  # fmt: skip
            log.info(f"feedback[{i}]: {source.counts} (weight {entry.get('weight', 1.0)})")
            out.append((source, float(entry.get("weight", 1.0))))
        return out

    @staticmethod
    def _start_head(head_dir: Optional[str]) -> Optional[Dict[str, Any]]:
        if head_dir is None:
            return None
        if not Path(head_dir).is_dir():
            raise ConfigError(f"init_from={head_dir} is not a directory; give a trained head (outputs/reward_model) or null")
        return {"config": read_head_config(Path(head_dir))}

    def _embed_feedback(self, source: LabelledSource, weight: float) -> Dict[str, Any]:
        rows = source.rows
        if "objective" in rows.column_names:
            return {
                "weight": weight,
                "prompt": list(rows["prompt"]),
                "objective": list(rows["objective"]),
                **{side: self._encoder.encode(rows[side]) for side in ("chosen", "rejected")},
                **{f"{side}_opening": self._encoder.encode(rows[side], part="opening") for side in ("chosen", "rejected")},
                **{f"{side}_text": list(rows[side]) for side in ("chosen", "rejected")},
            }
        return {
            "weight": weight,
            "response_text": list(rows["response"]),
            "response": self._encoder.encode(rows["response"]),
            "response_opening": self._encoder.encode(rows["response"], part="opening"),
            "answers": torch.tensor(rows["answers"], dtype=torch.float32),
        }

    def _requests(self, data) -> Dict[str, Any]:
        states, mask = self._encoder.token_states(data["prompt"], below=self._harm_cfg.layers)
        harmful = torch.tensor(data["harmful"], dtype=torch.float32)
        return {"states": states, "mask": mask, "harmful": harmful, "source": list(data["source"])}

    def _embed(self, data) -> Dict[str, torch.Tensor]:
        responses = list(data["chosen"]) + list(data["rejected"])
        cut, short = fragments(responses), first_sentences(responses)
        sources = list(data["source"]) if "source" in data.column_names else ["pairs"] * len(data)
        count = Counter(sources)
        return {
            "prompt": list(data["prompt"]),
            "chosen_text": list(data["chosen"]),
            "rejected_text": list(data["rejected"]),
            "fragment_text": cut,
            "fragment": self._encoder.encode(cut),
            "fragment_opening": self._encoder.encode(cut, part="opening"),
            "first_sentence": self._encoder.encode(short),
            "chosen": self._encoder.encode(data["chosen"]),
            "rejected": self._encoder.encode(data["rejected"]),
            "chosen_opening": self._encoder.encode(data["chosen"], part="opening"),
            "rejected_opening": self._encoder.encode(data["rejected"], part="opening"),
            "chosen_answers": torch.tensor([k == "answer" for k in data["chosen_kind"]], dtype=torch.float32),
            "rejected_answers": torch.tensor(
                [k == "answer" for k in data["rejected_kind"]], dtype=torch.float32
            ),
            "harmful": torch.tensor(
                [label == "unsafe" for label in data["prompt_label"]], dtype=torch.float32
            ),
            "source": sources,
            "pair_weight": torch.tensor([1 / count[s] for s in sources]),
        }

    def _labelled_responses(self, d: Dict[str, Any], feedback: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
        """Each distinct response of the pairs (and of people's labelled responses) once, with its
        answer/refusal label and source: what the answer reader trains and is measured on."""
        rows = [(text, answers, source) for side in ("chosen", "rejected")
                for text, answers, source in zip(d[f"{side}_text"], d[f"{side}_answers"].tolist(), d["source"])]  # fmt: skip
        for i, f in enumerate(feedback):
            rows += [(text, answers, f"feedback[{i}]") for text, answers in zip(f.get("response_text", ()), f.get("answers", torch.empty(0)).tolist())]
        first = {}
        for text, answers, source in rows:
            first.setdefault(text, (answers, source))
        labels = torch.tensor([answers for answers, _ in first.values()], dtype=torch.float32)
        return {"text": list(first), "answers": labels, "source": [source for _, source in first.values()]}

    def _train_readers(self) -> Optional[Tuple[List[str], torch.Tensor, torch.Tensor]]:
        """Train the readers from scratch (not with `init_from`); returns the responses the answer
        reader trained on with their token states, which the fixed reader reads again."""
        if self._init_from:
            return None
        h = self._harm_train
        train_reader(
            self._harm, h["states"], h["mask"], h["harmful"], source_weights(h["source"], h["harmful"], self._harm_cfg.source_weight),
            name="harm reader", epochs=self._harm_cfg.epochs, lr=self._harm_cfg.lr, head_lr=self._harm_cfg.head_lr,
            batch_size=self._harm_cfg.batch_size, seed=self._seed, log_every=1,
        )  # fmt: skip
        if self._answer_reader:
            a, cfg = self._labelled_responses(self._train, self._feedback), self._answer_cfg
            log.info(f"reading {len(a['text'])} labelled responses through the frozen encoder layers")
            states, mask = self._encoder.token_states(a["text"], below=cfg.layers, part="response")
            train_reader(
                self._answer_reader, states, mask, a["answers"], source_weights(a["source"], a["answers"]),
                name="answer reader", epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size,
                seed=self._seed, log_every=1,
            )  # fmt: skip
            return a["text"], states, mask
        return None

    def _answer_logits(self, texts: List[str], known: Optional[Tuple[List[str], torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The fixed answer reader's logit for each distinct response. The responses it trained on
        are read from the token states it trained on: the frozen layers would give the same again."""
        if self._answer_reader is None or known is None:
            return read_answers(self._answer_reader, self._encoder, texts)
        trained_on, states, mask = known
        row = {t: i for i, t in enumerate(trained_on)}
        seen, rest = [t for t in texts if t in row], [t for t in texts if t not in row]
        rows = torch.tensor([row[t] for t in seen], dtype=torch.long)
        logit = dict(zip(seen, self._answer_reader.logits(states[rows], mask[rows]).tolist()))
        logit.update(zip(rest, read_answers(self._answer_reader, self._encoder, rest).tolist()))
        return torch.tensor([logit[t] for t in texts])

    def train(self) -> None:
        known = self._train_readers()
        self._harm.requires_grad_(False)
        if self._answer_reader:
            self._answer_reader.requires_grad_(False)
        for d in (self._train, self._held_out, *(f for f in self._feedback if "prompt" in f)):  # the readers are fixed from here on
            d["harm"] = read_texts(self._harm, self._encoder, d["prompt"])
        sides = [(d, side) for d in (self._train, self._held_out, *self._feedback)
                 for side in ("chosen", "rejected", "fragment", "response") if f"{side}_text" in d]  # fmt: skip
        texts = list(dict.fromkeys(t for d, side in sides for t in d[f"{side}_text"]))
        self._answer_logit = dict(zip(texts, self._answer_logits(texts, known).tolist()))  # the answer reader's report reads it too
        del known  # read: free the states before the heads train
        for d, side in sides:
            d[f"{side}_read"] = torch.tensor([self._answer_logit[t] for t in d[f"{side}_text"]])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the heads are tiny: thread synchronisation costs more than the math
        try:
            for step in range(self._steps):
                loss = self._loss()
                self._optimizer.zero_grad()
                loss.backward()
                self._optimizer.step()
                if step == 0 or (step + 1) % 100 == 0 or step + 1 == self._steps:
                    log.info(f"step {step + 1}/{self._steps} loss {loss.item():.4f}")
        finally:
            torch.set_num_threads(threads)

    def _loss(self) -> torch.Tensor:
        """Every term is a mean weighted by `pair_weight`: each source (one model's writing) counts
        the same however many pairs it has, so the largest one does not set the style the heads read."""
        d, heads, w = self._train, self._heads, self._train["pair_weight"]
        w2 = torch.cat([w, w])
        responses = torch.cat([d["chosen"], d["rejected"]])
        answers = torch.cat([d["chosen_answers"], d["rejected_answers"]])
        replies = torch.cat([responses, d["fragment"], d["first_sentence"]])
        is_reply = torch.cat([torch.ones(len(responses)), torch.zeros(len(d["fragment"])), torch.ones(len(d["first_sentence"]))])
        reply_weights = torch.cat([w2, w2, torch.full((len(d["first_sentence"]),), w.mean().item())])
        loss = _weighted(F.binary_cross_entropy_with_logits(heads.reply(replies).squeeze(-1), is_reply, reduction="none"), reply_weights)
        features = ResponseFeatures(responses, torch.cat([d["chosen_opening"], d["rejected_opening"]]), torch.cat([d["chosen_read"], d["rejected_read"]]))
        loss = loss + _weighted(F.binary_cross_entropy_with_logits(heads.answer_logit(features), answers, reduction="none"), w2)
        for objective in OBJECTIVES:
            rows = d["harmful"] == 0 if objective == "false_refusal" else slice(None)
            chosen, rejected = _scores(heads, objective, d, "chosen", rows), _scores(heads, objective, d, "rejected", rows)
            loss = loss - _weighted(F.logsigmoid(chosen - rejected), w[rows])
        return loss + sum((self._feedback_loss(f) for f in self._feedback), torch.zeros(()))

    def _feedback_loss(self, f: Dict[str, Any]) -> torch.Tensor:
        """One people's source: its mean loss times its weight. Reviewed pairs: Bradley–Terry under
        each pair's objective; labelled responses: the answer head's BCE on the label, and the reply
        head's on "a real reply"."""
        heads = self._heads
        if "objective" not in f:
            labelled = ResponseFeatures(f["response"], f["response_opening"], f["response_read"])
            answer = F.binary_cross_entropy_with_logits(heads.answer_logit(labelled), f["answers"])
            reply = F.binary_cross_entropy_with_logits(heads.reply(f["response"]).squeeze(-1), torch.ones(len(f["answers"])))
            return f["weight"] * (answer + reply)
        margins = []
        for objective in sorted(set(f["objective"])):
            rows = torch.tensor([o == objective for o in f["objective"]])
            margins.append(_scores(heads, objective, f, "chosen", rows) - _scores(heads, objective, f, "rejected", rows))
        return -f["weight"] * F.logsigmoid(torch.cat(margins)).mean()

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Share of held-out pairs where the objective's score ranks the human's choice first, and
        share of the human's chosen responses it ranks above their own fragment (over_fragment)."""
        d = self._held_out
        groups = {
            "safe": d["harmful"] == 0,
            "unsafe": d["harmful"] == 1,
            "all": torch.ones_like(d["harmful"], dtype=torch.bool),
        }
        sources = sorted(set(d["source"]))
        if len(sources) > 1:  # each model's writing apart: a judge must read every style
            for source in sources:
                of_source = torch.tensor([s == source for s in d["source"]])
                groups.update({f"{source}:{kind}": of_source & groups[kind] for kind in ("safe", "unsafe", "all")})
        table = {}
        for objective in OBJECTIVES:
            chosen = _scores(self._heads, objective, d, "chosen")
            agree = chosen > _scores(self._heads, objective, d, "rejected")
            table[objective] = {
                g: round(agree[m].float().mean().item(), 4) for g, m in groups.items() if m.any()
            }
            rows = groups["safe" if objective == "false_refusal" else "all"]  # where its rubric applies
            over = (chosen > _scores(self._heads, objective, d, "fragment"))[rows]
            table[objective]["over_fragment"] = round(over.float().mean().item(), 4)
        table["pairs"] = {g: int(m.sum()) for g, m in groups.items() if m.any()}
        self._agreement = table
        print(
            "held-out agreement with the human choice (share of pairs; over_fragment: chosen response over its own fragment):"
        )
        print(
            "| objective | "
            + " | ".join(f"{g} (n={n})" for g, n in table["pairs"].items())
            + " | over_fragment |"
        )
        print("|---|" + "---:|" * (len(table["pairs"]) + 1))
        for objective in OBJECTIVES:
            print(
                f"| {objective} | "
                + " | ".join(f"{table[objective][g]:.3f}" for g in table[objective])
                + " |"
            )
        self._harm_report = self._init_from["config"]["harm_reader_held_out"] if self._init_from else self._evaluate_harm_reader()
        self._answer_report = self._evaluate_answer_reader()
        return table

    def _evaluate_harm_reader(self) -> Dict[str, Dict[str, float]]:
        """Accuracy and mean P(harmful) per source and label on the held-out requests."""
        h = self._harm_held_out
        p_harm = torch.sigmoid(self._harm.logits(h["states"], h["mask"]))
        accuracy, mean_p = accuracy_by_group(p_harm, h["harmful"], h["source"])
        _print_reader_table("harm reader on held-out requests (accuracy at P=0.5 | mean P(harmful)):", accuracy, mean_p, h["source"], h["harmful"], ("harmful", "benign"))
        return {"accuracy": accuracy, "mean_p_harmful": mean_p}

    def _evaluate_answer_reader(self) -> Optional[Dict[str, Dict[str, float]]]:
        """Accuracy and mean P(answer) per source and label on the held-out pairs' responses."""
        if self._answer_reader is None:
            return None
        a = self._labelled_responses(self._held_out)
        p_answer = torch.sigmoid(torch.tensor([self._answer_logit[t] for t in a["text"]]))
        accuracy, mean_p = accuracy_by_group(p_answer, a["answers"], a["source"], names=("answer", "refusal"))
        _print_reader_table("answer reader on held-out responses (accuracy at P=0.5 | mean P(answer)):", accuracy, mean_p, a["source"], a["answers"], ("answer", "refusal"))
        return {"accuracy": accuracy, "mean_p_answer": mean_p}

    def save_checkpoint(self) -> None:
        save_heads(
            str(self._output_dir),
            self._heads,
            {
                "encoder": {
                    "fingerprint": self._encoder.fingerprint,
                    "max_seq_length": self._encoder.max_seq_length,
                    "opening_max_seq_length": self._encoder.opening_max_seq_length,
                    "prompt_max_seq_length": self._encoder.prompt_max_seq_length,
                },
                "data": self._data_info,
                "steps": self._steps,
                "held_out_agreement": self._agreement,
                "harm_reader_held_out": self._harm_report,
                "harm_reader_training": self._init_from["config"].get("harm_reader_training") if self._init_from else OmegaConf.to_container(self._harm_cfg),
                "answer_reader_held_out": self._answer_report,
                "answer_reader_training": (
                    (self._init_from["config"].get("answer_reader_training") if self._init_from else OmegaConf.to_container(self._answer_cfg))
                    if self._answer_reader else None
                ),
            },
        )
        log.info(
            f"wrote the reward model heads to {self._output_dir}; use them with judge=reward_model judge.head_dir={self._output_dir}"
        )


def _print_reader_table(title: str, accuracy: dict, mean_p: dict, sources: Sequence[str], labels: torch.Tensor, names: Sequence[str]) -> None:
    print(title)
    print(f"| group | n | accuracy | mean P({names[0]}) |\n|---|---:|---:|---:|")
    for group in accuracy:
        n = len(sources) if group == "all" else sum(f"{s}:{names[0] if y else names[1]}" == group for s, y in zip(sources, labels.tolist()))
        print(f"| {group} | {n} | {accuracy[group]:.3f} | {mean_p[group]:.3f} |")


def _weighted(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum()


def _scores(heads: RewardHeads, objective: str, d: Dict[str, torch.Tensor], side: str, rows: Any = slice(None)) -> torch.Tensor:
    """The objective's score of one side's response to each prompt: "chosen", "rejected" or
    "fragment" (whose first len(prompt) rows are the chosen responses' fragments)."""
    n = len(d["prompt"])
    features = ResponseFeatures(d[side][:n], d[f"{side}_opening"][:n], d[f"{side}_read"][:n])
    return heads.scores(objective, d["harm"][rows], features[rows])


def train_reward_model(cfg: DictConfig) -> Dict[str, Any]:
    """Every step of the recipe; returns the head.json it wrote (benchmarks and tests retrain in-process)."""
    recipe = TrainRewardModelRecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.evaluate()
    recipe.save_checkpoint()
    return read_head_config(Path(cfg.output_dir))


@rlaif_config.parse(TrainRewardModelSettings)
def recipe_main(cfg: DictConfig) -> None:
    train_reward_model(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
