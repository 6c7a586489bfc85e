"""Sample n responses per prompt with the policy and write them as an HF dataset on disk.

    tune run rlaif_recipes/recipes/generate_pairs.py --config generate_pairs sampler=torchtune
    tune run --nproc_per_node 2 rlaif_recipes/recipes/generate_pairs.py --config generate_pairs

The prompts are cut into shards of `prompts_per_shard`; each finished shard is one Parquet file,
written atomically, so a killed run loses at most the shards in flight and a re-run skips the
finished ones. Under torchrun rank r takes shards r, r + world_size, ...; with sampler=torchtune
the policy is sharded with FSDP2 and every rank samples with it.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from tqdm import tqdm

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.data.prompts import prompts_fingerprint
from rlaif_recipes.distributed import destroy_process_group, in_lockstep, init_process_group
from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.files import atomic_write, weights_stamp
from rlaif_recipes.models import check_checkpoint_dir
from rlaif_recipes.policy import build_policy, device_and_dtype
from rlaif_recipes.run_dir import claim, run_identity
from rlaif_recipes.samplers.base import check_pair_sampling, derive_seed
from rlaif_recipes.vllm_engine import check_engine_settings

log = utils.get_logger("INFO")

# settings that do not change what the shards hold: a run may change them and continue the directory
RUNTIME_KEYS = ("device", "checkpointer")


@dataclass
class GeneratePairsSettings:
    output_dir: str
    seed: int
    n: int
    prompts_per_shard: int
    device: str
    dtype: str
    checkpoint_dir: str
    model: Any
    checkpointer: Any
    sampler: Any
    data: Any


class GeneratePairsRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        """Every check that needs no engine: settings, weights, output directory."""
        check_pair_sampling(cfg.sampler, cfg.n)
        check_engine_settings("sampler", cfg.sampler)
        if cfg.prompts_per_shard < 1:
            raise ConfigError(f"prompts_per_shard={cfg.prompts_per_shard}: a shard needs at least 1 prompt")
        self._device, self._dtype = device_and_dtype(cfg.device, cfg.dtype)
        check_checkpoint_dir(cfg.checkpoint_dir, cfg.model)
        self._world_size, self._rank = utils.get_world_size_and_rank()
        self._output_dir = Path(cfg.output_dir)
        self._n = cfg.n
        self._prompts_per_shard = cfg.prompts_per_shard
        self._policy_id = weights_stamp(cfg.checkpoint_dir)
        self._sampler = None
        training.set_seed(seed=cfg.seed)

    def setup(self, cfg: DictConfig) -> None:
        self._prompts = rlaif_config.instantiate(cfg.data, "data")
        if len(self._prompts) == 0:
            raise DataError(f"the prompt dataset is empty after filtering; check data.* ({dict(cfg.data)})")
        # before the engine starts: a directory of another run is refused at once
        claim(cfg.output_dir, "generate_pairs", run_identity(cfg, RUNTIME_KEYS, weights=self._policy_id, prompts=prompts_fingerprint(self._prompts)),
              outputs=("data",))
        self._sampler = config.instantiate(cfg.sampler)
        if self._sampler.uses_live_policy:
            checkpoint = config.instantiate(cfg.checkpointer).load_checkpoint()
            policy = build_policy(cfg.model, checkpoint[training.MODEL_KEY], device=self._device, dtype=self._dtype)
            self._sampler.bind_policy(policy)
        self._sampling = {**self._sampler.defaults, "n": self._n, "backend": type(self._sampler).__name__}
        if self._rank == 0:
            rlaif_config.save(cfg, str(self._output_dir))

    def generate(self) -> None:
        shard_dir = self._output_dir / "data"
        shard_dir.mkdir(parents=True, exist_ok=True)
        num_shards = -(-len(self._prompts) // self._prompts_per_shard)
        mine = list(range(self._rank, num_shards, self._world_size))
        todo = [s for s in mine if not _shard_path(shard_dir, s).exists()]
        log.info(f"rank {self._rank}: {len(mine) - len(todo)} of {len(mine)} shards already done")
        # Under FSDP every rank must sample the same number of times: a rank with fewer shards
        # left samples one of its own again and discards it.
        rounds = list(in_lockstep(todo, filler=(todo or mine or [0])[-1]))
        bar = tqdm(total=len(rounds), desc="generate", disable=self._rank != 0, unit="shard")
        for shard, real in rounds:
            rows = self._prompts.select(range(shard * self._prompts_per_shard, min((shard + 1) * self._prompts_per_shard, len(self._prompts))))
            start = time.perf_counter()
            samples = self._sampler.sample(list(rows["messages"]), n=self._n, seed=derive_seed(self._sampler.defaults["seed"], "shard", shard))
            if real:
                self._write_shard(_shard_path(shard_dir, shard), rows, samples)
            bar.set_postfix(sec_per_shard=f"{time.perf_counter() - start:.1f}")
            bar.update()
        bar.close()
        if self._world_size > 1:
            torch.distributed.barrier()
        if self._rank == 0:
            log.info(f"wrote {num_shards} shards of prompts x {self._n} responses to {shard_dir}")

    def _write_shard(self, path: Path, rows, samples) -> None:
        table = pa.table(
            {
                "prompt_id": rows["prompt_id"],
                "prompt": rows["prompt"],
                "messages": rows["messages"],
                "prompt_token_ids": [s.prompt_token_ids for s in samples],
                "responses": [[c.text for c in s.completions] for s in samples],
                "response_token_ids": [[c.token_ids for c in s.completions] for s in samples],
                "finish_reasons": [[c.finish_reason for c in s.completions] for s in samples],
                "sampling": [json.dumps(self._sampling, sort_keys=True)] * len(samples),
                "policy": [self._policy_id] * len(samples),
            }
        )
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def cleanup(self) -> None:
        if self._sampler is not None:
            self._sampler.close()


def _shard_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"shard-{shard:05d}.parquet"


def load_generated(output_dir: str):
    """The generated responses as one HF dataset (all finished shards)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(Path(output_dir) / "data" / "shard-*.parquet"), split="train")


@rlaif_config.parse(GeneratePairsSettings)
def recipe_main(cfg: DictConfig) -> None:
    distributed = training.is_distributed()
    if distributed:
        init_process_group()
    recipe = GeneratePairsRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.generate()
    finally:
        recipe.cleanup()
        if distributed:  # the vLLM engine must go first: it uses the trainer's process group
            destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
