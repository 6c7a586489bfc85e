"""Preference pairs as token ids -> padded batches -> per-sequence response log-probs.

Shared by the offline `dpo` recipe (which tokenises text with the checkpoint's chat template) and
`online_dpo` (which has the sampler's `prompt_token_ids` and completion `token_ids`). Stable API:

    pair = encode_pair(prompt_ids, chosen_ids, rejected_ids, max_seq_len=512)   # -> PairIds
    batch = collate_pairs([pair, ...], pad_id=0)                               # -> PairBatch
    out = pair_logprobs(model, batch)                                          # -> PairLogprobs
    out.chosen, out.rejected              # (B,) summed log-prob of each response's tokens
    out.chosen_tokens, out.rejected_tokens  # (B,) how many tokens were summed (for averages)
    input_ids, targets = collate_responses([(prompt_ids, response_ids), ...], pad_id=0)  # any sequences
    sequence_logprobs(model, input_ids, targets) -> (sums, counts)

A batch stacks the chosen sequences over the rejected ones (rows 0..B-1 chosen, B..2B-1
rejected), so one forward pass scores both, as torchtune's DPO recipes do. `targets` are already
shifted: `targets[i, t]` is the token predicted from position t (`input_ids[i, t + 1]`) when that
token belongs to the response, else IGNORE_INDEX. Only those positions go through the output
projection and the log-softmax: prompt and padding positions cost no vocabulary-sized work, which
is most of the speed-up over projecting every position.
"""

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

IGNORE_INDEX = -100


@dataclass
class PairIds:
    """One preference pair as token ids: the prompt (chat template applied, generation prompt
    included) and two responses (ending with the end-of-turn token when they finished)."""

    prompt: List[int]
    chosen: List[int]
    rejected: List[int]


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T): chosen rows, then rejected rows, right-padded
    targets: torch.Tensor  # (2B, T): next token where it is a response token, else IGNORE_INDEX

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))


@dataclass
class PairLogprobs:
    chosen: torch.Tensor  # (B,) summed response log-probs
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # (B,) response tokens summed over
    rejected_tokens: torch.Tensor

    def averaged(self) -> "PairLogprobs":
        """Per-token means instead of sums (length-normalised losses)."""
        return PairLogprobs(
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
            self.chosen_tokens,
            self.rejected_tokens,
        )


def encode_pair(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_seq_len: Optional[int] = None,
) -> PairIds:
    """Fit a pair into `max_seq_len` tokens per sequence.

    A prompt longer than half the budget keeps its last tokens (the end of a conversation is what
    the response answers); each response is then cut to the room left. Both responses keep at
    least one token, so every sequence contributes to the loss.
    """
    if not chosen_ids or not rejected_ids:
        raise ValueError("a preference pair needs two non-empty responses; drop pairs with an empty response")
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_seq_len is not None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}: need room for a prompt token and a response token")
        prompt = prompt[-(max_seq_len // 2) :] if len(prompt) > max_seq_len // 2 else prompt
        room = max_seq_len - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return PairIds(prompt, chosen, rejected)


def collate_pairs(pairs: Sequence[PairIds], pad_id: int, pad_to_multiple_of: int = 1) -> PairBatch:
    """Right-pad chosen then rejected sequences of `pairs` into one (2B, T) batch."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    return PairBatch(*collate_responses(rows, pad_id, pad_to_multiple_of))


def collate_responses(
    rows: Sequence[Tuple[List[int], List[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (prompt, response) rows into (input_ids, targets) for `sequence_logprobs`; each
    prompt needs at least one token (the one that predicts the response's first token)."""
    width = max(len(prompt) + len(resp) for prompt, resp in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, resp) in enumerate(rows):
        n = len(prompt) + len(resp)
        input_ids[i, :n] = torch.tensor(prompt + resp, dtype=torch.long)
        # position t predicts token t + 1: response token j sits at len(prompt) + j
        targets[i, len(prompt) - 1 : n - 1] = torch.tensor(resp, dtype=torch.long)
    return input_ids, targets


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the non-ignored `targets` of each row, and how many there were.

    Works for any torchtune `TransformerDecoder`, sharded with FSDP2 or not, LoRA or not.
    """
    mask = targets != IGNORE_INDEX
    with _project_only(model, mask), training_attention(input_ids.device):
        logits = model(input_ids)  # (N, V): one row per response token, in row-major order
    picked = targets[mask]
    token_logps = logits.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    row = mask.nonzero(as_tuple=True)[0]
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, row, token_logps)
    return sums, mask.sum(-1)


def pair_logprobs(model: nn.Module, batch: PairBatch) -> PairLogprobs:
    """One forward pass over chosen and rejected rows; see the module docstring."""
    sums, counts = sequence_logprobs(model, batch.input_ids, batch.targets)
    b = batch.num_pairs
    return PairLogprobs(sums[:b], sums[b:], counts[:b], counts[b:])


def training_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """On CPU, plain (math) attention where gradients flow: PyTorch's CPU flash-attention backward
    is slow on these short training sequences (SmolLM2, bf16, 16 x 86 tokens: backward 4.4 s with
    it, 3.1 s without; bench/RESULTS.md, "Online DPO on SmolLM2"). The backend chosen in the forward
    also runs the backward; activation checkpointing recomputes under this context too
    (`policy.build_policy`). Forward-only passes (reference, eval, precomputed reference log-probs)
    keep PyTorch's default, flash attention, which is the faster forward at every length measured
    (bench/RESULTS.md, "Offline `dpo` against torchtune on the same batches")."""
    grads = torch.is_grad_enabled()
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" and grads else contextlib.nullcontext()


@contextlib.contextmanager
def _project_only(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Make the decoder's `unembed` project only the masked positions, in fp32.

    `unembed` runs inside the decoder's own forward, so under FSDP2 the root module's weights
    (norm, output) are gathered as usual; only the work on unused positions is skipped.
    """
    decoder = _decoder(model)

    def unembed(h: torch.Tensor) -> torch.Tensor:
        return decoder.output(decoder.norm(h[mask])).float()

    decoder.unembed = unembed
    try:
        yield
    finally:
        del decoder.unembed  # back to the class's method


def _decoder(model: nn.Module) -> nn.Module:
    if hasattr(model, "unembed") and hasattr(model, "output") and hasattr(model, "norm"):
        return model
    raise TypeError(
        f"{type(model).__name__} is not a torchtune TransformerDecoder (no unembed/norm/output); "
        "build the model with a torchtune decoder builder"
    )
