"""Tiny collectives the sampling loops need so that FSDP ranks step in lockstep; the process group;
the refusal of torchrun by the recipes that run as one process."""

import contextlib
import datetime
import re
from typing import Any, Iterator, List, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torchtune import training

from rlaif_recipes.errors import ConfigError, RecipeError, TrainingError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def max_over_ranks(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


T = TypeVar("T")


def in_lockstep(items: Sequence[T], filler: T) -> Iterator[Tuple[T, bool]]:
    """Each item with True, then `filler` with False until this rank has run as many rounds as the
    rank with the most items: under FSDP2 every forward pass is a collective, so ranks that hold
    different numbers of batches must still run the same number of passes."""
    for k in range(max_over_ranks(len(items))):
        yield (items[k], True) if k < len(items) else (filler, False)


def sum_over_ranks(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor(value)
    dist.all_reduce(t)
    return int(t)


def gather_from_ranks(obj: Any) -> List[Any]:
    """`obj` from every rank, in rank order (just [obj] on one process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def refuse_torchrun(recipe: str, instead: str) -> None:
    """A one-process recipe under torchrun would have every rank do (and pay for) the whole job.
    Read from torchrun's environment: no process group exists in such a recipe."""
    if training.is_distributed():
        raise ConfigError(f"{recipe} runs as one process (not under torchrun): {instead}")


def init_process_group(timeout_s: float = 1800.0) -> None:
    """NCCL for CUDA tensors where there is CUDA, gloo for CPU tensors (and for CPU-only builds);
    a collective that waits `timeout_s` on a rank that hangs fails instead of waiting for ever."""
    if timeout_s <= 0:
        raise ConfigError(f"distributed_timeout_s={timeout_s}: give the seconds a collective may wait on another rank (> 0)")
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


# how a collective fails when another rank is gone: torch's own error types (NCCL), and gloo's
# transport errors, plain RuntimeErrors ("[.../gloo/transport/tcp/pair.cc:537] Read error ...:
# Connection reset by peer", "[.../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting ...")
_PEER_LOST = re.compile(r"/gloo/transport/|connection (reset|closed|refused) by peer", re.IGNORECASE)


@contextlib.contextmanager
def peers_lost_as_error(output_dir: str) -> Iterator[None]:
    """A collective that fails under torchrun (another rank died, its node went away, or it hung
    past distributed_timeout_s) ends this rank with one line naming what to do, not a gloo/NCCL
    traceback; the last checkpoint in output_dir is intact (written whole, by rank 0 only)."""
    try:
        yield
    except RuntimeError as e:
        lost = isinstance(e, dist.DistError) or _PEER_LOST.search(str(e))
        if not is_distributed() or isinstance(e, RecipeError) or not lost:  # a judge's timeout is its own error
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"rank {dist.get_rank()} of {dist.get_world_size()} lost contact with another rank ({first[:200]}); "
            f"a node died, was killed or hung: restart every launcher with resume_from_checkpoint=true to continue from the "
            f"last checkpoint in {output_dir}/checkpoints"
        ) from None


def destroy_process_group() -> None:
    """Tear down after the sampler: vLLM's engine shutdown may already have destroyed the group."""
    if dist.is_initialized():
        dist.destroy_process_group()
