"""The answer reader on writing styles it never trained on: leave-one-style-out, beside the linear
answer head (logistic regression on the frozen sentence embeddings of the response and its opening),
in one run.

The training completions come in two styles (conf/train_reward_model.yaml's train_data: Llama-2-chat's
XSTest completions with human labels, SmolLM2's own answers and refusals). For each choice of
training styles (both; each alone), train the answer reader (the `answer_reader` settings) and the
linear head on that training split, then read the held-out split of every style: a style left out
of training is the check on writing the judge has never seen. Accuracy is at P(answer) = 0.5, per
label (a partial refusal counts as a refusal); mean P(answer) says how sure it is.

    PYTHONPATH=. python bench/answer_reader.py [--epochs 4] [--out bench/answer_reader.json]
"""

import argparse
import csv
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import torch

from bench.harm_reader import fresh_reader, linear_probe
from rlaif_recipes import config as rlaif_config
from rlaif_recipes.data.prompts import is_held_out
from rlaif_recipes.judges.readers import source_weights
from rlaif_recipes.judges.reward_model import SentenceEncoder


def completions(cfg) -> List[Dict]:
    """Every non-empty completion of the training files, with its style, label and split."""
    rows = []
    for path in cfg.train_data.completions:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["completion"].strip():
                    rows.append({
                        "style": Path(path).stem, "text": r["completion"], "answers": float(r["final_label"].startswith("1")),
                        "held_out": is_held_out(r["prompt"].strip(), cfg.eval_data.get("held_out_fraction", 0.3)),
                    })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: conf/train_reward_model.yaml's answer_reader.epochs")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    cfg = rlaif_config.load("train_reward_model", [])
    settings = dict(cfg.answer_reader)
    epochs = args.epochs or settings["epochs"]
    rows = completions(cfg)
    styles = sorted({r["style"] for r in rows})
    encoder = SentenceEncoder(max_seq_length=cfg.encoder.max_seq_length, opening_max_seq_length=cfg.encoder.opening_max_seq_length)
    start = time.perf_counter()
    texts = [r["text"] for r in rows]
    states, mask = encoder.token_states(texts, below=settings["layers"], part="response")
    sentence = torch.cat([encoder.encode(texts, part="opening"), encoder.encode(texts)], dim=-1)
    answers = torch.tensor([r["answers"] for r in rows])
    table = []
    for trained_on in [styles] + [[s] for s in styles]:
        train = torch.tensor([i for i, r in enumerate(rows) if not r["held_out"] and r["style"] in trained_on])
        weights = source_weights([rows[i]["style"] for i in train.tolist()], answers[train])
        reader = fresh_reader(encoder, settings, states[train], mask[train], answers[train], weights, name="answer reader", epochs=epochs)
        p = {"reader": torch.sigmoid(reader.logits(states, mask)), "linear head": linear_probe(sentence[train], answers[train], weights, sentence)}
        for style in styles:
            for label, value in (("answer", 1.0), ("refusal", 0.0)):
                members = torch.tensor([r["held_out"] and r["style"] == style and r["answers"] == value for r in rows])
                row = {"trained on": "+".join(trained_on), "held-out group": f"{style}:{label}", "left out": style not in trained_on, "n": int(members.sum())}
                for name, probs in p.items():
                    row[name] = (probs[members] >= 0.5).eq(value == 1.0).float().mean().item()
                    row[f"mean P(answer), {name}"] = probs[members].mean().item()
                table.append(row)
        print(f"... trained on {'+'.join(trained_on)} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"answer reader, leave-one-style-out ({settings['layers']} fine-tuned layers, {epochs} epochs); "
          f"{platform.node()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s")  # fmt: skip
    header = list(table[0])
    print("| " + " | ".join(header) + " |\n|---|---|---|" + "---:|" * (len(header) - 3))
    for r in table:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"epochs": epochs, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
