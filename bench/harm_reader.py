"""The harm reader on requests from sources it never trained on: leave-one-source-out, beside the
in-distribution held-out split and beside the old reader (a linear head on the frozen sentence
embedding), in one run.

For each source S of harm_data: train the reader (conf/train_reward_model.yaml's harm_reader
settings) on the training split of every other source, then read every request of S (for XSTest,
its held-out split: XSTest's training prompts are the contrast set the others lack). "in-dist." is
one reader trained on the training split of every source, read on the held-out split of each.
Accuracy is at P(harmful) = 0.5, per label; mean P says how sure the reader is (calibration).

--smollm2 adds a second kind of reader beside them: SmolLM2-135M-Instruct (the packaged model, frozen)
reads each request in its chat template, and a logistic head on the mean of one layer's hidden
states is fitted on the same training rows ("SmolLM2 probe"); "reader + probe" averages its logit
with the reader's. It asks whether an instruct model's own features carry harm across styles better
than MiniLM's (bench/RESULTS.md, "A second reader").

    python bench/harm_reader.py [--epochs 4] [--max-per-source 300] [--leave-out xstest_prompts overrefusal] [--smollm2] [--out bench/harm_reader.json]
"""

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.data import harm_requests
from rlaif_recipes.judges.readers import Reader, accuracy_by_group, source_weights, train_reader
from rlaif_recipes.judges.reward_model import SentenceEncoder
from rlaif_recipes.models.get_model import get_model

READS = {"reader": "reader", "linear": "linear head", "probe": "SmolLM2 probe", "reader + probe": "reader + probe"}


def reader_settings() -> Dict:
    return dict(rlaif_config.load("train_reward_model", []).harm_reader)


def linear_probe(e_train: torch.Tensor, y_train: torch.Tensor, w_train: torch.Tensor, e_test: torch.Tensor) -> torch.Tensor:
    """The old harm head: logistic regression on the frozen sentence embedding, full batch."""
    torch.manual_seed(0)
    head = torch.nn.Linear(e_train.shape[1], 1)
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(300):
        loss = (F.binary_cross_entropy_with_logits(head(e_train).squeeze(-1), y_train, reduction="none") * w_train).sum() / w_train.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.sigmoid(head(e_test).squeeze(-1))


def fresh_reader(encoder: SentenceEncoder, settings: Dict, states: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor, *, name: str, epochs: int) -> Reader:  # fmt: skip
    """A reader trained as `train-reward-model` trains one (`settings`: its harm_reader or
    answer_reader section), from the same start in every run: its fresh head's init draws from
    torch's global generator, which train_reader's seed does not cover."""
    torch.manual_seed(0)
    reader = Reader(encoder.layers, settings["layers"], encoder.dim)
    train_reader(reader, states, mask, labels, weights, name=name, epochs=epochs, lr=settings["lr"], head_lr=settings["head_lr"],
                 batch_size=settings["batch_size"], seed=0)  # fmt: skip
    return reader


@torch.no_grad()
def smollm2_states(texts: List[str], layer: int, batch_size: int = 32) -> torch.Tensor:
    """Mean over the request's tokens (in SmolLM2's chat template, generation prompt included) of
    hidden layer `layer` of the frozen SmolLM2-135M-Instruct, standardised per feature."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = get_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    features = torch.zeros(len(texts), model.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": texts[i]}], tokenize=False, add_generation_prompt=True) for i in idx]
        batch = tokenizer(chats, return_tensors="pt", padding=True, truncation=True, max_length=256)
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        features[idx] = (hidden * mask).sum(1) / mask.sum(1)
    return (features - features.mean(0)) / features.std(0).clamp(min=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: conf/train_reward_model.yaml's harm_reader.epochs")
    parser.add_argument("--max-per-source", type=int, default=None, help="cap per (source, label) in training, for a quicker run")
    parser.add_argument("--leave-out", nargs="+", default=None, help="the sources to leave out one at a time (default: each)")
    parser.add_argument("--smollm2", action="store_true", help="also the SmolLM2 probe and its mean with the reader")
    parser.add_argument("--smollm2-layer", type=int, default=18, help="which of SmolLM2's 30 hidden layers the probe reads")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    settings = reader_settings()
    epochs = args.epochs or settings["epochs"]
    sources = [rlaif_config.asset_path("xstest/xstest_prompts.csv"), rlaif_config.asset_path("harm_prompts/harm_prompts.csv")]
    everything = harm_requests(sources, split="all")
    names = sorted(set(everything["source"]))
    unknown = sorted(set(args.leave_out or ()) - set(names))
    if unknown:
        parser.error(f"--leave-out {' '.join(unknown)}: no such source; the sources are {', '.join(names)}")
    held = {p for p in harm_requests(sources, split="held_out")["prompt"]}
    encoder = SentenceEncoder()
    start = time.perf_counter()
    states, mask = encoder.token_states(everything["prompt"], below=settings["layers"])
    sentence = encoder.encode(everything["prompt"], part="prompt")
    harmful = torch.tensor(everything["harmful"], dtype=torch.float32)
    source = list(everything["source"])
    is_held = torch.tensor([p in held for p in everything["prompt"]])
    smollm2 = smollm2_states(list(everything["prompt"]), args.smollm2_layer) if args.smollm2 else None

    def train_rows(exclude: str) -> torch.Tensor:
        rows = [i for i, s in enumerate(source) if s != exclude and not is_held[i]]
        if args.max_per_source:
            kept, taken = [], {}
            for i in rows:
                key = (source[i], int(harmful[i]))
                if taken.get(key, 0) < args.max_per_source:
                    taken[key] = taken.get(key, 0) + 1
                    kept.append(i)
            rows = kept
        return torch.tensor(rows)

    def fit_and_read(train: torch.Tensor, test: torch.Tensor) -> Dict[str, torch.Tensor]:
        weights = source_weights([source[i] for i in train.tolist()], harmful[train], settings.get("source_weight"))
        reader = fresh_reader(encoder, settings, states[train], mask[train], harmful[train], weights, name="harm reader", epochs=epochs)
        read = {
            "reader": torch.sigmoid(reader.logits(states[test], mask[test])),
            "linear": linear_probe(sentence[train], harmful[train], weights, sentence[test]),
        }
        if smollm2 is not None:
            read["probe"] = linear_probe(smollm2[train], harmful[train], weights, smollm2[test])
            read["reader + probe"] = torch.sigmoid((torch.logit(read["reader"], eps=1e-6) + torch.logit(read["probe"], eps=1e-6)) / 2)
        return read

    rows: List[Dict] = []
    in_dist_test = torch.nonzero(is_held).squeeze(-1)
    in_dist = fit_and_read(train_rows(exclude=""), in_dist_test)
    in_dist_acc = {k: accuracy_by_group(p, harmful[in_dist_test], [source[i] for i in in_dist_test.tolist()]) for k, p in in_dist.items()}
    for name in args.leave_out or names:
        test = torch.tensor([i for i, s in enumerate(source) if s == name and (name != "xstest_prompts" or is_held[i])])
        out = fit_and_read(train_rows(exclude=name), test)
        for label, value in (("harmful", 1.0), ("benign", 0.0)):
            members = harmful[test] == value
            if not members.any():
                continue
            group = f"{name}:{label}"
            row = {"held-out source": group, "n": int(members.sum())}
            for kind, p in out.items():
                row[f"{READS[kind]}, left out"] = (p[members] >= 0.5).eq(value == 1.0).float().mean().item()
                if kind == "reader":
                    row["mean P(harmful), left out"] = p[members].mean().item()
            for kind in out:
                row[f"{READS[kind]}, in-dist."] = in_dist_acc[kind][0].get(group)
            rows.append(row)
        print(f"... {name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    header = list(rows[0])
    print(f"harm reader, leave-one-source-out ({settings['layers']} fine-tuned layers, {epochs} epochs"
          f"{f', at most {args.max_per_source} per source and label' if args.max_per_source else ''}); "
          f"{platform.node()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s")  # fmt: skip
    print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"epochs": epochs, "max_per_source": args.max_per_source, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
