"""In-process vLLM engine; new policy weights are pushed in place after each sync.

Weights go in through the worker's `reload_weights` (plain `load_weights` fails on vLLM's CPU
backend, which repacks linear weights after loading), then the prefix cache is reset so no KV
computed with the old weights is reused.

Requests go through the engine's own step loop (what `LLM.generate` runs), so each prompt is handed
on the moment all its completions are done, while longer ones still generate: the online loop
starts judging it then.
"""

import itertools
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional

import torch

from rlaif_recipes.errors import ConfigError
from rlaif_recipes.models.hf_model import tune_to_hf_stream
from rlaif_recipes.samplers.base import Completion, Sampler, SamplingSettings, Weights, derive_seed
from rlaif_recipes.vllm_engine import close_engine, start_engine

_request_ids = itertools.count()  # unique over every engine of the process


class VLLMSampler(Sampler):
    RUNTIME_SETTINGS = ("gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager", "tensor_parallel_size", "sleep_between_steps", "block_size")

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.05,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        max_model_len: Optional[int] = None,
        kv_cache_memory_bytes: Optional[int] = None,
        sleep_between_steps: bool = False,
        block_size: Optional[int] = None,
        **sampling,
    ) -> None:
        super().__init__(checkpoint_dir, max_model_len=max_model_len, **sampling)
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(
                f"sampler.gpu_memory_utilization={gpu_memory_utilization}: it is the share of (GPU, or on "
                "CPU host) memory vLLM reserves and must be in (0, 1]; 0.05 suits small CPU runs"
            )
        self.llm = start_engine(
            "sampler",
            model=self.checkpoint_dir,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=self.max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            block_size=block_size,
            seed=self.defaults["seed"],
            enable_sleep_mode=sleep_between_steps,
        )
        self._sleep_mode, self._asleep = sleep_between_steps, False

    def sleep(self) -> None:
        """vLLM's sleep mode, level 1: the weights move to host memory and the KV cache is freed,
        so the trainer's backward gets the GPU memory the engine held; the next use wakes it."""
        if self._sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def update_weights(self, weights: Weights) -> None:
        """Streamed: each weight is renamed and handed to vLLM's in-place reload as the reload asks
        for it, so a stream (`streamed_state_dict`) is never held whole."""
        self._wake()
        items = weights.items() if isinstance(weights, Mapping) else weights
        hf_weights = tune_to_hf_stream(items, self.checkpoint_dir)

        def reload(worker) -> None:
            worker.model_runner.reload_weights(weights_iterator=hf_weights)
            _repack_tied_head(worker.model_runner.model)

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        close_engine(self)

    def _generate(
        self, prompt_ids: List[List[int]], n: int, settings: SamplingSettings, done: Callable[[int, List[Completion]], None]
    ) -> List[List[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._wake()
        # vLLM refuses n > 1 with greedy decoding: ask for n copies of the request instead.
        copies, per_request = (n, 1) if settings.temperature == 0 else (1, n)
        params = [
            SamplingParams(
                n=per_request,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_tokens,
                seed=derive_seed(settings.seed, i),
                logprobs=0,
                stop_token_ids=list(settings.stop_token_ids),
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            for i in range(len(prompt_ids))
            for _ in range(copies)
        ]
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids for _ in range(copies)]
        outputs: Dict[int, List[Completion]] = {}
        left = Counter({i: copies for i in range(len(prompt_ids))})
        engine = self.llm.llm_engine

        def completions_of(prompt: int) -> List[Completion]:
            return [c for r in range(prompt * copies, (prompt + 1) * copies) for c in outputs[r]]

        def run(chunk: List[int]) -> None:
            request_of = {}  # outputs carry the id given here (add_request returns an internal one)
            for k in chunk:
                request_id = f"rlaif-{next(_request_ids)}"
                request_of[request_id] = k
                engine.add_request(request_id, requests[k], params[k])
            while engine.has_unfinished_requests():
                for out in engine.step():
                    k = request_of.get(out.request_id)
                    if k is None or not out.finished:
                        continue
                    outputs[k] = [self._completion(c) for c in out.outputs]
                    prompt = k // copies
                    left[prompt] -= 1
                    if left[prompt] == 0:
                        done(prompt, completions_of(prompt))

        # vLLM 0.32's CPU backend fails on a seeded request whose prefill is split across scheduler
        # steps ("CPU Generator does not use offset"): submit chunks whose prefill fits one step.
        budget = engine.vllm_config.scheduler_config.max_num_batched_tokens
        chunk, used = [], 0
        for j, request in enumerate(requests):
            cost = len(request["prompt_token_ids"]) * per_request
            if chunk and used + cost > budget:
                run(chunk)
                chunk, used = [], 0
            chunk.append(j)
            used += cost
        run(chunk)
        return [completions_of(i) for i in range(len(prompt_ids))]

    def _completion(self, c) -> Completion:
        ids = list(c.token_ids)
        return Completion(
            token_ids=ids,
            text=self.decode(ids),
            logprobs=[step[tok].logprob for tok, step in zip(ids, c.logprobs or [])],
            finish_reason="stop" if c.finish_reason == "stop" else "length",
        )


def _repack_tied_head(model: torch.nn.Module) -> None:
    """Re-derive a tied output head's kernel weights from the reloaded embedding. vLLM's CPU
    backend packs the head's weight for its GEMM at load time, and an in-place reload refreshes
    only layers that received weights: a tied head receives none and would go on using the old
    embedding. (A no-op on GPU, where the unquantized head keeps no packed copy.)"""
    head, embed = getattr(model, "lm_head", None), getattr(model.model, "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is embed.weight:
        head.quant_method.process_weights_after_loading(head)
