"""The step pieces dpo and online_dpo share (rlaif_recipes.dpo_training)."""

import pytest
import torch
from omegaconf import OmegaConf

from rlaif_recipes.dpo_training import add_up, lr_schedule, pair_metrics, pair_sums
from rlaif_recipes.logprobs import PairLogprobs


def logprobs(chosen, rejected) -> PairLogprobs:
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    return PairLogprobs(c, r, torch.ones_like(c), torch.ones_like(r))


def test_metrics_over_ranks_keep_negative_sums():
    """Rewards and log-probs are mostly negative; a Counter sum would have reported them as 0."""
    policy, reference = logprobs([-2.0, -1.0], [-5.0, -4.0]), logprobs([-2.5, -1.5], [-4.0, -3.0])
    losses, chosen_rewards, rejected_rewards = torch.tensor([0.4, 0.5]), torch.tensor([0.05, 0.05]), torch.tensor([-0.1, -0.1])
    rank0 = pair_sums(losses[:1], chosen_rewards[:1], rejected_rewards[:1], logprobs([-2.0], [-5.0]), logprobs([-2.5], [-4.0]))
    rank1 = pair_sums(losses[1:], chosen_rewards[1:], rejected_rewards[1:], logprobs([-1.0], [-4.0]), logprobs([-1.5], [-3.0]))
    metrics = pair_metrics(add_up([rank0, rank1]))
    assert metrics == pytest.approx(pair_metrics(pair_sums(losses, chosen_rewards, rejected_rewards, policy, reference)))
    assert metrics["rewards/rejected"] == pytest.approx(-0.1)
    assert metrics["log_probs/rejected"] == pytest.approx(-4.5)
    assert metrics["rewards/margins"] == pytest.approx(0.15) and metrics["rewards/accuracies"] == 1.0
    assert metrics["kl/reference"] == pytest.approx(((0.5 - 1.0) + (0.5 - 1.0)) / 2 / 2)
    assert all(v != v for v in pair_metrics(add_up([])).values())  # no pair: NaN, not 0


def test_schedule_rebuilt_at_a_step_continues_the_schedule():
    cfg = OmegaConf.create({"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 2})
    param = torch.nn.Parameter(torch.zeros(1))
    straight = torch.optim.SGD([param], lr=0.1)
    scheduler = lr_schedule(cfg, straight, [0.1], 10, 0)
    lrs = []
    for _ in range(6):
        straight.step()
        scheduler.step()
        lrs.append(straight.param_groups[0]["lr"])
    resumed = torch.optim.SGD([param], lr=0.1)
    resumed.param_groups[0]["lr"] = 0.0123  # what a restored optimizer state would hold
    lr_schedule(cfg, resumed, [0.1], 10, 4)
    assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[3])
