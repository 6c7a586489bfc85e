"""Online DPO with AI feedback (OAIF, Guo et al. 2024): sample -> judge -> train -> sync, every step.

    tune run rlaif_recipes/recipes/online_dpo.py --config online_dpo judge=rule loss=ipo
    tune run --nproc_per_node 2 rlaif_recipes/recipes/online_dpo.py --config online_dpo
    rlaif online-dpo resume_from_checkpoint=true       # continue a killed run exactly

Each step draws `prompts_per_step` prompts, the sampler produces `n` responses per prompt from the
current policy, the judge compares them (all pairs when n > 2) and the best and the worst by wins
become (chosen, rejected) if the judge's direct verdict between them is a win; ties and abstains are
dropped and counted, never guessed. One DPO-family optimizer step follows (the reference is a frozen
copy of the initial policy), and every `sync_every` steps the new weights go into the sampler.

With an API judge each prompt's judging starts as soon as its samples exist (vLLM hands on a
prompt while longer ones still generate); a judge that drives its own engine gets the whole step
in one call. With `async_steps: k > 0` the loop does not wait on its judge: each step's prompts are
sampled up to k steps before the step trains, from the weights the sampler holds then, and judged
on background threads (an API judge works on several steps at once) while the trainer trains the
steps before it. A trained pair is then up to k
steps stale (logged per step as `staleness`: the step minus the step whose weights sampled it).
Sampling itself stays in turn with training (one process, one engine); with the torchtune sampler
it uses the live policy as it is k steps before, exactly as the vLLM sampler with its last sync.
A checkpoint holds the steps sampled ahead, so a resumed run judges the same samples again (from
the cache where the killed run's judgments arrived) and ends with the same weights.

Under torchrun every rank takes every world_size-th prompt of the step, samples with its own
sampler, judges its own share (each rank caches its judgments in a SQLite file of its own), and the update is
data-parallel with FSDP2: the loss is scaled so that the averaged gradient is the mean over all
ranks' pairs. Everything a run produces lands under output_dir: run.json (what produced it),
config.yaml, metrics.jsonl, steps/step-XXXXX.parquet (prompts, responses, every judgment, the pair
chosen), the judge cache, logs/, checkpoints/ and summary.json. A fresh run needs a new output_dir;
a resumed one must have the same settings (`rlaif_recipes.run_dir`).

A step in which every prompt tied or abstained trains nothing and says so; `max_steps_without_pairs`
such steps in a row stop the run with an error, and so does a run that trained no pair at all.
"""

import json
import sys
import time
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.modules.peft import disable_adapter, get_adapter_params, set_trainable_params
from tqdm import tqdm

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.checkpointing import (
    Checkpoint,
    CheckpointManager,
    checkpoint_bytes,
    gather_optimizer_state,
    load_optimizer_state,
    planned_saves,
    restore_rng_state,
    rng_state,
)
from rlaif_recipes.data.prompts import prompts_fingerprint
from rlaif_recipes.distributed import (
    destroy_process_group,
    gather_from_ranks,
    in_lockstep,
    init_process_group,
    peers_lost_as_error,
    sum_over_ranks,
)
from rlaif_recipes.dpo_training import add_up, clip_grad_norm, dpo_loss, lr_schedule, pair_metrics, pair_sums
from rlaif_recipes.errors import CheckpointError, ConfigError, DataError, TrainingError
from rlaif_recipes.files import atomic_write, atomic_write_text, weights_stamp
from rlaif_recipes.judges import Judgment, Pair, Verdict
from rlaif_recipes.judges.api import APIJudge
from rlaif_recipes.logprobs import PairBatch, PairIds, PairLogprobs, collate_pairs, encode_pair, pair_logprobs
from rlaif_recipes.lora import adapter_shapes, fresh_adapters, merge_adapters, merged_weights
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
    streamed_state_dict,
)
from rlaif_recipes.run_dir import claim, run_identity
from rlaif_recipes.samplers.base import Completion, PromptSamples, check_pair_sampling, derive_seed
from rlaif_recipes.vllm_engine import check_engine_settings

log = utils.get_logger("INFO")

# settings that do not change what the run trains: a resumed run may change them
RUNTIME_KEYS = (
    "device", "checkpointer", "max_steps", "micro_batch_size", "save_every_n_steps", "keep_last_checkpoints",
    "resume_from_checkpoint", "save_steps", "max_steps_without_pairs", "metric_logger", "dry_run",
    "enable_activation_checkpointing", "distributed_timeout_s",
)
OUTPUTS = ("checkpoints", "steps", "metrics.jsonl")  # what a run writes, and a fresh run must not find


@dataclass
class OnlineDPOSettings:
    output_dir: str
    seed: int
    device: str
    dtype: str
    max_steps: int
    prompts_per_step: int
    n: int
    micro_batch_size: int
    max_seq_len: Optional[int]
    sync_every: int
    save_every_n_steps: Optional[int]
    keep_last_checkpoints: Optional[int]
    resume_from_checkpoint: bool
    clip_grad_norm: Optional[float]
    enable_activation_checkpointing: bool
    compile: bool
    pack_pairs: bool
    distributed_timeout_s: float
    save_steps: bool
    max_steps_without_pairs: Optional[int]
    async_steps: int
    dry_run: bool
    checkpoint_dir: str
    model: Any
    checkpointer: Any
    sampler: Any
    judge: Any
    rubric: Any
    loss: Any
    data: Any
    optimizer: Any
    lr_scheduler: Any
    metric_logger: Any


class OnlineDPORecipe:
    def __init__(self, cfg: DictConfig) -> None:
        """Every check that needs no model or engine: settings, checkpoint, optimizer, output directory."""
        self._world_size, self._rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self._rank == 0
        _check_settings(cfg, self._world_size)
        check_pair_sampling(cfg.sampler, cfg.n)
        check_engine_settings("sampler", cfg.sampler)
        self._device, self._dtype = device_and_dtype(cfg.device, cfg.dtype)
        check_training_settings(cfg)
        check_checkpoint_dir(cfg.checkpoint_dir, cfg.model)
        self._optimizer_state_share = check_optimizer(cfg.optimizer, cfg.lr_scheduler, dtype=self._dtype, device=self._device)
        self._loss_fn = config.instantiate(cfg.loss)  # its own checks (IPO's tau, RPO's alpha) before the model loads
        claim(cfg.output_dir, "online_dpo", run_identity(cfg, RUNTIME_KEYS, weights=weights_stamp(cfg.checkpoint_dir)),
              outputs=OUTPUTS, fresh=not cfg.resume_from_checkpoint)
        self._output_dir = Path(cfg.output_dir)
        self._seed = cfg.seed
        self._max_steps = cfg.max_steps
        self._prompts_per_step = cfg.prompts_per_step
        self._n = cfg.n
        self._micro_batch_size = cfg.micro_batch_size
        self._max_seq_len = cfg.max_seq_len
        self._sync_every = cfg.sync_every
        self._save_every = cfg.save_every_n_steps
        self._clip_grad_norm = cfg.clip_grad_norm
        self._save_steps = cfg.save_steps
        self._max_steps_without_pairs = cfg.max_steps_without_pairs
        self.global_step = 0  # finished steps
        self._run = Counter()  # this run's steps, pairs, ties and abstains (rank 0): the summary
        self._steps_without_pairs = 0  # in a row, up to now
        self._prompts_seen = 0  # position in the endless stream of shuffled epochs
        self._async_steps = cfg.async_steps
        self._sampler_step = 0  # the step whose weights the sampler holds
        self._ahead: Deque[Draft] = deque()  # steps sampled (and being judged) before their turn to train
        self._resumed_ahead: List[Dict[str, Any]] = []  # the same, as a checkpoint holds them
        self._judge_totals: Counter = Counter()  # judge requests / cache hits of all ranks over the run (rank 0)
        self._sampler = self._judge = self._metric_logger = None
        training.set_seed(seed=cfg.seed)  # torchtune adds the rank

    def setup(self, cfg: DictConfig) -> None:
        """Data, models, optimizer and the loop state (from the latest checkpoint when resuming),
        then the sampler and the judge, which get the policy's current weights."""
        self._prompts = rlaif_config.instantiate(cfg.data, "data")
        if len(self._prompts) == 0:
            raise DataError(f"the prompt dataset is empty after filtering; check data.* ({dict(cfg.data)})")
        self._judge = config.instantiate(cfg.judge)  # before the models: a bad judge fails in seconds
        if (isinstance(self._judge, APIJudge) or getattr(self._judge, "escalate", None) is not None) and self._is_rank_zero:
            log.info(self._judge_cost(cfg.sampler.max_tokens))
        if cfg.dry_run:
            return
        self._lora = adapter_shapes(cfg.model)
        self._checkpoints = CheckpointManager(
            str(self._output_dir / "checkpoints"),
            source_dir=cfg.checkpoint_dir,
            keep_last=cfg.keep_last_checkpoints,
            # what a resumed run must share with the saved one, or its state would not fit
            fingerprint={
                "recipe": "online_dpo",
                "model": {k: v for k, v in hf_config(cfg.checkpoint_dir).items() if not k.endswith("token_id")},
                "prompts": prompts_fingerprint(self._prompts),
                "n": self._n,
                "lora": {k: list(v) for k, v in sorted(self._lora.items())} or None,
            },
        )
        resume = self._resume_checkpoint(cfg.resume_from_checkpoint)
        initial = config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
        if self._lora:  # the policy is base + adapters; the reference is the same model, adapters off
            adapters = resume.state["adapter"] if resume else fresh_adapters(self._lora, self._seed)
            self._model = build_policy(cfg.model, {**initial, **adapters}, device=self._device, dtype=self._dtype,
                                       activation_checkpointing=cfg.enable_activation_checkpointing)
            set_trainable_params(self._model, get_adapter_params(self._model))
            self._ref_model = None
        else:
            weights = resume.model if resume else initial
            self._model = build_policy(cfg.model, weights, device=self._device, dtype=self._dtype,
                                       activation_checkpointing=cfg.enable_activation_checkpointing)
            self._ref_model = build_policy(cfg.model, initial, device=self._device, dtype=self._dtype)
            self._ref_model.eval().requires_grad_(False)
        training.disable_dropout(self._model)
        del initial
        self._optimizer = config.instantiate(cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        base_lrs = [group["lr"] for group in self._optimizer.param_groups]
        if resume is not None:
            self._restore(resume)
        # a function of the step: a resumed run picks it up at its step, also when max_steps changed
        self._lr_scheduler = lr_schedule(cfg.lr_scheduler, self._optimizer, base_lrs, self._max_steps, self.global_step)
        self._checkpoints.check_room(checkpoint_bytes(self._model, self._optimizer_state_share), planned_saves(self.global_step, self._max_steps, self._save_every))
        self._compile = cfg.compile
        self._pack_within = self._model.max_seq_len if cfg.pack_pairs else None  # see logprobs.collate_pairs
        self._hidden_dim = self._model.tok_embeddings.embedding_dim
        if self._compile:
            models = [m for m in (self._model, self._ref_model) if m is not None]
            self._loss_fn = compile_training(models, self._loss_fn, verbose=self._is_rank_zero)
        self._sampler = config.instantiate(cfg.sampler)
        self._sampler.bind_policy(self._model)
        if self.global_step > 0 and not self._sampler.uses_live_policy:
            self._sampler.update_weights(self._sampler_weights())
        self._pad_id = self._sampler.tokenizer.pad_token_id or 0
        if self._is_rank_zero:
            rlaif_config.save(cfg, str(self._output_dir))
            self._metric_logger = config.instantiate(cfg.metric_logger)
            _drop_after(self._output_dir, self.global_step)

    def train(self) -> None:
        bar = tqdm(initial=self.global_step, total=self._max_steps, desc="online_dpo", unit="step", disable=not self._is_rank_zero)
        # an API judge takes every prompt of this step and of the steps ahead at once (its own
        # max_concurrency caps the requests); a judge that drives an engine of its own takes one
        # step at a time, in step order
        per_rank = self._prompts_per_step // self._world_size
        workers = per_rank * (self._async_steps + 1) if self._judge.concurrent_calls else 1
        judging = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        self._ahead = deque(self._draft(d["step"], judging, d["weights_step"], _samples_from(d["samples"])) for d in self._resumed_ahead)
        try:
            while self.global_step < self._max_steps:
                self._train_step(judging, bar)
        finally:
            judging.shutdown(wait=True, cancel_futures=True)
        bar.close()
        self._write_summary()

    def _train_step(self, judging: ThreadPoolExecutor, bar: tqdm) -> None:
        step, times = self.global_step, {}

        # 1. Prompts and samples for this step and for up to async_steps steps ahead, each drawn
        #    from the weights the sampler holds now; each step's judging starts in the background
        #    at once. Prompts are the stream's next prompts_per_step (this rank takes every
        #    world_size-th); the seed depends only on (seed, step, rank), so a resumed run samples
        #    exactly what the killed run did.
        start = time.perf_counter()
        while len(self._ahead) <= self._async_steps and step + len(self._ahead) < self._max_steps:
            self._ahead.append(self._draft(step + len(self._ahead), judging, self._sampler_step))
        self._sampler.sleep()  # vLLM on CUDA: the engine's memory goes to training until the push
        times["sample"] = time.perf_counter() - start

        # 2. This step's judgments (asked while earlier steps trained, when async_steps > 0); the
        #    best vs the worst by wins become (chosen, rejected) when the judge's own verdict between
        #    them is a win.
        start = time.perf_counter()
        draft = self._ahead.popleft()
        answers = [future.result() for future in draft.judged]
        judgments = [j for batch, _ in answers for j in batch]
        judge_delta = sum((usage for _, usage in answers), Counter())
        rows, samples, comparisons = draft.rows, draft.samples, draft.comparisons
        by_prompt: Dict[int, Dict[Tuple[int, int], Judgment]] = {p: {} for p in range(len(samples))}
        for (p, i, j), judgment in zip(comparisons, judgments):
            by_prompt[p][(i, j)] = judgment
        picks = [pick_pair(self._n, by_prompt[p]) for p in range(len(samples))]
        pairs = [
            encode_pair(s.prompt_token_ids, s.completions[pick.chosen].token_ids, s.completions[pick.rejected].token_ids, self._max_seq_len)
            for s, pick in zip(samples, picks)
            if pick.labelled
        ]
        times["judge"] = time.perf_counter() - start  # waiting for the judge: ~0 when it ran ahead

        # 3. One optimizer step on this step's pairs (gradient accumulation over micro-batches).
        #    Under FSDP2 every rank runs the same number of forward/backward passes, and each
        #    rank's loss is scaled by world_size / (pairs on all ranks), so the gradient FSDP
        #    averages is the mean over every rank's pairs.
        start, compiled = time.perf_counter(), compile_seconds()
        total_pairs = sum_over_ranks(len(pairs))
        train_stats: Counter = Counter()
        if total_pairs > 0:
            chunks = [pairs[k : k + self._micro_batch_size] for k in range(0, len(pairs), self._micro_batch_size)]
            for chunk, real in in_lockstep(chunks, filler=[_PLACEHOLDER_PAIR]):
                batch = collate_pairs(chunk, self._pad_id, self._pack_within, self._hidden_dim).to(self._device)
                policy_lp = pair_logprobs(self._model, batch)
                reference_lp = self._reference_logprobs(batch)
                losses, chosen_rewards, rejected_rewards = dpo_loss(self._loss_fn, policy_lp, reference_lp)
                scale = self._world_size / total_pairs if real else 0.0
                (losses.sum() * scale).backward()
                if real:
                    train_stats.update(pair_sums(losses, chosen_rewards, rejected_rewards, policy_lp, reference_lp))
                    train_stats["tokens"] += batch.unpacked_tokens  # padded chosen and rejected rows, as torchtune counts them
            grad_norm = clip_grad_norm(self._model, self._clip_grad_norm)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
            train_stats["grad_norm"] = grad_norm if grad_norm is not None else float("nan")
        if self._lr_scheduler is not None:  # every step, pairs or not: the schedule follows the step
            with warnings.catch_warnings():  # torch's warning for a first step without pairs (no optimizer.step) does not apply
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
                self._lr_scheduler.step()
        if self._compile:  # torch.compile at work (first steps, new shapes), not training: logged apart
            times["compile"] = compile_seconds() - compiled
        times["train"] = time.perf_counter() - start - times.get("compile", 0.0)

        # 4. Push the new weights into the sampler (full tensors: a collective under FSDP2;
        #    nothing to push when the sampler generates with the live policy, which is always current).
        start = time.perf_counter()
        if self._sampler.uses_live_policy or (step + 1) % self._sync_every == 0:
            if not self._sampler.uses_live_policy:
                self._sampler.update_weights(self._sampler_weights())
            self._sampler_step = step + 1
        times["sync"] = time.perf_counter() - start

        # 5. Bookkeeping: artefacts and metrics of this step, then (maybe) a checkpoint.
        self.global_step += 1
        self._prompts_seen += self._prompts_per_step
        stats = gather_from_ranks(_step_stats(samples, picks, judgments, judge_delta, train_stats))
        records = gather_from_ranks(self._step_records(step, rows, samples, comparisons, judgments, picks) if self._save_steps else [])
        if self._is_rank_zero:
            metrics = {**self._step_metrics(stats, times, len(rows) * self._world_size), "staleness": step - draft.weights_step}
            self._judge_totals.update(requests=metrics["judge/requests"], cache_hits=metrics["judge/cache_hits"])
            self._log(step, metrics, records)
            bar.set_postfix(win=f"{metrics['judge/win_rate_chosen']:.2f}", pairs=metrics["pairs/trained"],
                            loss=f"{metrics['loss']:.3f}")
        bar.update()

        # 6. Progress: a step without a single pair trained nothing; a run that keeps doing so stops.
        self._count_progress(step, add_up(stats), judgments)
        if self.global_step == self._max_steps or (self._save_every and self.global_step % self._save_every == 0):
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Weights (an HF model directory), optimizer, every rank's RNG state and the loop position
        (the step fixes the learning rate schedule), written atomically as
        output_dir/checkpoints/step_XXXXXXX."""
        weights = full_cpu_state_dict(self._model, self._is_rank_zero, self._device)
        optimizer = gather_optimizer_state(self._model, self._optimizer)
        rng = gather_from_ranks(rng_state())
        ahead = gather_from_ranks([{"step": d.step, "weights_step": d.weights_step, "samples": _samples_to(d.samples)} for d in self._ahead])
        if self._is_rank_zero:
            adapter = {k: v for k, v in weights.items() if k in self._lora}
            self._checkpoints.save(
                self.global_step,
                merged_weights(self._model, weights) if self._lora else weights,
                {
                    "optimizer": optimizer,
                    "rng": rng,
                    "prompts_seen": self._prompts_seen,
                    "judge_totals": dict(self._judge_totals),
                    "adapter": adapter,
                    "ahead": ahead,  # every rank's steps sampled ahead, to judge again on resume
                },
            )
        if self._world_size > 1:
            dist.barrier()

    def _count_progress(self, step: int, total: Counter, judgments: Sequence[Judgment]) -> None:
        """Count what this step trained; raise when steps keep training no pair, or the run trained none."""
        self._run.update(steps=1, pairs=total["pairs"], ties=total["dropped_tie"], abstains=total["dropped_abstain"])
        if total["pairs"]:
            self._steps_without_pairs = 0
        else:
            self._steps_without_pairs += 1
            self._run["steps_without_pairs"] += 1
            reasons = Counter(j.reason for j in judgments if not j.labelled and j.reason)
            why = f" (most often: {reasons.most_common(1)[0][0]!r})" if reasons else ""
            outcome = f"{total['dropped_tie']} prompts tied and {total['dropped_abstain']} abstained{why}"
            if self._is_rank_zero:
                log.warning(f"step {step + 1} trained no pair: {outcome}")
            limit = self._max_steps_without_pairs
            if limit is not None and self._steps_without_pairs >= limit:
                self._write_summary()
                raise TrainingError(
                    f"{self._steps_without_pairs} steps in a row (up to step {step + 1}) trained no pair: {outcome}; "
                    f"{no_pair_cause(judgments)} (read {self._output_dir / 'steps'}), or set max_steps_without_pairs=null "
                    "to go on regardless"
                )
        if self.global_step == self._max_steps and self._run["pairs"] == 0:
            self._write_summary()
            raise TrainingError(
                f"this run trained no pair in its {self._run['steps']} steps ({self._run['ties']} prompts tied, "
                f"{self._run['abstains']} abstained); no checkpoint written: fix the judge or the sampling"
            )

    def _write_summary(self) -> None:
        """output_dir/summary.json and one log line: what this run (this invocation) trained on."""
        if not self._is_rank_zero:
            return
        summary = {"last_step": self.global_step, **{k: self._run[k] for k in ("steps", "pairs", "steps_without_pairs", "ties", "abstains")}}
        atomic_write_text(self._output_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        log.info(f"this run: {summary['pairs']} pairs trained in {summary['steps']} steps ({summary['steps_without_pairs']} "
                 f"steps without pairs; {summary['ties']} prompts tied, {summary['abstains']} abstained)")

    def cleanup(self) -> None:
        if self._sampler is not None:  # first: the vLLM engine uses the trainer's process group
            self._sampler.close()
        if self._judge is not None:
            self._judge.close()
        if self._metric_logger is not None:
            self._metric_logger.close()

    # ---- helpers of setup / train ------------------------------------------------------------

    def _resume_checkpoint(self, resume: bool) -> Optional[Checkpoint]:
        """The latest checkpoint when resuming (a fresh run's empty output_dir was checked by `claim`)."""
        if not resume:
            return None
        ckpt = self._checkpoints.load()  # a clear CheckpointError if none, corrupt or incompatible
        if ckpt.step >= self._max_steps:
            raise ConfigError(
                f"checkpoint {ckpt.path} is at step {ckpt.step} and max_steps={self._max_steps}: nothing "
                "left to do; raise max_steps to train further"
            )
        return ckpt

    def _restore(self, ckpt: Checkpoint) -> None:
        """Put the loop back exactly where the checkpoint left it."""
        state = ckpt.state
        load_optimizer_state(self._model, self._optimizer, state["optimizer"] if self._is_rank_zero else {})
        restore_rng_state(state["rng"], self._rank, self._world_size)
        self.global_step, self._prompts_seen = ckpt.step, state["prompts_seen"]
        self._sampler_step = self.global_step  # the sampler gets the checkpoint's weights
        self._judge_totals = Counter(state["judge_totals"])
        ahead = state.get("ahead") or []
        if any(ahead) and len(ahead) != self._world_size:
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds steps sampled ahead (async_steps={self._async_steps}) by {len(ahead)} "
                f"rank(s); resume it on {len(ahead)} rank(s), as an exact resume needs each rank's own samples"
            )
        self._resumed_ahead = ahead[self._rank] if any(ahead) else []
        utils.log_rank_zero(log, f"resumed from {ckpt.path} at step {self.global_step}")

    def _draft(self, step: int, judging: ThreadPoolExecutor, weights_step: int, samples: Optional[List[PromptSamples]] = None) -> "Draft":
        """Step `step`'s prompts and samples (sampled now unless given: a resumed run's), with its
        judging started on the `judging` threads: each prompt's the moment its samples exist when
        the judge takes concurrent calls (API judges), else the whole step's in one call."""
        position = self._prompts_seen + (step - self.global_step) * self._prompts_per_step
        rows = self._prompts.select(self._prompt_indices(position, self._prompts_per_step)[self._rank :: self._world_size])
        per_pair = list(combinations(range(self._n), 2))
        started: Dict[int, Future] = {}

        def pairs_of(p: int, s: PromptSamples) -> List[Pair]:
            return [Pair(rows[p]["prompt"], s.completions[i].text, s.completions[j].text) for i, j in per_pair]

        def start(p: int, s: PromptSamples) -> None:
            started[p] = judging.submit(self._judge.judge_with_usage, pairs_of(p, s))

        per_prompt = self._judge.concurrent_calls
        if samples is None:
            seed = derive_seed(self._seed, "step", step, self._rank)
            samples = self._sampler.sample(list(rows["messages"]), n=self._n, seed=seed, on_prompt_done=start if per_prompt else None)
        elif per_prompt:
            for p, s in enumerate(samples):
                start(p, s)
        if per_prompt:
            judged = [started[p] for p in range(len(samples))]
        else:
            judged = [judging.submit(self._judge.judge_with_usage, [pair for p, s in enumerate(samples) for pair in pairs_of(p, s)])]
        comparisons = [(p, i, j) for p in range(len(samples)) for i, j in per_pair]
        return Draft(step, rows, samples, comparisons, weights_step, judged)

    def _judge_cost(self, max_tokens: int) -> str:
        """The API judge's bill for the rest of the run, before it starts: every step's prompts, each
        pair of responses taken at sampler.max_tokens (they do not exist yet, so nothing is cached)."""
        steps = self._max_steps - self.global_step
        response = "x" * (4 * max_tokens)  # ~4 characters per token, as the judge's own estimate counts
        prompts = self._prompts.select(self._prompt_indices(self._prompts_seen, steps * self._prompts_per_step))["prompt"]
        pairs = [Pair(p, response, response + " ") for p in prompts for _ in range(self._n * (self._n - 1) // 2)]
        return self._judge.estimate(pairs, f"{steps} steps of {self._prompts_per_step} prompts x {self._n} responses "
                                           f"(responses at sampler.max_tokens={max_tokens})")

    def _sampler_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """The policy's weights for the sampler as a stream, one full weight at a time (each an
        all-gather under FSDP2), LoRA merged in module by module."""
        weights = streamed_state_dict(self._model)
        return merge_adapters(self._model, weights) if self._lora else weights

    @torch.no_grad()
    def _reference_logprobs(self, batch: PairBatch) -> PairLogprobs:
        if self._ref_model is not None:
            return pair_logprobs(self._ref_model, batch)
        with disable_adapter(self._model):
            return pair_logprobs(self._model, batch)

    def _prompt_indices(self, start: int, count: int) -> List[int]:
        """Positions start..start+count of an endless stream of epochs, each a seeded shuffle."""
        size = len(self._prompts)
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, size)
            if getattr(self, "_perm_epoch", None) != epoch:
                g = torch.Generator().manual_seed(derive_seed(self._seed, "epoch", epoch))
                self._perm, self._perm_epoch = torch.randperm(size, generator=g).tolist(), epoch
            out.append(self._perm[offset])
        return out

    def _step_records(self, step, rows, samples, comparisons, judgments, picks) -> List[Dict[str, Any]]:
        per_prompt: Dict[int, List[Dict[str, Any]]] = {p: [] for p in range(len(samples))}
        for (p, i, j), judgment in zip(comparisons, judgments):
            per_prompt[p].append({"a": i, "b": j, **judgment.to_dict()})
        return [
            {
                "step": step,
                "rank": self._rank,
                "prompt_id": rows[p]["prompt_id"],
                "prompt": rows[p]["prompt"],
                "prompt_token_ids": s.prompt_token_ids,
                "responses": [c.text for c in s.completions],
                "response_token_ids": [c.token_ids for c in s.completions],
                "finish_reasons": [c.finish_reason for c in s.completions],
                "judgments": json.dumps(per_prompt[p], sort_keys=True),
                "label": pick.status,
                "chosen": pick.chosen if pick.labelled else None,
                "rejected": pick.rejected if pick.labelled else None,
                "prob_chosen": pick.prob_chosen,
                "source": pick.source,
            }
            for p, (s, pick) in enumerate(zip(samples, picks))
        ]

    def _step_metrics(self, stats: List[Counter], times: Dict[str, float], prompts: int) -> Dict[str, float]:
        total = add_up(stats)
        pairs = total["pairs"]
        compared = max(total["comparisons"], 1)
        step_seconds = sum(times.values())
        metrics = {
            "prompts": prompts,
            "pairs/trained": pairs,
            "pairs/dropped_tie": total["dropped_tie"],
            "pairs/dropped_abstain": total["dropped_abstain"],
            "labels/ai": total["source_ai"],
            "labels/human": total["source_human"],
            "judge/win_rate_chosen": total["prob_chosen"] / pairs if pairs else float("nan"),
            "judge/tie_rate": total["comparisons_tie"] / compared,
            "judge/settled_rate": total["comparisons_settled"] / compared,
            "judge/abstain_rate": total["comparisons_abstain"] / compared,
            "judge/requests": total["judge_requests"],
            "judge/cache_hits": total["judge_cache_hits"],
            **{k: v for k, v in total.items() if k.startswith("judge/requests@") or k == "judge/hedged"},
            "response/tokens_mean": total["response_tokens"] / max(total["responses"], 1),
            "response/stop_rate": total["responses_stopped"] / max(total["responses"], 1),
            **pair_metrics(total),
            "grad_norm": stats[0]["grad_norm"] if pairs else float("nan"),
            "lr": self._optimizer.param_groups[0]["lr"],
            **{f"time/{k}": v for k, v in times.items()},
            "time/step": step_seconds,
            "pairs_per_second": pairs / step_seconds if step_seconds else 0.0,
            "tokens/trained": total["tokens"],  # chosen + rejected rows, padded, all ranks: tokens / time/train is training throughput
            **({"memory/peak_gib": torch.cuda.max_memory_allocated(self._device) / 2**30} if self._device.type == "cuda" else {}),
        }
        return metrics

    def _log(self, step: int, metrics: Dict[str, float], records: List[List[Dict[str, Any]]]) -> None:
        self._metric_logger.log_dict(metrics, step=step + 1)
        line = json.dumps({"step": step + 1, "time": time.time(), **metrics, "judge_totals": dict(self._judge_totals)})
        with open(self._output_dir / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        rows = [r for per_rank in records for r in per_rank]
        if rows:
            steps_dir = self._output_dir / "steps"
            steps_dir.mkdir(parents=True, exist_ok=True)
            path = steps_dir / f"step-{step + 1:05d}.parquet"
            atomic_write(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))


# ---- steps sampled ahead -------------------------------------------------------------------------


@dataclass
class Draft:
    """A step's prompts and samples, drawn up to async_steps steps before it trains."""

    step: int
    rows: Any  # this rank's prompt rows (an HF dataset slice)
    samples: List[PromptSamples]
    comparisons: List[Tuple[int, int, int]]  # (prompt, i, j) for every pair of responses
    weights_step: int  # the step whose weights sampled it: staleness = step - weights_step
    judged: List["Future[Tuple[List[Judgment], Counter]]"]  # per prompt, in order (or one for the whole step)


def _samples_to(samples: List[PromptSamples]) -> List[Dict[str, Any]]:
    """Samples as plain lists and numbers (what `torch.load(weights_only=True)` reads back)."""
    return [{"prompt_token_ids": s.prompt_token_ids, "completions": [asdict(c) for c in s.completions]} for s in samples]


def _samples_from(saved: List[Dict[str, Any]]) -> List[PromptSamples]:
    return [PromptSamples(s["prompt_token_ids"], [Completion(**c) for c in s["completions"]]) for s in saved]


# ---- choosing the pair --------------------------------------------------------------------------


@dataclass
class Pick:
    status: str  # "labelled", "tie" or "abstain"
    chosen: int = -1
    rejected: int = -1
    prob_chosen: Optional[float] = None  # the judge's P(chosen preferred) (1.0 for a hard verdict)
    source: Optional[str] = None  # label provenance: "ai" or "human"

    @property
    def labelled(self) -> bool:
        return self.status == "labelled"


def no_pair_cause(judgments: Sequence[Judgment]) -> str:
    """Why a step trained no pair, and the fix. Ties the judge settled by the rubric (both right:
    two refusals of a harmful request or two answers to a benign one; both wrong: the reverse) are
    no judge failure: the policy's replies to each prompt are all alike, so it samples too narrowly
    to compare."""
    settled = Counter(j.settled for j in judgments if not j.labelled)
    if settled and set(settled) <= {"both_right", "both_wrong"}:
        return (f"each prompt's replies are all alike by the rubric ({settled['both_right']} comparisons both right, "
                f"{settled['both_wrong']} both wrong): the policy samples too narrowly to compare; raise sampler.temperature or n")  # fmt: skip
    return "the judge cannot tell the responses apart or is failing: fix the judge or raise sampler.temperature"


def pick_pair(n: int, judgments: Dict[Tuple[int, int], Judgment]) -> Pick:
    """Best vs worst of n responses from all pairwise judgments `{(i, j): judgment}`, i < j.

    Responses are ranked by wins (ties and abstains win nothing); the label is the judge's own
    verdict between the top and the bottom response, so a tie or an abstain there drops the prompt
    rather than guessing.
    """
    wins = [0] * n
    for (i, j), judgment in judgments.items():
        if judgment.verdict is Verdict.A:
            wins[i] += 1
        elif judgment.verdict is Verdict.B:
            wins[j] += 1
    best = max(range(n), key=lambda k: (wins[k], -k))
    worst = min(range(n), key=lambda k: (wins[k], -k))
    if best == worst:
        best, worst = 0, 1
    i, j = sorted((best, worst))
    judgment = judgments[(i, j)]
    if not judgment.labelled:
        return Pick(judgment.verdict.value)
    chosen, rejected = (i, j) if judgment.verdict is Verdict.A else (j, i)
    prob_a = judgment.prob_a if judgment.prob_a is not None else float(judgment.verdict is Verdict.A)
    return Pick("labelled", chosen, rejected, prob_a if chosen == i else 1.0 - prob_a, judgment.source)


# ---- small pieces -------------------------------------------------------------------------------

_PLACEHOLDER_PAIR = PairIds(prompt=[0], chosen=[0], rejected=[0])  # keeps a rank with no pairs in FSDP lockstep


def _check_settings(cfg: DictConfig, world_size: int) -> None:
    """Bad settings fail here, before any model loads."""
    checks = [
        ("max_steps", lambda: cfg.max_steps >= 1, "train at least one step (max_steps >= 1)"),
        ("micro_batch_size", lambda: cfg.micro_batch_size >= 1, "use micro_batch_size >= 1"),
        ("sync_every", lambda: cfg.sync_every >= 1, "push weights every sync_every >= 1 steps"),
        (
            "save_every_n_steps",
            lambda: cfg.save_every_n_steps is None or (cfg.save_every_n_steps >= 1 and cfg.save_every_n_steps % cfg.sync_every == 0),
            f"save_every_n_steps must be a positive multiple of sync_every={cfg.sync_every} (or null: at the end only), so a resumed "
            "sampler holds exactly the checkpoint's weights",
        ),
        (
            "prompts_per_step",
            lambda: cfg.prompts_per_step >= world_size and cfg.prompts_per_step % world_size == 0,
            f"prompts_per_step must be a positive multiple of the {world_size} rank(s), each takes an equal share",
        ),
        ("async_steps", lambda: cfg.async_steps >= 0, "sample and judge 0 (in turn) or more steps ahead"),
        (
            "max_steps_without_pairs",
            lambda: cfg.max_steps_without_pairs is None or cfg.max_steps_without_pairs >= 1,
            "stop after at least 1 step without pairs, or null to only warn",
        ),
    ]
    for key, ok, fix in checks:  # in order: a later check divides by an earlier key
        if not ok():
            raise ConfigError(f"{key}={cfg[key]}: {fix}")


def _step_stats(samples, picks: Sequence[Pick], judgments: Sequence[Judgment], judge_delta: Counter, train: Counter) -> Counter:
    """This rank's counts for the step's metrics; `train` (pair_sums over the trained pairs) holds `pairs`."""
    labelled = [p for p in picks if p.labelled]
    stats = Counter(
        dropped_tie=sum(p.status == "tie" for p in picks),
        dropped_abstain=sum(p.status == "abstain" for p in picks),
        prob_chosen=sum(p.prob_chosen for p in labelled),
        comparisons=len(judgments),
        comparisons_tie=sum(j.verdict is Verdict.TIE for j in judgments),
        comparisons_settled=sum(j.settled is not None for j in judgments),
        comparisons_abstain=sum(j.verdict is Verdict.ABSTAIN for j in judgments),
        judge_requests=judge_delta["queries"] - judge_delta["cache_hits"],
        judge_cache_hits=judge_delta["cache_hits"],
        responses=sum(len(s.completions) for s in samples),
        response_tokens=sum(len(c.token_ids) for s in samples for c in s.completions),
        responses_stopped=sum(c.finish_reason == "stop" for s in samples for c in s.completions),
    )
    stats.update(Counter(f"source_{p.source}" for p in labelled))
    stats.update({f"judge/{k}": v for k, v in judge_delta.items() if k.startswith("requests@") or k == "hedged"})  # per API replica; copies sent
    stats.update(train)
    return stats


def _drop_after(output_dir: Path, last_step: int) -> None:
    """Drop metric lines and step files past the step a resumed run restarts from (the killed run's
    tail): the resumed run writes those steps again, exactly."""
    for path in sorted((output_dir / "steps").glob("step-*.parquet")):
        if int(path.stem.split("-")[1]) > last_step:
            path.unlink()
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


@rlaif_config.parse(OnlineDPOSettings)
def recipe_main(cfg: DictConfig) -> None:
    distributed = training.is_distributed()
    if distributed:
        init_process_group(cfg.distributed_timeout_s)
    recipe = OnlineDPORecipe(cfg)
    try:
        with peers_lost_as_error(cfg.output_dir):
            recipe.setup(cfg)
            if cfg.dry_run:
                utils.log_rank_zero(log, "dry_run=true: no model was built, nothing was trained")
            else:
                recipe.train()
    finally:
        recipe.cleanup()
        if distributed:  # after the sampler: vLLM's engine shutdown uses the process group
            destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
