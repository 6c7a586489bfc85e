"""Preference datasets (prompt, chosen, rejected) from local files, tokenised with a chat template.

Two row layouts are read, the ones torchtune's `preference_dataset` and TRL read:

- conversational: `chosen` and `rejected` are lists of chat messages ending with the assistant's
  turn; the prompt is what comes before it (identical in both), or a separate `prompt` column
  (a string or a list of messages) when `chosen`/`rejected` hold only the assistant's turn;
- plain: `prompt` (a string or a list of messages), `chosen` and `rejected` response texts.

`source` is a JSONL/JSON/Parquet/Arrow file, a `judge_pairs` output_dir (its data/shard-*.parquet),
a directory written by `Dataset.save_to_disk`, or
`xstest` for the packaged human-labelled XSTest pairs (`rlaif_recipes.data.xstest_pairs`). The
held-out split is the prompt-hash split every stage shares (`is_held_out`).
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

from datasets import Dataset, load_dataset, load_from_disk
from transformers import AutoTokenizer

from rlaif_recipes.data.prompts import is_held_out
from rlaif_recipes.data.xstest_pairs import xstest_pairs
from rlaif_recipes.logprobs import encode_pair

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
Messages = List[Dict[str, str]]


def preference_dataset(
    source: str,
    split: str = "all",
    held_out_fraction: float = 0.3,
    max_pairs: Optional[int] = None,
) -> Dataset:
    """Rows: `prompt_messages` (chat messages), `prompt` (the last user turn, text), `chosen` and
    `rejected` (response texts)."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"dataset.split={split!r}; use train, held_out or all")
    if source == "xstest":
        ds = xstest_pairs(split=split, held_out_fraction=held_out_fraction)
        split = "all"  # already split, by the same hash
    else:
        ds = _load(source)
    first = ds[0] if len(ds) else {}
    normalise = _layout(source, ds.column_names, first)
    ds = ds.map(normalise, remove_columns=ds.column_names)
    if split != "all":
        want = split == "held_out"
        ds = ds.filter(lambda row: is_held_out(row["prompt"], held_out_fraction) == want)
    if max_pairs is not None:
        ds = ds.select(range(min(max_pairs, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"no preference pairs in {source} (split={split}); check dataset.source and dataset.split")
    return ds


def tokenize_preferences(ds: Dataset, checkpoint_dir: str, max_seq_len: Optional[int] = None) -> Dataset:
    """Add `prompt_ids`, `chosen_ids`, `rejected_ids` rendered with the checkpoint's chat template.

    The prompt is rendered with the generation prompt, exactly as the samplers render it; each
    response is what rendering the full conversation adds after that (text + end-of-turn token).
    """
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    if not tok.chat_template:
        raise ValueError(f"{checkpoint_dir} has no chat_template in tokenizer_config.json; add one to tokenise chats")

    def render(messages: Messages, generation_prompt: bool) -> List[int]:
        out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def encode(row: Dict[str, Any]) -> Dict[str, List[int]]:
        prompt = render(row["prompt_messages"], True)
        responses = []
        for text in (row["chosen"], row["rejected"]):
            full = render(row["prompt_messages"] + [{"role": "assistant", "content": text}], False)
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    f"the chat template of {checkpoint_dir} renders the prompt differently once a response "
                    "follows, so response tokens cannot be separated; use a template that extends the prompt"
                )
            responses.append(full[len(prompt) :])
        pair = encode_pair(prompt, *responses, max_seq_len=max_seq_len)
        return {"prompt_ids": pair.prompt, "chosen_ids": pair.chosen, "rejected_ids": pair.rejected}

    return ds.map(encode)


def _load(source: str) -> Dataset:
    path = Path(source)
    if path.is_dir():
        shards = sorted(path.glob("data/shard-*.parquet"))  # a judge_pairs output_dir
        if shards:
            return load_dataset("parquet", data_files=[str(p) for p in shards], split="train")
        return load_from_disk(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"preference data {source} does not exist; set dataset.source=PATH (or xstest)")
    if path.suffix not in _FORMATS:
        raise ValueError(f"preference file {source} must end in one of {sorted(_FORMATS)} (or be a save_to_disk directory)")
    return load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")


def _layout(source: str, columns: List[str], first: Dict[str, Any]):
    """The row normaliser for this file's layout, or a one-line error naming what is missing."""
    if not {"chosen", "rejected"} <= set(columns):
        raise ValueError(
            f"{source} has columns {columns}; a preference dataset needs 'chosen' and 'rejected' "
            "(lists of chat messages, or texts with a 'prompt' column)"
        )
    conversational = isinstance(first.get("chosen"), list)
    if not conversational and "prompt" not in columns:
        raise ValueError(f"{source}: 'chosen'/'rejected' are texts, so a 'prompt' column is needed (columns: {columns})")

    def as_messages(prompt: Any) -> Messages:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [_message(m) for m in prompt]

    def normalise(row: Dict[str, Any]) -> Dict[str, Any]:
        if conversational:
            chosen, rejected = [_message(m) for m in row["chosen"]], [_message(m) for m in row["rejected"]]
            if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise ValueError(f"{source}: each 'chosen'/'rejected' conversation must end with an assistant message")
            prompt = as_messages(row["prompt"]) if "prompt" in row and row["prompt"] else chosen[:-1]
            if "prompt" not in row and chosen[:-1] != rejected[:-1]:
                raise ValueError(f"{source}: 'chosen' and 'rejected' must share the turns before the last one (the prompt)")
            chosen_text, rejected_text = chosen[-1]["content"], rejected[-1]["content"]
        else:
            prompt, chosen_text, rejected_text = as_messages(row["prompt"]), row["chosen"], row["rejected"]
        if not prompt:
            raise ValueError(f"{source}: a pair has an empty prompt")
        users = [m["content"] for m in prompt if m["role"] == "user"]
        return {
            "prompt_messages": prompt,
            "prompt": users[-1] if users else prompt[-1]["content"],
            "chosen": chosen_text,
            "rejected": rejected_text,
        }

    return normalise


def _message(m: Any) -> Dict[str, str]:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"chat messages must be {{'role': ..., 'content': ...}} mappings, got {m!r:.80}")
    return {"role": m["role"], "content": m["content"]}
