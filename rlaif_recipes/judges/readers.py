"""Readers: a few of the encoder's top layers fine-tuned with a logistic head, for what a linear
head on the frozen sentence embedding reads poorly.

A linear head on the sentence embedding reads topic, not intent or stance. The reward model has two
readers of this kind:

- the harm reader, P(the request is harmful) from the request text alone: "How do I kill a Python
  process?" and "How do I kill my neighbour?" sit close together as embeddings, and a long benign
  writing task sits far from XSTest's short questions. It trains on labelled requests from several
  sources and styles (rlaif_recipes/assets/harm_prompts: HarmBench, Do-Not-Answer, tense
  reformulations, WritingBench, PersistBench, FreshQA; plus XSTest's training prompts, the contrast
  set of alarming-but-benign requests);
- the answer reader, P(the response answers rather than refuses) from the response's first 128
  tokens: a refusal in other words ("There is no legal or ethical way to ...") and compliance in a
  hedging voice ("This can be a delicate task. Here are some tips ...") share their topic with the
  opposite kind, and the linear head read both wrong. It trains on the answer/refusal labels of the
  reward model's training completions (and people's labelled responses).

The frozen bottom layers run once per text; only the top layers and the head train, and only they
ship (in the reward model's head.safetensors, in bf16).
"""

import copy
from collections import Counter
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Reader(nn.Module):
    """Top encoder layers (copies, fine-tuned) + mean pooling + a logistic head."""

    def __init__(self, encoder_layers: nn.ModuleList, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = copy.deepcopy(encoder_layers[len(encoder_layers) - layers :])
        self.head = nn.Linear(dim, 1)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logit of P(label) from the frozen layers' token states [n, T, d] and the attention mask [n, T]."""
        width = max(int(mask.sum(1).max()), 1) if len(mask) else 1  # columns past the longest text are padding
        states, mask = states[:, :width], mask[:, :width]
        h = states.to(self.head.weight.dtype)
        additive = ((1.0 - mask.to(h.dtype)) * torch.finfo(h.dtype).min)[:, None, None, :]
        for layer in self.layers:
            out = layer(h, attention_mask=additive)
            h = out[0] if isinstance(out, tuple) else out
        weights = mask.to(h.dtype).unsqueeze(-1)
        pooled = F.normalize((h * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=-1)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def logits(self, states: torch.Tensor, mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self(states[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(states), batch_size)]) if len(states) else torch.empty(0)


def source_weights(sources: Sequence[str], labels: torch.Tensor, scale: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """Each (source, label) group weighs the same in the loss, whatever its size (the largest
    source must not set the style the reader reads), times `scale[source]` where given: a contrast
    set (XSTest: alarming words in benign requests) can count for more than its share."""
    keys = [(s, int(y)) for s, y in zip(sources, labels.tolist())]
    count = Counter(keys)
    return torch.tensor([(scale or {}).get(k[0], 1.0) / count[k] for k in keys])


def train_reader(
    reader: Reader,
    states: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    name: str,
    epochs: int,
    lr: float,
    head_lr: float,
    batch_size: int,
    seed: int,
    log_every: int = 0,
) -> None:
    """Minibatch AdamW on the weighted BCE; the layers at `lr`, the fresh head at `head_lr`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [{"params": reader.layers.parameters(), "lr": lr}, {"params": reader.head.parameters(), "lr": head_lr}],
        weight_decay=0.01,
    )
    reader.train()
    for epoch in range(epochs):
        order = torch.randperm(len(states), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = (F.binary_cross_entropy_with_logits(reader(states[idx], mask[idx]), labels[idx], reduction="none") * weights[idx]).sum() / weights[idx].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if log_every and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            print(f"{name}: epoch {epoch + 1}/{epochs} loss {total / len(order):.4f}", flush=True)
    reader.eval()


def accuracy_by_group(
    p: torch.Tensor, labels: torch.Tensor, sources: Sequence[str], names: Tuple[str, str] = ("harmful", "benign")
) -> Tuple[dict, dict]:
    """Share right at P = 0.5 and mean P, per "source:name" group (names[0] for label 1, names[1]
    for 0) and overall: the accuracy says how often it reads the text right, the mean how sure it
    is (calibration)."""
    accuracy, mean_p = {}, {}
    groups = {"all": torch.ones_like(labels, dtype=torch.bool)}
    for source in sorted(set(sources)):
        of_source = torch.tensor([s == source for s in sources])
        for name, value in zip(names, (1.0, 0.0)):
            groups[f"{source}:{name}"] = of_source & (labels == value)
    for name, members in groups.items():
        if members.any():
            right = (p[members] >= 0.5) == (labels[members] == 1)
            accuracy[name] = round(right.float().mean().item(), 4)
            mean_p[name] = round(p[members].mean().item(), 4)
    return accuracy, mean_p
