"""The DPO-family losses torchtune lacks (IPO, length-normalised DPO). Sigmoid DPO and the hinge
loss are torchtune's own (DPOLoss, RSOLoss), used as they are by conf/loss/dpo.yaml and hinge.yaml."""

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
