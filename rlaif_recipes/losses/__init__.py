"""The DPO loss family, all with torchtune's loss signature so any of them (or a user's own, by
`_component_`) drops into the `dpo` and `online_dpo` recipes:

    losses, chosen_rewards, rejected_rewards = loss_fn(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)

Inputs are (B,) per-sequence response log-probs (`rlaif_recipes.logprobs.PairLogprobs`); outputs
are (B,) per-pair losses and implicit rewards. A loss that wants per-token *average* log-probs sets
`average_logprobs = True`; recipes check it with `wants_average_logprobs(loss_fn)` and pass
`PairLogprobs.averaged()` instead of sums. A loss with a `chosen_nll_weight` gets that weight times the
chosen reply's mean token NLL added per pair (`chosen_nll_weight(loss_fn)`).

| config (`loss=`) | class (torchtune's, or ours in `losses/beyond_torchtune.py`) | paper |
|---|---|---|
| `dpo` | torchtune.rlhf.loss.DPOLoss (torchtune's; label_smoothing > 0: conservative DPO) | Rafailov et al. 2023 |
| `hinge` | torchtune.rlhf.loss.RSOLoss (torchtune's; SLiC-style hinge on the margin) | Liu et al. 2023 |
| `ipo` | rlaif_recipes.losses.IPOLoss (ours) | Azar et al. 2023 |
| `dpo_norm` | rlaif_recipes.losses.LengthNormalizedDPOLoss (ours: DPO on per-token average log-probs) | e.g. Meng et al. 2024 |
| `rpo` | rlaif_recipes.losses.RPOLoss (ours: DPO plus alpha x the chosen reply's NLL per token) | Pang et al. 2024 |
"""

from torch import nn

from rlaif_recipes.losses.beyond_torchtune import IPOLoss, LengthNormalizedDPOLoss, RPOLoss


def chosen_nll_weight(loss_fn: nn.Module) -> float:
    """The weight of the chosen reply's NLL per token added to each pair's loss (0: none)."""
    return float(getattr(loss_fn, "chosen_nll_weight", 0.0))


def wants_average_logprobs(loss_fn: nn.Module) -> bool:
    """Whether `loss_fn` takes per-token average log-probs rather than sums."""
    return bool(getattr(loss_fn, "average_logprobs", False))


__all__ = ["IPOLoss", "LengthNormalizedDPOLoss", "RPOLoss", "chosen_nll_weight", "wants_average_logprobs"]
