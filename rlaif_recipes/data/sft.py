"""XSTest's human-annotated completions as a chat SFT dataset (train split only).

Training on them gives the demo its over-cautious starting policy: the annotated model (Llama-2-chat)
refuses about half of XSTest's safe prompts and all of its unsafe ones, so a policy imitating it
refuses benign requests that merely sound harmful, which RLAIF then has to fix. Prompts held out by
`is_held_out` (the split every stage shares) never appear here.

Completions are cut to their opening sentences: whether a response refuses is decided by how it
starts, and short targets let a tiny model learn to finish a turn within a few dozen tokens.
"""

import re
from typing import Any, Dict, Mapping, Optional, Sequence

from torchtune.data import Message
from torchtune.datasets import SFTDataset
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from rlaif_recipes.config import asset_path
from rlaif_recipes.data.prompts import is_held_out
from rlaif_recipes.data.tables import check_fraction
from rlaif_recipes.data.xstest_pairs import check_csv
from rlaif_recipes.errors import ConfigError

LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def opening(text: str, max_sentences: Optional[int]) -> str:
    """The first `max_sentences` sentences of the first paragraph (all of `text` for None)."""
    text = text.strip()
    if max_sentences is None:
        return text
    paragraph = text.split("\n\n", 1)[0].strip()
    return " ".join(_SENTENCE_END.split(paragraph)[:max_sentences])


class PromptCompletionToMessages(Transform):
    """A CSV row -> a user turn (masked: no loss on the prompt) and the assistant's completion."""

    def __init__(self, max_sentences: Optional[int] = None) -> None:
        self.max_sentences = max_sentences

    def __call__(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        return {
            "messages": [
                Message(role="user", content=sample["prompt"].strip(), masked=True),
                Message(role="assistant", content=opening(sample["completion"], self.max_sentences)),
            ]
        }


def xstest_sft_dataset(
    tokenizer: ModelTokenizer,
    *,
    completions: str = "",
    labels: Sequence[str] = LABELS,
    held_out_fraction: float = 0.3,
    max_sentences: Optional[int] = 2,
) -> SFTDataset:
    """XSTest completions (safe and unsafe prompts) whose prompt is not held out, as torchtune SFT samples.

    labels: which human `final_label`s to keep (all three by default; partial refusals open like
    refusals, so they teach refusing). max_sentences: how much of each completion to keep (None: all).
    """
    completions = completions or asset_path("xstest/xstest_v2_completions_llama2orig.csv")
    unknown = sorted(set(labels) - set(LABELS))
    if unknown or not labels:
        raise ConfigError(f"dataset.labels={list(labels)}: use a non-empty subset of {list(LABELS)}")
    if max_sentences is not None and max_sentences < 1:
        raise ConfigError(f"dataset.max_sentences={max_sentences}: keep at least 1 sentence, or null for all")
    check_fraction("dataset.held_out_fraction", held_out_fraction)
    check_csv(completions, "dataset.completions", ("prompt", "completion", "final_label"))
    keep = set(labels)

    def in_train_split(row: Mapping[str, Any]) -> bool:
        return (
            bool(row["completion"] and row["completion"].strip())
            and row["final_label"] in keep
            and not is_held_out(row["prompt"].strip(), held_out_fraction)
        )

    return SFTDataset(
        source="csv",
        data_files=completions,
        split="train",
        message_transform=PromptCompletionToMessages(max_sentences),
        model_transform=tokenizer,
        filter_fn=in_train_split,
    )
