"""`judge=llm`: a local model judges pairs on an in-process vLLM engine, from its next-token log-probs.

Each pair becomes the rubric's judge prompt (`Rubric.messages`) in the checkpoint's own chat
template. The engine generates one token with its top log-probs; with `constrained=True` (default)
vLLM's structured outputs restrict that token to the choices "A" / "B", and because the grammar
mask is applied to the logits before log-probs are taken, the two log-probs are exactly the
model's preference renormalised over the two letters. P(A) = p(A) / (p(A) + p(B)); the verdict
follows from P(A). Unconstrained, a letter missing from the top log-probs is bounded by the
smallest one shown, and a reply with neither letter among them abstains: the model did not answer
in the format asked.

All pairs of one `judge()` call go to the engine in one batch. Greedy decoding and a fixed engine
seed make the verdicts deterministic. A judge prompt longer than the context abstains with its
length in the reason (the responses are never cut: the judge must see what it compares).

Memory on CPU: vLLM would size its KV cache as `gpu_memory_utilization` x RAM minus what the
process already holds (negative beside the policy's sampler, as in online DPO), so on CPU the share
of RAM is passed as the KV-cache size itself (`rlaif_recipes.vllm_engine.kv_cache_args`).
"""

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from rlaif_recipes.errors import CheckpointError, ConfigError
from rlaif_recipes.files import file_sha256
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, verdict_from_prob
from rlaif_recipes.vllm_engine import close_engine, first_line, start_engine

LETTERS = ("A", "B")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class LLMJudge(PairwiseJudge):
    RUNTIME_SETTINGS = PairwiseJudge.RUNTIME_SETTINGS + ("gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager")

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.05,
        kv_cache_memory_bytes: Optional[int] = None,
        max_model_len: Optional[int] = None,
        enforce_eager: bool = True,
        constrained: bool = True,
        top_logprobs: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.rubric is None:
            raise ConfigError(
                "judge=llm needs a rubric to put in its prompt; set rubric=false_refusal (or another rubric)"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(
                f"judge.gpu_memory_utilization={gpu_memory_utilization}: must be in (0, 1]; 0.05 suits small CPU runs"
            )
        if top_logprobs < 2:
            raise ConfigError(f"judge.top_logprobs={top_logprobs}: need at least 2 to see both letters")
        self.checkpoint_dir = str(Path(checkpoint_dir).resolve())
        if not (Path(self.checkpoint_dir) / "config.json").is_file():
            raise CheckpointError(
                f"judge.checkpoint_dir={checkpoint_dir} has no config.json; point it at an HF model directory"
            )
        self.constrained = constrained
        self.top_logprobs = top_logprobs
        self._fingerprint = weights_fingerprint(self.checkpoint_dir)
        self.llm = start_engine(
            "judge",
            model=self.checkpoint_dir,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=0,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    @property
    def model(self) -> str:
        return self.checkpoint_dir

    def identity(self) -> Dict[str, Any]:
        """Plus which weights judge, and the checkpoint as an absolute path."""
        return {**super().identity(), "checkpoint_dir": self.checkpoint_dir, "weights": self._fingerprint}

    def close(self) -> None:
        close_engine(self)
        super().close()

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        todo, prompts = [], []
        for i, p in enumerate(pairs):
            ids = self.encode(p)
            if len(ids) + 1 > self.max_model_len:
                record(
                    i,
                    Judgment.abstain(
                        f"judge prompt has {len(ids)} tokens, over the judge's context of {self.max_model_len}; "
                        "raise judge.max_model_len or shorten the responses"
                    ),
                )
                continue
            todo.append(i)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        if not todo:
            return
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=self.top_logprobs,
            structured_outputs=StructuredOutputsParams(choice=list(LETTERS)) if self.constrained else None,
        )
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:  # an engine failure abstains on the batch; the run goes on
            for i in todo:
                record(i, Judgment.abstain(f"vLLM judge failed: {type(e).__name__}: {first_line(e)}"))
            return
        self.count("engine_calls", 1)
        for i, out in zip(todo, outputs):
            usage = {"input_tokens": len(out.prompt_token_ids), "output_tokens": 1}
            for key, value in {"requests": 1, **usage}.items():
                self.count(key, value)
            step = out.outputs[0].logprobs[0] if out.outputs and out.outputs[0].logprobs else {}
            prob_a = prob_a_from_token_logprobs([(lp.decoded_token or "", lp.logprob) for lp in step.values()])
            if prob_a is None:
                shown = ", ".join(repr(lp.decoded_token) for lp in list(step.values())[:5])
                record(
                    i,
                    Judgment.abstain(
                        f"neither A nor B among the judge's top {self.top_logprobs} next tokens ({shown}, ...)",
                        usage=usage,
                    ),
                )
                continue
            record(
                i, Judgment(verdict_from_prob(prob_a), prob_a=prob_a, usage=usage)
            )  # tie_margin: on the combined P(A)

    def encode(self, pair: Pair) -> List[int]:
        """The judge prompt for a pair as token ids: the rubric's messages in the model's chat template."""
        messages = self.rubric.messages(pair.prompt, pair.response_a, pair.response_b)
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)


def prob_a_from_token_logprobs(logprobs: Iterable[Tuple[str, float]]) -> Optional[float]:
    """P(A) renormalised over the two letters, from (decoded token, log-prob) of the top tokens.

    Variants of a letter (" A") add up. A letter absent from the top tokens is below the smallest
    log-prob shown, which bounds it; None if neither letter is there.
    """
    finite = [(t, lp) for t, lp in logprobs if lp > -math.inf]
    mass = {x: sum(math.exp(lp) for t, lp in finite if t.strip() == x) for x in LETTERS}
    if not any(mass.values()):
        return None
    floor = math.exp(min(lp for _, lp in finite))
    a, b = (mass[x] or floor for x in LETTERS)
    return a / (a + b)


def weights_fingerprint(checkpoint_dir: str) -> str:
    """Which weights judge: a hash over the checkpoint's weight files (names and contents)."""
    files = sorted(p for p in Path(checkpoint_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    listing = ",".join(f"{p.name}:{file_sha256(p)}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]
