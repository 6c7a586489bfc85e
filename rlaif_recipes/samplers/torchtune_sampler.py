"""KV-cached sampling with the live torchtune policy: no weight copy, works without vLLM.

With FSDP2 the policy is gathered once for a whole `sample` call (every rank joins, as every rank
samples each step) and stays whole until it ends, so decoding a token costs no collective; the
layers are then sharded again as training had them. Tokens are drawn on the policy's device.
"""

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import local_kv_cache

from rlaif_recipes.samplers.base import Completion, Sampler, SamplingSettings, Weights


class TorchtuneSampler(Sampler):
    uses_live_policy = True
    RUNTIME_SETTINGS = ("batch_size",)

    def __init__(self, checkpoint_dir: str, *, batch_size: int = 64, **sampling) -> None:
        super().__init__(checkpoint_dir, **sampling)
        self.batch_size = batch_size
        self.policy: Optional[nn.Module] = None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def bind_policy(self, policy: nn.Module) -> None:
        self.policy = policy

    def update_weights(self, weights: Weights) -> None:
        """Nothing to copy: sampling runs on the bound training model, which is always current."""
        if self.policy is None:
            raise RuntimeError("TorchtuneSampler has no policy; call bind_policy(model) first")

    def _generate(
        self, prompt_ids: List[List[int]], n: int, settings: SamplingSettings, done: Callable[[int, List[Completion]], None]
    ) -> List[List[Completion]]:
        if self.policy is None:
            raise RuntimeError("TorchtuneSampler has no policy; call bind_policy(model) first")
        rows = [p for p in prompt_ids for _ in range(n)]
        rng = torch.Generator(device=next(self.policy.parameters()).device).manual_seed(settings.seed)
        flat: List[Completion] = []
        was_training = self.policy.training
        self.policy.eval()
        try:
            with unsharded(self.policy):
                for i in range(0, len(rows), self.batch_size):
                    flat += self._generate_batch(rows[i : i + self.batch_size], settings, rng)
        finally:
            self.policy.train(was_training)
        out = [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]
        for i, completions in enumerate(out):  # batches of rows, not prompts: hand them on at the end
            done(i, completions)
        return out

    @torch.no_grad()
    def _generate_batch(self, batch: List[List[int]], s: SamplingSettings, rng: torch.Generator) -> List[Completion]:
        model = self.policy
        param = next(model.parameters())
        device = param.device
        bsz, prompt_len = len(batch), max(len(p) for p in batch)
        total_len = prompt_len + s.max_tokens
        tokens = torch.full((bsz, prompt_len), self.pad_id, dtype=torch.long, device=device)
        real = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for i, p in enumerate(batch):  # left padding, so every row's next token sits at the end
            tokens[i, prompt_len - len(p) :] = torch.tensor(p, device=device)
            real[i, prompt_len - len(p) :] = True
        masks = get_causal_mask_from_padding_mask(real, target_seq_len=total_len)
        input_pos = get_position_ids_from_padding_mask(real)
        stop_ids = torch.tensor(s.stop_token_ids, device=device)
        generated = torch.full((bsz, s.max_tokens), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((bsz, s.max_tokens), device=device)
        lengths = torch.full((bsz,), s.max_tokens, dtype=torch.long, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        dtype = param.dtype if not hasattr(param, "to_local") else param.to_local().dtype
        with local_kv_cache(model, batch_size=bsz, device=device, dtype=dtype, decoder_max_seq_len=total_len):
            logits = model(tokens, input_pos=input_pos[:, :prompt_len], mask=masks[:, :prompt_len])[:, -1]
            for t in range(s.max_tokens):
                next_tok, lp = _sample_next(logits.float(), s.temperature, s.top_p, rng)
                next_tok = torch.where(done, self.pad_id, next_tok)
                generated[:, t], logprobs[:, t] = next_tok, lp
                hit = ~done & torch.isin(next_tok, stop_ids)
                lengths = torch.where(hit, t + 1, lengths)
                done |= hit
                if bool(done.all()) or t == s.max_tokens - 1:
                    break
                pos = prompt_len + t
                logits = model(
                    next_tok[:, None], input_pos=input_pos[:, pos, None], mask=masks[:, pos, None, :]
                )[:, -1]
        out = []
        for i in range(bsz):
            ids = generated[i, : lengths[i]].tolist()
            finished = bool(done[i])
            out.append(Completion(ids, self.decode(ids), logprobs[i, : lengths[i]].tolist(), "stop" if finished else "length"))
        return out


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator):
    """Greedy at temperature 0, else temperature + nucleus sampling. Log-probs are untempered."""
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        tok = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        tok = torch.multinomial(probs, 1, generator=rng).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Under FSDP2, every layer gathered once (a collective) and kept whole until the block ends,
    instead of an all-gather per layer per forward, that is per decoded token; then resharded, with
    each layer's reshard-after-forward setting put back. FSDP2 has no getter for that setting, and
    fixes the root's (it keeps its weights after forward) at its first forward: that is done first."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model._get_fsdp_state()._lazy_init()  # a no-op once the model has run forward
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in fsdp for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
        for group, info in zip(groups, saved):
            group.post_forward_mesh_info = info
