"""Offline DPO-family training on a preference dataset (prompt, chosen, rejected).

    tune run rlaif_recipes/recipes/dpo.py --config dpo loss=ipo
    tune run --nproc_per_node 2 rlaif_recipes/recipes/dpo.py --config dpo      # FSDP2 (gloo on CPU)
    rlaif run dpo reference=precomputed model=hf_lora resume_from_checkpoint=true

The loss is a config group (`loss=dpo|ipo|hinge|dpo_norm`, or any `_component_` with torchtune's
DPO loss signature). The reference policy is either a frozen copy of the starting weights
(`reference: model`; with LoRA, the same model with its adapters switched off), or its log-probs,
computed once and cached under `reference_cache_dir` keyed by the tokenised data and the
reference weights (`reference: precomputed`), so training skips the reference forward pass.

Each optimizer step takes the next `batch_size * gradient_accumulation_steps * world_size` pairs of
a per-epoch permutation fixed by the seed; rank r takes its slices of them, and the loss is scaled
so that FSDP2's averaged gradient is the mean over the whole global batch (so 1 and 2 processes
train the same way). The permutation and the step count are all a resume needs to continue the
data exactly where it stopped. Checkpoints (`checkpointing.py`) are HF model directories (LoRA
merged in) with the optimizer, scheduler, RNG and data position beside them.
"""

import contextlib
import hashlib
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune import config, training, utils
from torchtune.modules.peft import disable_adapter, get_adapter_params, set_trainable_params
from tqdm import tqdm

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.checkpointing import (
    CheckpointManager,
    checkpoint_bytes,
    gather_optimizer_state,
    load_optimizer_state,
    planned_saves,
    restore_rng_state,
    rng_state,
)
from rlaif_recipes.data.preferences import tokenize_preferences
from rlaif_recipes.distributed import (
    destroy_process_group,
    gather_from_ranks,
    in_lockstep,
    init_process_group,
    peers_lost_as_error,
)
from rlaif_recipes.dpo_training import add_up, clip_grad_norm, dpo_loss, lr_schedule, pair_metrics, pair_sums
from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.files import atomic_write, weights_stamp
from rlaif_recipes.logprobs import PairBatch, PairIds, PairLogprobs, collate_pairs, pair_logprobs
from rlaif_recipes.lora import adapter_shapes, fresh_adapters, merged_weights
from rlaif_recipes.models import check_checkpoint_dir
from rlaif_recipes.models.hf_model import hf_config
from rlaif_recipes.policy import (
    build_policy,
    check_optimizer,
    check_training_settings,
    compile_seconds,
    compile_training,
    device_and_dtype,
    full_cpu_state_dict,
)
from rlaif_recipes.run_dir import claim, run_identity

log = utils.get_logger("INFO")

REFERENCE_CACHE_VERSION = 1
PAD_ID = 0  # padded positions are never scored, so any valid id works
# settings that do not change what the run trains: a resumed run may change them
RUNTIME_KEYS = (
    "device", "checkpointer", "reference_cache_dir", "max_steps", "eval_every_n_steps", "save_every_n_steps",
    "keep_last_checkpoints", "resume_from_checkpoint", "metric_logger", "log_every_n_steps",
    "enable_activation_checkpointing", "distributed_timeout_s",
)


@dataclass
class DPOSettings:
    output_dir: str
    seed: int
    device: str
    dtype: str
    checkpoint_dir: str
    model: Any
    checkpointer: Any
    loss: Any
    dataset: Any
    eval_dataset: Any
    max_seq_len: Optional[int]
    reference: str
    reference_cache_dir: str
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    max_steps: Optional[int]
    optimizer: Any
    lr_scheduler: Any
    clip_grad_norm: Optional[float]
    enable_activation_checkpointing: bool
    compile: bool
    pack_pairs: bool
    distributed_timeout_s: float
    eval_every_n_steps: Optional[int]
    save_every_n_steps: Optional[int]
    keep_last_checkpoints: Optional[int]
    resume_from_checkpoint: bool
    metric_logger: Any
    log_every_n_steps: int


STEP_COUNTS = tuple(
    (key, lambda v: v >= 1, "must be >= 1 (a run that trains no step is not a run)") for key in ("batch_size", "gradient_accumulation_steps", "epochs", "max_steps")
) + tuple(
    (key, lambda v: v >= 1, "a cadence in steps must be >= 1 (null where the config allows it: at the start and end only)")
    for key in ("log_every_n_steps", "eval_every_n_steps", "save_every_n_steps")
)


class DPORecipe:
    def __init__(self, cfg: DictConfig) -> None:
        """Every check that needs no model: settings, checkpoint, optimizer, output directory."""
        if cfg.reference not in ("model", "precomputed"):
            raise ConfigError(f"reference={cfg.reference!r}; use reference=model or reference=precomputed")
        rlaif_config.check_ranges(cfg, STEP_COUNTS)
        self._device, self._dtype = device_and_dtype(cfg.device, cfg.dtype)
        check_training_settings(cfg)
        check_checkpoint_dir(cfg.checkpoint_dir, cfg.model)
        self._optimizer_state_share = check_optimizer(cfg.optimizer, cfg.lr_scheduler, dtype=self._dtype, device=self._device)
        self._loss_fn = config.instantiate(cfg.loss)  # its own checks (IPO's tau, RPO's alpha) before the model loads
        self._world_size, self._rank = utils.get_world_size_and_rank()
        claim(cfg.output_dir, "dpo", run_identity(cfg, RUNTIME_KEYS, weights=weights_stamp(cfg.checkpoint_dir)),
              outputs=("checkpoints",), fresh=not cfg.resume_from_checkpoint)
        self._is_rank_zero = self._rank == 0
        self._output_dir = Path(cfg.output_dir)
        self._batch_size = cfg.batch_size
        self._accum = cfg.gradient_accumulation_steps
        self._global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * self._world_size
        self._seed = training.set_seed(seed=cfg.seed)
        self._clip_grad_norm = cfg.clip_grad_norm
        self._log_every = cfg.log_every_n_steps
        self._eval_every = cfg.eval_every_n_steps
        self._save_every = cfg.save_every_n_steps
        self._metric_logger = None
        self.global_step = 0

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        self._train = self._load_pairs(cfg, "dataset")
        self._eval = self._load_pairs(cfg, "eval_dataset") if cfg.eval_dataset is not None else []
        if len(self._train) < self._global_batch:
            raise DataError(
                f"{len(self._train)} training pairs cannot fill one global batch of {self._global_batch} "
                "(batch_size x gradient_accumulation_steps x world size); lower batch_size or add data"
            )
        self._steps_per_epoch = len(self._train) // self._global_batch
        # the lr schedule spans all epochs; max_steps only stops early (a later run resumes on schedule)
        self._schedule_steps = cfg.epochs * self._steps_per_epoch
        self._total_steps = min(self._schedule_steps, cfg.max_steps if cfg.max_steps is not None else self._schedule_steps)
        self._data_key = _data_key(self._train + self._eval)

        base = config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
        self._lora = adapter_shapes(cfg.model)
        self._checkpoints = CheckpointManager(
            str(self._output_dir / "checkpoints"),
            cfg.checkpoint_dir,
            fingerprint=self._fingerprint(cfg),
            keep_last=cfg.keep_last_checkpoints,
        )
        resumed = self._checkpoints.load() if cfg.resume_from_checkpoint else None

        adapters = (resumed.state["adapter"] if resumed else fresh_adapters(self._lora, self._seed)) if self._lora else {}
        weights = {**base, **adapters} if self._lora or resumed is None else resumed.model
        self._model = build_policy(
            cfg.model,
            weights,
            device=self._device,
            dtype=self._dtype,
            activation_checkpointing=cfg.enable_activation_checkpointing,
        )
        training.disable_dropout(self._model)
        if self._lora:
            set_trainable_params(self._model, get_adapter_params(self._model))
        start = resumed.step if resumed else 0
        self._checkpoints.check_room(checkpoint_bytes(self._model, self._optimizer_state_share), planned_saves(start, self._total_steps, self._save_every))
        self._pack_within = self._model.max_seq_len if cfg.pack_pairs else None  # see logprobs.collate_pairs
        self._hidden_dim = self._model.tok_embeddings.embedding_dim

        self._ref_model = None
        self._ref_train = self._ref_eval = None
        if cfg.reference == "model" and not self._lora:
            self._ref_model = self._frozen_copy(cfg, base)
        elif cfg.reference == "precomputed":
            self._ref_train, self._ref_eval = self._precomputed_reference(cfg, base, fresh=resumed is None)
        del base

        if cfg.compile:  # after the precomputed reference: that one-time pass runs eagerly
            models = [m for m in (self._model, self._ref_model) if m is not None]
            self._loss_fn = compile_training(models, self._loss_fn, verbose=self._is_rank_zero)
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        self._optimizer = config.instantiate(cfg.optimizer, trainable)
        base_lrs = [group["lr"] for group in self._optimizer.param_groups]
        if resumed is not None:
            self._restore(resumed)
        self._lr_scheduler = lr_schedule(cfg.lr_scheduler, self._optimizer, base_lrs, self._schedule_steps, self.global_step)
        if self._is_rank_zero:
            rlaif_config.save(cfg, str(self._output_dir))
            self._metric_logger = config.instantiate(cfg.metric_logger)
            log.info(
                f"{len(self._train)} training pairs, {len(self._eval)} eval pairs; {self._total_steps} steps of "
                f"{self._global_batch} pairs; reference={cfg.reference}; lora={bool(self._lora)}; "
                f"loss={type(self._loss_fn).__name__}; starting at step {self.global_step}"
            )

    def _load_pairs(self, cfg: DictConfig, key: str) -> List[PairIds]:
        ds = tokenize_preferences(rlaif_config.instantiate(cfg[key], key), cfg.checkpoint_dir, cfg.max_seq_len)
        return [PairIds(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]

    def _fingerprint(self, cfg: DictConfig) -> Dict[str, Any]:
        """What a resumed run must share with the saved one (a mismatch fails with one line)."""
        shape = {k: v for k, v in hf_config(cfg.checkpoint_dir).items() if k.endswith(("_size", "_layers", "_heads"))}
        return {
            "recipe": "dpo",
            "model": shape,
            "lora": {k: list(v) for k, v in sorted(self._lora.items())} or None,
            "data": self._data_key,
            "global_batch_size": self._global_batch,
        }

    def _frozen_copy(self, cfg: DictConfig, base: Dict[str, torch.Tensor]) -> nn.Module:
        model = build_policy(cfg.model, base, device=self._device, dtype=self._dtype)
        training.disable_dropout(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad = False
        return model

    def _precomputed_reference(self, cfg: DictConfig, base, fresh: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the train and eval pairs, from the cache or computed once now.

        Before any update the policy *is* the reference (with LoRA: adapters off), so a fresh run
        scores with it; only a resumed run with a cold cache needs a temporary frozen copy.
        """
        key = hashlib.sha256(
            json.dumps(
                {"v": REFERENCE_CACHE_VERSION, "data": self._data_key, "reference": _weights_key(cfg.checkpoint_dir),
                 "dtype": str(self._dtype), "device": self._device.type},
                sort_keys=True,
            ).encode()
        ).hexdigest()[:24]
        path = Path(cfg.reference_cache_dir) / f"reference-logps-{key}.safetensors"
        if path.is_file():
            logps = load_file(str(path))["logps"]
            utils.log_rank_zero(log, f"reference log-probs from cache {path}")
        else:
            scorer = self._model if fresh or self._lora else self._frozen_copy(cfg, base)
            start = time.perf_counter()
            with disable_adapter(scorer) if self._lora else contextlib.nullcontext():
                logps = self._score(scorer, self._train + self._eval)
            utils.log_rank_zero(log, f"reference log-probs of {len(logps)} pairs in {time.perf_counter() - start:.1f}s -> {path}")
            if self._is_rank_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp: save_file({"logps": logps}, str(tmp), metadata={"key": key, "pairs": str(len(logps))}))
        if len(logps) != len(self._train) + len(self._eval):
            raise DataError(f"reference cache {path} holds {len(logps)} pairs, expected {len(self._train) + len(self._eval)}; delete it")
        return logps[: len(self._train)], logps[len(self._train) :]

    @torch.no_grad()
    def _score(self, model: nn.Module, pairs: List[PairIds]) -> torch.Tensor:
        """(N, 4) chosen, rejected, chosen_tokens, rejected_tokens; ranks split the pairs and
        step in lockstep (every FSDP forward is a collective), then share the results."""
        mine = list(range(self._rank, len(pairs), self._world_size))
        chunks = [mine[i : i + self._batch_size] for i in range(0, len(mine), self._batch_size)]
        rows: Dict[int, List[float]] = {}
        for chunk, real in in_lockstep(chunks, filler=[0]):
            out = pair_logprobs(model, self._collate([pairs[j] for j in chunk]).to(self._device))
            if real:
                rows.update(zip(chunk, _rows(out)))
        rows = {j: r for part in gather_from_ranks(rows) for j, r in part.items()}
        return torch.tensor([rows[j] for j in range(len(pairs))], dtype=torch.float32)

    def _restore(self, resumed) -> None:
        state = resumed.state
        load_optimizer_state(self._model, self._optimizer, state["optimizer"] if self._is_rank_zero else {})
        restore_rng_state(state["rng"], self._rank, self._world_size)
        self.global_step = state["global_step"]
        utils.log_rank_zero(log, f"resumed from {resumed.path} at step {self.global_step}")

    # ---- training -------------------------------------------------------------------------------

    def _step_pairs(self, step: int) -> List[List[int]]:
        """Dataset indices of this rank's micro-batches for optimizer step `step`."""
        epoch, k = divmod(step, self._steps_per_epoch)
        order = torch.randperm(len(self._train), generator=torch.Generator().manual_seed(self._seed * 1_000_003 + epoch))
        step_idx = order[k * self._global_batch : (k + 1) * self._global_batch].tolist()
        b = self._batch_size
        return [step_idx[(m * self._world_size + self._rank) * b :][:b] for m in range(self._accum)]

    def _forward(self, idx: List[int], pairs: List[PairIds], ref: Optional[torch.Tensor]) -> Tuple[PairLogprobs, PairLogprobs, int]:
        batch = self._collate([pairs[i] for i in idx]).to(self._device)
        policy = pair_logprobs(self._model, batch)
        with torch.no_grad():
            if ref is not None:
                r = ref[idx].to(self._device)
                reference = PairLogprobs(r[:, 0], r[:, 1], r[:, 2], r[:, 3])
            elif self._ref_model is not None:
                reference = pair_logprobs(self._ref_model, batch)
            else:
                with disable_adapter(self._model):
                    reference = pair_logprobs(self._model, batch)
        return policy, reference, batch.unpacked_tokens

    def _collate(self, pairs: List[PairIds]) -> PairBatch:
        return collate_pairs(pairs, PAD_ID, self._pack_within, self._hidden_dim)

    def train(self) -> None:
        self._model.train()
        if self.global_step == 0 and self._eval:
            self._log(self.evaluate(), 0)
        bar = tqdm(total=self._total_steps, initial=self.global_step, disable=not self._is_rank_zero, desc="dpo")
        t0 = time.perf_counter()
        while self.global_step < self._total_steps:
            sums: Counter = Counter()
            compile_start = compile_seconds()
            for idx in self._step_pairs(self.global_step):
                policy, reference, n_tokens = self._forward(idx, self._train, self._ref_train)
                losses, chosen_rewards, rejected_rewards = dpo_loss(self._loss_fn, policy, reference)
                (losses.mean() / self._accum).backward()
                sums.update(pair_sums(losses, chosen_rewards, rejected_rewards, policy, reference))
                sums["tokens"] += n_tokens
            grad_norm = self._step_optimizer()
            self.global_step += 1
            total = add_up(gather_from_ranks(sums))  # equal shares per rank: means over the global batch
            metrics = {**pair_metrics(total), "tokens": total["tokens"]}
            compiled = compile_seconds() - compile_start  # torch.compile at work (compile=true), not training: logged apart
            elapsed, t0 = time.perf_counter() - t0 - compiled, time.perf_counter()
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if self.global_step % self._log_every == 0 or self.global_step == self._total_steps:
                metrics["tokens_per_second_per_gpu"] = metrics.pop("tokens") / (elapsed * self._world_size)
                metrics["lr"] = self._optimizer.param_groups[0]["lr"]
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                if compiled:
                    metrics["compile_seconds"] = compiled
                self._log({**metrics, **self._memory()}, self.global_step)
            done = self.global_step == self._total_steps
            if self._eval and (done or (self._eval_every and self.global_step % self._eval_every == 0)):
                self._log(self.evaluate(), self.global_step)
                t0 = time.perf_counter()
            if done or (self._save_every and self.global_step % self._save_every == 0):
                self.save_checkpoint()
                t0 = time.perf_counter()
        bar.close()

    def _step_optimizer(self) -> Optional[float]:
        grad_norm = clip_grad_norm(self._model, self._clip_grad_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return grad_norm

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Loss and reward accuracy on the held-out pairs (a tie counts half). Every rank scores
        every eval pair: FSDP forwards are collectives, and eval sets are small."""
        self._model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for i in range(0, len(self._eval), self._batch_size):
            idx = list(range(i, min(i + self._batch_size, len(self._eval))))
            policy, reference, _ = self._forward(idx, self._eval, self._ref_eval)
            losses, chosen_rewards, rejected_rewards = dpo_loss(self._loss_fn, policy, reference)
            margin = (chosen_rewards - rejected_rewards).double().cpu()
            sums += torch.stack([losses.double().sum().cpu(), ((margin > 0).double() + 0.5 * (margin == 0).double()).sum(), margin.sum()])
        self._model.train()
        loss, acc, margin = (sums / len(self._eval)).tolist()
        return {"eval/loss": loss, "eval/rewards/accuracies": acc, "eval/rewards/margins": margin}

    def _memory(self) -> Dict[str, float]:
        if self._device.type == "cuda":
            return training.get_memory_stats(device=self._device)
        return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}

    def _log(self, metrics: Dict[str, float], step: int) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict({k: float(v) for k, v in metrics.items()}, step=step)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """HF weights (LoRA merged) + everything an exact resume needs; a collective under FSDP."""
        weights = full_cpu_state_dict(self._model, self._is_rank_zero, self._device)
        optimizer = gather_optimizer_state(self._model, self._optimizer)
        rngs = gather_from_ranks(rng_state())
        if self._is_rank_zero:
            adapter = {k: v for k, v in weights.items() if k in self._lora}
            if self._lora:
                weights = merged_weights(self._model, weights)
            epoch, k = divmod(self.global_step, self._steps_per_epoch)
            state = {
                "optimizer": optimizer,
                "rng": rngs,
                "global_step": self.global_step,
                "data_position": {"epoch": epoch, "step_in_epoch": k},
                "seed": self._seed,
                "adapter": adapter,
            }
            path = self._checkpoints.save(self.global_step, weights, state)
            log.info(f"saved checkpoint {path}")
        if self._world_size > 1:
            dist.barrier()

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()


def _rows(out: PairLogprobs) -> List[List[float]]:
    return torch.stack([out.chosen, out.rejected, out.chosen_tokens.float(), out.rejected_tokens.float()], dim=1).float().cpu().tolist()


def _data_key(pairs: List[PairIds]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()[:24]


def _weights_key(checkpoint_dir: str) -> str:
    """Content hash of the reference weights and config (a changed file changes the key)."""
    h = hashlib.sha256()
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")) + [Path(checkpoint_dir) / "config.json"]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


@rlaif_config.parse(DPOSettings)
def recipe_main(cfg: DictConfig) -> None:
    distributed = training.is_distributed()
    if distributed:
        init_process_group(cfg.distributed_timeout_s)
    recipe = DPORecipe(cfg)
    try:
        with peers_lost_as_error(cfg.output_dir):
            recipe.setup(cfg)
            recipe.train()
    finally:
        recipe.cleanup()
        if distributed:
            destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
