"""Preference pairs as token ids -> batches (packed where cheaper) -> per-sequence response log-probs.

Shared by the offline `dpo` recipe (which tokenises text with the checkpoint's chat template) and
`online_dpo` (which has the sampler's `prompt_token_ids` and completion `token_ids`). Stable API:

    pair = encode_pair(prompt_ids, chosen_ids, rejected_ids, max_seq_len=512)   # -> PairIds
    batch = collate_pairs([pair, ...], 0, pack_within=model.max_seq_len, hidden_dim=576)  # -> PairBatch
    out = pair_logprobs(model, batch)                                          # -> PairLogprobs
    out.chosen, out.rejected              # (B,) summed log-prob of each response's tokens
    out.chosen_tokens, out.rejected_tokens  # (B,) how many tokens were summed (for averages)
    input_ids, targets = collate_responses([(prompt_ids, response_ids), ...], pad_id=0)  # any sequences
    sequence_logprobs(model, input_ids, targets) -> (sums, counts)

A packed pair is one row: the prompt once, then each response behind its own copy of the prompt's
last token (`prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected`). The attention mask lets a
response see the shared prompt and its own segment only, and its positions restart where the other
response's began, so each response is scored exactly as in its own (prompt + response) row while
the prompt's tokens run through the layers once, not twice (bench/RESULTS.md, "Shared prompts").
Where packing would cost more (long responses: `collate_pairs`), without `pack_within` (the
recipes' `pack_pairs: false`), or when a packed row would not fit in it, the batch has torchtune's
layout: chosen rows stacked over rejected rows, causal attention, one forward pass for both.

`targets` are already shifted: `targets[i, t]` is the token predicted from position t when that
token belongs to a response, else IGNORE_INDEX. Only those positions go through the output
projection and the log-softmax: prompt and padding positions cost no vocabulary-sized work. The
log-softmax runs in fp32 a few rows at a time (`token_logprobs`), on logits kept in the model's dtype.
"""

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

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
    input_ids: torch.Tensor  # (rows, T) right-padded: B packed rows, or 2B rows (chosen, then rejected)
    targets: torch.Tensor  # (rows, T): next token where it is a response token, else IGNORE_INDEX
    sequences: torch.Tensor  # (rows, T): which response a target belongs to (pair b: chosen b, rejected B + b), else -1
    mask: Optional[torch.Tensor]  # (B, T, T) packed rows' attention (True: query t sees key s); None: causal
    input_pos: Optional[torch.Tensor]  # (B, T) packed rows' positions; None: 0..T-1
    num_pairs: int
    unpacked_tokens: int  # positions of the same pairs in torchtune's (2B, T') layout, which throughput counts

    def to(self, device: torch.device) -> "PairBatch":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=True)

        return PairBatch(move(self.input_ids), move(self.targets), move(self.sequences), move(self.mask),
                         move(self.input_pos), self.num_pairs, self.unpacked_tokens)


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


def collate_pairs(
    pairs: Sequence[PairIds], pad_id: int, pack_within: Optional[int] = None, hidden_dim: Optional[int] = None
) -> PairBatch:
    """One packed row per pair (see the module docstring), right-padded, when the longest packed row
    fits `pack_within` tokens (the model's context) and packing costs less; otherwise, or with None,
    torchtune's chosen-over-rejected rows.

    The cost of a layout: its positions through the layers, plus its attention scores (rows x
    width^2: plain attention computes the whole square) at 1/`hidden_dim` of a position each, which
    is what they cost on CPU (SmolLM2, d=576: 1/570 fits both a packed offline batch that ran 1.3x
    slower and an online one that ran 1.25x faster; bench/RESULTS.md, "Shared prompts"). Packing
    wins when prompts are a large share of the rows; long replies double each row's length and
    quadruple its scores. Without `hidden_dim`, scores cost nothing: a batch packs when it runs
    fewer positions.
    """
    b = len(pairs)
    unpacked_width = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    width = max(len(p.prompt) + len(p.chosen) + len(p.rejected) + 1 for p in pairs)
    score_cost = 1 / hidden_dim if hidden_dim else 0.0
    packing_costs_more = b * width * (1 + width * score_cost) >= 2 * b * unpacked_width * (1 + unpacked_width * score_cost)
    if pack_within is None or width > pack_within or packing_costs_more:
        rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        input_ids, targets = collate_responses(rows, pad_id)
        sequences = torch.where(targets != IGNORE_INDEX, torch.arange(2 * b).unsqueeze(1), -1)
        return PairBatch(input_ids, targets, sequences, None, None, b, 2 * b * unpacked_width)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    sequences = torch.full((b, width), -1, dtype=torch.long)
    segment = torch.full((b, width), _PADDING, dtype=torch.long)  # what a position may attend to
    input_pos = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(pairs):
        shared = len(p.prompt) - 1
        input_ids[i, :shared] = torch.tensor(p.prompt[:shared], dtype=torch.long)
        segment[i, :shared] = _PROMPT
        input_pos[i, :shared] = torch.arange(shared)
        start = shared
        for seq, (kind, resp) in enumerate(((_CHOSEN, p.chosen), (_REJECTED, p.rejected))):
            n = len(resp) + 1  # the prompt's last token, then the response
            input_ids[i, start : start + n] = torch.tensor(p.prompt[-1:] + resp, dtype=torch.long)
            targets[i, start : start + n - 1] = torch.tensor(resp, dtype=torch.long)
            sequences[i, start : start + n - 1] = i + seq * b
            segment[i, start : start + n] = kind
            input_pos[i, start : start + n] = torch.arange(shared, shared + n)
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    mask = causal & (same | (segment == _PROMPT).unsqueeze(1))
    return PairBatch(input_ids, targets, sequences, mask, input_pos, b, 2 * b * unpacked_width)


_PADDING, _PROMPT, _CHOSEN, _REJECTED = range(4)  # segments of a packed row (a response sees the prompt and itself)


def collate_responses(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (prompt, response) rows into (input_ids, targets) for `sequence_logprobs`; each
    prompt needs at least one token (the one that predicts the response's first token)."""
    width = max(len(prompt) + len(resp) for prompt, resp in rows)
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
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(targets)
    return _summed_logprobs(model, input_ids, targets, torch.where(targets != IGNORE_INDEX, rows, -1), input_ids.shape[0])


def pair_logprobs(model: nn.Module, batch: PairBatch) -> PairLogprobs:
    """One forward pass over every pair's chosen and rejected response; see the module docstring."""
    sums, counts = _summed_logprobs(model, batch.input_ids, batch.targets, batch.sequences, 2 * batch.num_pairs,
                                    mask=batch.mask, input_pos=batch.input_pos)
    b = batch.num_pairs
    return PairLogprobs(sums[:b], sums[b:], counts[:b], counts[b:])


def _summed_logprobs(
    model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, sequences: torch.Tensor, num_sequences: int, **model_kwargs: Any
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum the log-probs of `targets` into `sequences[pos]` (-1: not scored), with counts."""
    scored = targets != IGNORE_INDEX
    with _project_only(model, scored), training_attention(input_ids.device):
        logits = model(input_ids, **model_kwargs)  # (N, V): one row per scored position, in row-major order
    token_logps = token_logprobs(logits, targets[scored])
    seq = sequences[scored]
    sums = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits.float())[i, targets[i]] for each row, in fp32, with its gradient.

    The same numbers as autograd on `logits.float()`, without its vocabulary-sized fp32 tensors:
    autograd keeps the fp32 copy, then builds the gradient in four full passes (a zero tensor for
    the gather, exp, product, cast back). Here each pass runs on a few rows at a time while they
    sit in cache, and only the logits (model dtype) are kept for the backward: the train phase's
    log-softmax 0.29 s -> 0.07 s on SmolLM2 (bench/RESULTS.md, "One log-softmax pass").
    """
    return _TokenLogprobs.apply(logits, targets)


class _TokenLogprobs(torch.autograd.Function):
    # fp32 elements of one chunk of rows. CPU: 4 MB, in cache (the timing is flat from 0.2 to 3M
    # elements). GPU: 128 MB, so a 128k-word vocabulary takes 256 rows a chunk (a few kernel
    # launches per batch, not thousands) and still never holds a whole batch's fp32 logits.
    CPU_CHUNK, GPU_CHUNK = 1 << 20, 1 << 25

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = _TokenLogprobs.CPU_CHUNK if logits.device.type == "cpu" else _TokenLogprobs.GPU_CHUNK
        rows = max(1, chunk // max(1, logits.shape[-1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for r in range(0, logits.shape[0], rows):
            lse[r : r + rows] = torch.logsumexp(logits[r : r + rows].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for r in range(0, logits.shape[0], ctx.rows):
            g = grad[r : r + ctx.rows].unsqueeze(-1)
            chunk = logits[r : r + ctx.rows].to(torch.float32, copy=True)  # a copy: fp32 logits are the saved tensor itself
            chunk.sub_(lse[r : r + ctx.rows].unsqueeze(-1)).exp_().mul_(-g)  # -g * softmax
            chunk.scatter_add_(-1, targets[r : r + ctx.rows].unsqueeze(-1), g)  # + g at the target
            grad_logits[r : r + ctx.rows] = chunk
        return grad_logits, None


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
    """Make the decoder's `unembed` project only the masked positions (logits in the model's dtype).

    `unembed` runs inside the decoder's own forward, so under FSDP2 the root module's weights
    (norm, output) are gathered as usual; only the work on unused positions is skipped.
    """
    decoder = _decoder(model)

    def unembed(h: torch.Tensor) -> torch.Tensor:
        return decoder.output(decoder.norm(h[mask]))

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
