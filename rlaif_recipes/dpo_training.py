"""What the `dpo` and `online_dpo` recipes share in an optimizer step, so the twins compute the same
loss, clip the same way, follow the same schedule and log the same metrics under the same names.

    losses, chosen_rewards, rejected_rewards = dpo_loss(loss_fn, policy_logps, reference_logps)
    sums.update(pair_sums(losses, chosen_rewards, rejected_rewards, policy_logps, reference_logps))
    metrics = pair_metrics(add_up(sums_of_every_rank))   # means per pair
    grad_norm = clip_grad_norm(model, cfg.clip_grad_norm)
    scheduler = lr_schedule(cfg.lr_scheduler, optimizer, base_lrs, num_training_steps, global_step)
"""

from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config

from rlaif_recipes.logprobs import PairLogprobs
from rlaif_recipes.losses import chosen_nll_weight, wants_average_logprobs


def dpo_loss(loss_fn: nn.Module, policy: PairLogprobs, reference: PairLogprobs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards) per pair, on summed log-probs or, for a loss that
    asks for them (`average_logprobs`), per-token averages; plus the chosen reply's NLL per token
    for a loss that weights it (RPO)."""
    weight = chosen_nll_weight(loss_fn)
    nll = -policy.averaged().chosen if weight else None  # before any averaging below: per token either way
    if wants_average_logprobs(loss_fn):
        policy, reference = policy.averaged(), reference.averaged()
    losses, chosen_rewards, rejected_rewards = loss_fn(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    return (losses + weight * nll if weight else losses), chosen_rewards, rejected_rewards


def pair_sums(losses, chosen_rewards, rejected_rewards, policy: PairLogprobs, reference: PairLogprobs) -> Counter:
    """Sums over one batch's pairs; add them up over micro-batches and ranks, then `pair_metrics`."""
    log_ratio = (policy.chosen - reference.chosen) + (policy.rejected - reference.rejected)
    return Counter(
        pairs=len(losses),
        loss=float(losses.detach().sum()),
        reward_chosen=float(chosen_rewards.detach().sum()),
        reward_rejected=float(rejected_rewards.detach().sum()),
        reward_correct=float((chosen_rewards > rejected_rewards).sum()),
        logp_chosen=float(policy.chosen.detach().sum()),
        logp_rejected=float(policy.rejected.detach().sum()),
        log_ratio=float(log_ratio.detach().sum()),
    )


def add_up(parts: Iterable[Mapping[str, float]]) -> Counter:
    """Key-wise sums that keep negative values (`sum(counters, Counter())` drops them: rewards,
    log-probs and log-ratios are mostly negative)."""
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def pair_metrics(sums: Mapping[str, float]) -> Dict[str, float]:
    """Means per pair, under the names both recipes log (NaN when no pair was trained).

    kl/reference is the mean log pi(y) / pi_ref(y) over both responses: on the policy's own samples
    (online) a sample estimate of KL(pi || pi_ref), on dataset responses (dpo) how far the policy
    has moved on that data.
    """
    pairs = sums.get("pairs", 0)

    def mean(key: str) -> float:
        return sums.get(key, 0.0) / pairs if pairs else float("nan")

    return {
        "loss": mean("loss"),
        "rewards/chosen": mean("reward_chosen"),
        "rewards/rejected": mean("reward_rejected"),
        "rewards/margins": mean("reward_chosen") - mean("reward_rejected"),
        "rewards/accuracies": mean("reward_correct"),
        "log_probs/chosen": mean("logp_chosen"),
        "log_probs/rejected": mean("logp_rejected"),
        "kl/reference": mean("log_ratio") / 2,
    }


def clip_grad_norm(model: nn.Module, max_norm: Optional[float]) -> Optional[float]:
    """Clip the trainable parameters' gradient norm (None: no clipping); the norm before clipping,
    as a float on every rank (under FSDP2 the norm is a DTensor)."""
    if max_norm is None:
        return None
    norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def lr_schedule(
    cfg_scheduler: Optional[DictConfig],
    optimizer: torch.optim.Optimizer,
    base_lrs: List[float],
    num_training_steps: int,
    global_step: int,
) -> Optional[Any]:
    """The schedule as a function of the step, as torchtune's recipes build it: a resumed run picks
    it up at `global_step` from the configured learning rates (`base_lrs`, read before the
    optimizer's state was restored), with no scheduler state to save or restore."""
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = group["initial_lr"] = lr
    if cfg_scheduler is None:
        return None
    return config.instantiate(cfg_scheduler, optimizer, num_training_steps=num_training_steps, last_epoch=global_step - 1)
