"""The harm reader on requests from sources it never trained on: leave-one-source-out, beside the
in-distribution held-out split and beside the old reader (a linear head on the frozen sentence
embedding), in one run.

For each source S of harm_data: train the reader (conf/train_reward_model.yaml's harm_reader
settings) on the training split of every other source, then read every request of S (for XSTest,
its held-out split: XSTest's training prompts are the contrast set the others lack). "in-dist." is
one reader trained on the training split of every source, read on the held-out split of each.
Accuracy is at P(harmful) = 0.5, per label; mean P says how sure the reader is (calibration).

    python bench/harm_reader.py [--epochs 4] [--max-per-source 300] [--leave-out xstest_prompts overrefusal] [--out bench/harm_reader.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: conf/train_reward_model.yaml's harm_reader.epochs")
    parser.add_argument("--max-per-source", type=int, default=None, help="cap per (source, label) in training, for a quicker run")
    parser.add_argument("--leave-out", nargs="+", default=None, help="the sources to leave out one at a time (default: each)")
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
        reader = Reader(encoder.layers, settings["layers"], encoder.dim)
        weights = source_weights([source[i] for i in train.tolist()], harmful[train], settings.get("source_weight"))
        train_reader(reader, states[train], mask[train], harmful[train], weights, name="harm reader", epochs=epochs, lr=settings["lr"],
                          head_lr=settings["head_lr"], batch_size=settings["batch_size"], seed=0)  # fmt: skip
        return {
            "reader": torch.sigmoid(reader.logits(states[test], mask[test])),
            "linear": linear_probe(sentence[train], harmful[train], weights, sentence[test]),
        }

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
            rows.append({
                "held-out source": group, "n": int(members.sum()),
                "reader, left out": (out["reader"][members] >= 0.5).eq(value == 1.0).float().mean().item(),
                "mean P(harmful), left out": out["reader"][members].mean().item(),
                "linear head, left out": (out["linear"][members] >= 0.5).eq(value == 1.0).float().mean().item(),
                "reader, in-dist.": in_dist_acc["reader"][0].get(group),
                "linear head, in-dist.": in_dist_acc["linear"][0].get(group),
            })  # fmt: skip
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
