"""DPO-family losses (values, gradients, config wiring) and the shared log-prob code."""

import math

import pytest
import torch
from torchtune import config as tt_config
from torchtune import rlhf
from torchtune.rlhf.loss import DPOLoss, RSOLoss

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.dpo_training import dpo_loss
from rlaif_recipes.logprobs import (
    IGNORE_INDEX,
    PairIds,
    PairLogprobs,
    collate_pairs,
    collate_responses,
    encode_pair,
    pair_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from rlaif_recipes.losses import IPOLoss, LengthNormalizedDPOLoss, RPOLoss, wants_average_logprobs
from rlaif_recipes.policy import compile_training
from rlaif_recipes.recipes.dpo import DPOSettings

# policy chosen/rejected, reference chosen/rejected: pair 0 prefers chosen more than the reference
# does, pair 1 less.
LOGPS = (
    torch.tensor([-10.0, -12.0]),
    torch.tensor([-14.0, -11.0]),
    torch.tensor([-11.0, -12.0]),
    torch.tensor([-13.0, -12.0]),
)


def margins() -> torch.Tensor:
    pc, pr, rc, rr = LOGPS
    return (pc - rc) - (pr - rr)  # [2, -1]


def test_dpo_label_smoothing_is_conservative_dpo():
    beta, eps = 0.1, 0.2
    losses, chosen, rejected = DPOLoss(beta=beta, label_smoothing=eps)(*LOGPS)
    m = margins()
    expected = -(1 - eps) * torch.nn.functional.logsigmoid(beta * m) - eps * torch.nn.functional.logsigmoid(
        -beta * m
    )
    assert torch.allclose(losses, expected)
    assert torch.allclose(chosen - rejected, beta * m)


def test_ipo_targets_margin_of_one_over_two_tau():
    tau = 0.25
    loss_fn = IPOLoss(tau=tau)
    losses, chosen, rejected = loss_fn(*LOGPS)
    assert torch.allclose(losses, (margins() - 1 / (2 * tau)) ** 2)
    # at the target margin the loss is zero and its gradient vanishes
    pc = torch.tensor([-11.0 + 1 / (2 * tau)], requires_grad=True)  # margin (pc - rc) - (pr - rr) = target
    loss, _, _ = loss_fn(pc, torch.tensor([-13.0]), torch.tensor([-11.0]), torch.tensor([-13.0]))
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and pc.grad.abs().item() < 1e-6
    assert wants_average_logprobs(loss_fn) and not wants_average_logprobs(
        IPOLoss(tau=tau, average_logprobs=False)
    )
    with pytest.raises(ValueError, match="tau > 0"):
        IPOLoss(tau=0.0)


def test_ipo_pushes_a_small_margin_up_and_a_large_one_down():
    pc = torch.tensor([-10.0, -10.0], requires_grad=True)
    loss, _, _ = IPOLoss(tau=0.5)(
        pc, torch.tensor([-10.0, -40.0]), torch.tensor([-10.0, -10.0]), torch.tensor([-10.0, -10.0])
    )
    loss.sum().backward()
    assert pc.grad[0] < 0 < pc.grad[1]  # margin 0 < target 1: raise chosen; margin 30 > 1: lower it


def test_length_normalised_dpo_and_hinge():
    assert wants_average_logprobs(LengthNormalizedDPOLoss(beta=2.0))
    assert not wants_average_logprobs(DPOLoss()) and not wants_average_logprobs(RSOLoss())
    losses, _, _ = RSOLoss(gamma=0.5)(*LOGPS)
    assert torch.allclose(losses, torch.relu(1 - 0.5 * margins()))


def test_rpo_adds_the_chosen_replys_token_nll_to_dpo():
    tokens = torch.tensor([5.0, 4.0])
    policy, reference = PairLogprobs(LOGPS[0], LOGPS[1], tokens, tokens), PairLogprobs(LOGPS[2], LOGPS[3], tokens, tokens)
    rpo, _, _ = dpo_loss(RPOLoss(beta=0.1, alpha=0.5), policy, reference)
    dpo, _, _ = dpo_loss(DPOLoss(beta=0.1), policy, reference)
    assert torch.allclose(rpo - dpo, 0.5 * -LOGPS[0] / tokens)
    with pytest.raises(ValueError, match="alpha"):
        RPOLoss(alpha=-1.0)


@pytest.mark.parametrize(
    "option,cls",
    [("dpo", DPOLoss), ("hinge", RSOLoss), ("ipo", IPOLoss), ("dpo_norm", LengthNormalizedDPOLoss), ("rpo", RPOLoss)],
)
def test_loss_group_options_compose_and_build(option, cls, tiny_model_dir):
    cfg = rlaif_config.load("dpo", [f"loss={option}", f"checkpoint_dir={tiny_model_dir}"], DPOSettings)
    loss_fn = tt_config.instantiate(cfg.loss)
    assert isinstance(loss_fn, cls)
    losses, _, _ = loss_fn(*LOGPS)
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_custom_loss_by_component_and_bad_key(tiny_model_dir):
    cfg = rlaif_config.load(
        "dpo",
        [
            f"checkpoint_dir={tiny_model_dir}",
            "loss._component_=rlaif_recipes.losses.IPOLoss",
            "~loss.beta",
            "~loss.label_smoothing",
            "+loss.tau=0.3",
        ],
        DPOSettings,
    )
    assert tt_config.instantiate(cfg.loss).tau == 0.3
    with pytest.raises(rlaif_config.ConfigError, match="unknown key 'loss.gamma'"):
        rlaif_config.load("dpo", [f"checkpoint_dir={tiny_model_dir}", "+loss.gamma=1"], DPOSettings)


# ---- logprobs ---------------------------------------------------------------------------------


def test_encode_pair_truncates_prompt_left_and_responses_right():
    pair = encode_pair(list(range(10)), [100, 101, 102, 103, 104], [200, 201], max_seq_len=8)
    assert pair.prompt == [6, 7, 8, 9]  # the last half of the budget
    assert pair.chosen == [100, 101, 102, 103] and pair.rejected == [200, 201]
    with pytest.raises(ValueError, match="non-empty"):
        encode_pair([1], [], [2])


def test_collate_packs_each_pair_into_one_row_with_the_prompt_once():
    batch = collate_pairs([PairIds([1, 2], [3, 4], [5]), PairIds([6], [7], [8, 9, 10])], pad_id=0, pack_within=6)
    X = IGNORE_INDEX
    # prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 2, 5], [6, 7, 6, 8, 9, 10]]
    assert batch.targets.tolist() == [[X, 3, 4, X, 5, X], [7, X, 8, 9, 10, X]]
    assert batch.sequences.tolist() == [[-1, 0, 0, -1, 2, -1], [1, -1, 3, 3, 3, -1]]
    assert batch.input_pos.tolist() == [[0, 1, 2, 3, 1, 2], [0, 1, 0, 1, 2, 3]]
    # the rejected response (positions 4, 5) sees the shared prompt (0) and itself, not the chosen one
    assert batch.mask[0, 5].tolist() == [True, False, False, False, True, True]
    assert batch.mask[0, 3].tolist() == [True, True, True, True, False, False]
    assert batch.mask[1, 4].tolist() == [False, False, True, True, True, False]  # a 1-token prompt: nothing shared
    assert batch.unpacked_tokens == 2 * 2 * 4  # torchtune's (2B, T) layout: what throughput counts
    padded = collate_pairs([PairIds([1, 2], [3], [4]), PairIds([6], [7], [8, 9, 10])], pad_id=0, pack_within=6)
    assert padded.input_ids[0].tolist() == [1, 2, 3, 2, 4, 0] and padded.mask[0, 5].tolist() == [True, False, False, False, False, True]


def test_collate_packs_where_it_costs_less():
    """Attention scores cost 1/hidden_dim of a position each: a prompt with short replies packs (the
    prompt runs once), the same prompt with long replies does not on a narrow model (a row twice as
    long computes four times the scores)."""
    short_replies = [PairIds(list(range(1, 41)), list(range(50, 60)), list(range(60, 70)))] * 2
    long_replies = [PairIds(list(range(1, 41)), list(range(50, 150)), list(range(150, 250)))] * 2
    assert collate_pairs(short_replies, pad_id=0, pack_within=512, hidden_dim=64).mask is not None
    assert collate_pairs(long_replies, pad_id=0, pack_within=512, hidden_dim=64).mask is None
    assert collate_pairs(long_replies, pad_id=0, pack_within=512, hidden_dim=4096).mask is not None  # a wide model's layers outweigh its scores


@pytest.mark.parametrize("pack_within", [None, 5])
def test_collate_falls_back_to_chosen_over_rejected_rows_past_the_context(pack_within):
    batch = collate_pairs([PairIds([1, 2], [3, 4], [5]), PairIds([6], [7], [8, 9, 10])], pad_id=0, pack_within=pack_within)
    assert batch.mask is None and batch.input_pos is None
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
    X = IGNORE_INDEX
    assert batch.targets.tolist() == [[X, 3, 4, X], [7, X, X, X], [X, 5, X, X], [8, 9, 10, X]]
    assert batch.sequences.tolist() == [[-1, 0, 0, -1], [1, -1, -1, -1], [-1, 2, -1, -1], [3, 3, 3, -1]]


@pytest.mark.parametrize("packed", [True, False])
def test_response_logprobs_match_torchtune_on_full_logits(policy, packed):
    """Packed or not, each response scores what torchtune's recipe computes on its own
    (prompt + response) row with full logits."""
    pairs = [
        encode_pair([1, 2, 3], [40, 41, 42, 43], [50, 51]),
        encode_pair([1, 2, 3, 4, 5], [60], [70, 71, 72, 73, 74, 75]),
    ]
    batch = collate_pairs(pairs, pad_id=0, pack_within=512 if packed else None)
    assert (batch.mask is not None) == packed
    out = pair_logprobs(policy, batch)
    unpacked = collate_pairs(pairs, pad_id=0)
    labels = torch.full_like(unpacked.input_ids, IGNORE_INDEX)  # torchtune's layout: unshifted labels
    labels[:, 1:] = unpacked.targets[:, :-1]
    expected = rlhf.get_batch_log_probs(policy(unpacked.input_ids), labels)
    assert torch.allclose(torch.cat([out.chosen, out.rejected]), expected, atol=1e-5)
    assert out.chosen_tokens.tolist() == [4, 1] and out.rejected_tokens.tolist() == [2, 6]
    averaged = out.averaged()
    assert torch.allclose(averaged.rejected, out.rejected / torch.tensor([2.0, 6.0]))
    # gradients flow only through the scored positions' projection
    (out.chosen.sum() + out.rejected.sum()).backward()
    assert policy.output.weight.grad is not None and math.isfinite(policy.output.weight.grad.abs().sum().item())
    policy.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [7, 300_000])  # one chunk of rows; many chunks of 3 rows
def test_token_logprobs_and_their_gradient_equal_autograd_on_fp32_logits(dtype, vocab):
    """The chunked log-softmax gives autograd's numbers (fp32 log-probs, a gradient in the logits'
    dtype) and leaves the logits it saved untouched, fp32 ones included (its chunks are copies)."""
    torch.manual_seed(0)
    logits = (torch.randn(10, vocab) * 4).to(dtype)
    targets = torch.randint(0, vocab, (10,))
    upstream = torch.randn(10)
    expected_in = logits.clone().requires_grad_()
    fp32 = expected_in.float()
    expected = fp32.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(fp32, dim=-1)
    expected.backward(upstream)
    fused_in = logits.clone().requires_grad_()
    out = token_logprobs(fused_in, targets)
    out.backward(upstream)
    assert out.dtype == torch.float32 and fused_in.grad.dtype == dtype
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(fused_in.grad.float(), expected_in.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-3)
    assert torch.equal(fused_in.detach(), logits)
    with torch.no_grad():
        assert torch.allclose(token_logprobs(logits, targets), expected.detach(), atol=1e-5)


def test_sequence_logprobs_scores_each_row_as_a_pair_scores_its_chosen_response(policy):
    rows = [([1, 2, 3], [40, 41, 42, 43]), ([1, 2, 3, 4, 5], [60])]
    sums, counts = sequence_logprobs(policy, *collate_responses(rows, pad_id=0))
    pairs = collate_pairs([encode_pair(prompt, response, [7]) for prompt, response in rows], pad_id=0, pack_within=512)
    assert torch.allclose(sums, pair_logprobs(policy, pairs).chosen, atol=1e-5)
    assert counts.tolist() == [4, 1]


def test_forward_only_passes_use_flash_attention_and_score_the_same(policy):
    """Reference, eval and precomputed passes run the faster flash forward; training keeps the math
    backend (whose backward is the fast one on CPU), and both score the same log-probs."""
    batch = collate_pairs([encode_pair(list(range(1, 40)), list(range(60, 90)), [7, 8, 9])] * 2, pad_id=0, pack_within=512)

    def scored(grad: bool):
        with torch.profiler.profile() as prof, torch.set_grad_enabled(grad):
            out = pair_logprobs(policy, batch)
        ops = {e.name for e in prof.events()}
        return torch.cat([out.chosen, out.rejected]).detach(), ops

    reference, ops = scored(grad=False)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops and "aten::_scaled_dot_product_attention_math" not in ops
    trained, ops = scored(grad=True)
    assert "aten::_scaled_dot_product_attention_math" in ops and "aten::_scaled_dot_product_flash_attention_for_cpu" not in ops
    assert torch.allclose(reference, trained, rtol=1e-5, atol=1e-4)


def test_compiled_layers_take_any_batch_and_length_without_recompiling(policy):
    """compile=true: one kernel for every (batch, length), so a resumed run runs the kernels an
    uninterrupted one ran, while the weights' shapes stay static (faster under FSDP2)."""
    compile_training([policy], DPOLoss(), verbose=False)
    try:
        batch = collate_pairs([encode_pair([1, 2, 3], [4, 5, 6, 7], [8])] * 2, pad_id=0, pack_within=512)
        pair_logprobs(policy, batch).chosen.sum().backward()
        longer = collate_pairs([encode_pair(list(range(1, 12)), list(range(20, 33)), [8])] * 3, pad_id=0, pack_within=512)
        with torch._dynamo.config.patch(error_on_recompile=True):
            pair_logprobs(policy, longer).chosen.sum().backward()
    finally:
        torch._dynamo.reset()
