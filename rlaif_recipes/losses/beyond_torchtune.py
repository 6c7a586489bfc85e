"""The DPO-family losses torchtune lacks (IPO, length-normalised DPO, RPO). Sigmoid DPO and the
hinge loss are torchtune's own (DPOLoss, RSOLoss), used as they are by conf/loss/dpo.yaml and hinge.yaml."""

from typing import Tuple

import torch
from torch import nn
from torchtune.rlhf.loss import DPOLoss

from rlaif_recipes.errors import ConfigError

LossOutput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class IPOLoss(nn.Module):
    """Identity preference optimisation (Azar et al. 2023, eq. 17): regress the log-ratio margin
    onto 1 / (2 tau) instead of pushing it to infinity, which keeps the policy from drifting far
    from the reference on deterministic (or noisy AI-judged) preferences.

    Args:
        tau: regularisation; the target margin is 1 / (2 tau).
        average_logprobs: use per-token average log-probs, as the paper's authors and TRL do.
    """

    def __init__(self, tau: float = 0.1, average_logprobs: bool = True) -> None:
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"loss.tau={tau}: IPO needs tau > 0 (its target margin is 1 / (2 tau))")
        self.tau = tau
        self.average_logprobs = average_logprobs

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ) -> LossOutput:
        margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
        losses = (margin - 1 / (2 * self.tau)) ** 2
        chosen_rewards = self.tau * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.tau * (policy_rejected_logps - reference_rejected_logps).detach()
        return losses, chosen_rewards, rejected_rewards


class LengthNormalizedDPOLoss(DPOLoss):
    """Sigmoid DPO on per-token average log-probs: a long response no longer gets a larger
    implicit reward just for having more tokens, which counters DPO's drift towards verbosity
    (and judges' taste for longer answers). beta is per token, so it is usually larger (1-2.5)."""

    average_logprobs = True


class RPOLoss(DPOLoss):
    """Sigmoid DPO plus the chosen reply's negative log-likelihood per token (RPO, Pang et al. 2024;
    TRL's `rpo_alpha`). DPO only widens the gap between the two replies, and often lowers both: when
    one reply style is rejected on some requests and chosen on others (a refusal, wrong for a benign
    request and right for a harmful one), lowering it everywhere is the easy way to widen the gap.
    The NLL term raises the chosen reply where it was chosen, so each kind of request keeps its own
    pull. The recipes add `alpha * NLL` per pair (`rlaif_recipes.dpo_training.dpo_loss`), because
    the term needs the reply's token count, which the loss signature does not carry.

    Args:
        beta, label_smoothing: as torchtune's DPOLoss.
        alpha: weight of the chosen reply's mean token NLL (TRL suggests 1.0).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, alpha: float = 1.0) -> None:
        super().__init__(beta=beta, label_smoothing=label_smoothing)
        if alpha < 0:
            raise ConfigError(f"loss.alpha={alpha}: the NLL weight must be >= 0")
        self.chosen_nll_weight = alpha
