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
from typing import Any, Callable, Dict, List, Optional

from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

from rlaif_recipes.config import built_at
from rlaif_recipes.data.prompts import is_held_out
from rlaif_recipes.data.tables import check_cap, check_fraction, check_split, kind_of, read_table
from rlaif_recipes.data.xstest_pairs import xstest_pairs
from rlaif_recipes.errors import CheckpointError, DataError
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
    `rejected` (response texts). Every row is checked here, so bad data fails before tokenising."""
    at = built_at("dataset")
    check_split(f"{at}.split", split)
    check_fraction(f"{at}.held_out_fraction", held_out_fraction)
    check_cap(f"{at}.max_pairs", max_pairs)
    if source == "xstest":
        ds = xstest_pairs(split=split, held_out_fraction=held_out_fraction)  # already split, by the same hash
    else:
        ds = _load(source)
    if len(ds):
        ds = ds.map(_layout(source, ds.column_names, ds[0]), with_indices=True, remove_columns=ds.column_names)
        _check_pairs(source, ds)
        if split != "all" and source != "xstest":
            want = split == "held_out"
            ds = ds.filter(lambda row: is_held_out(row["prompt"], held_out_fraction) == want)
    if len(ds) == 0:
        raise DataError(
            f"no preference pairs in {source} for {at}.split={split} with {at}.held_out_fraction={held_out_fraction}; "
            "use another split or fraction"
        )
    if max_pairs is not None:
        ds = ds.select(range(min(max_pairs, len(ds))))
    return ds


def tokenize_preferences(ds: Dataset, checkpoint_dir: str, max_seq_len: Optional[int] = None) -> Dataset:
    """Add `prompt_ids`, `chosen_ids`, `rejected_ids` rendered with the checkpoint's chat template.

    The prompt is rendered with the generation prompt, exactly as the samplers render it; each
    response is what rendering the full conversation adds after that (text + end-of-turn token).
    """
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    if not tok.chat_template:
        raise CheckpointError(f"{checkpoint_dir} has no chat_template in tokenizer_config.json; add one to tokenise chats")

    def render(messages: Messages, generation_prompt: bool) -> List[int]:
        out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def encode(row: Dict[str, Any]) -> Dict[str, List[int]]:
        prompt = render(row["prompt_messages"], True)
        responses = []
        for text in (row["chosen"], row["rejected"]):
            full = render(row["prompt_messages"] + [{"role": "assistant", "content": text}], False)
            if full[: len(prompt)] != prompt:
                raise CheckpointError(
                    f"the chat template of {checkpoint_dir} renders the prompt differently once a response "
                    "follows, so response tokens cannot be separated; use a template that extends the prompt"
                )
            responses.append(full[len(prompt) :])
        pair = encode_pair(prompt, *responses, max_seq_len=max_seq_len)
        return {"prompt_ids": pair.prompt, "chosen_ids": pair.chosen, "rejected_ids": pair.rejected}

    return ds.map(encode)


def _load(source: str) -> Dataset:
    at = built_at("dataset")
    path = Path(source)
    if path.is_dir():
        shards = sorted(path.glob("data/shard-*.parquet"))  # a judge_pairs output_dir
        if shards:
            return read_table(source, shards, "parquet", f"{at}.source")
        if not (path / "state.json").is_file():
            raise DataError(
                f"{source} is a directory with neither data/shard-*.parquet (a judge_pairs output_dir) nor state.json "
                "(a Dataset.save_to_disk directory); set {at}.source to one of those, a file, or xstest"
            )
        ds = load_from_disk(str(path))
        if len(ds) == 0:
            raise DataError(f"{source} has no rows; add some, or set {at}.source to other data")
        return ds
    if not path.is_file():
        raise DataError(f"preference data {source} does not exist; set {at}.source=PATH (or xstest)")
    if path.suffix not in _FORMATS:
        raise DataError(
            f"preference file {source} must end in one of {sorted(_FORMATS)} (or be a save_to_disk directory); "
            f"set {at}.source to such a file"
        )
    return read_table(source, [path], _FORMATS[path.suffix], f"{at}.source")


def _layout(source: str, columns: List[str], first: Dict[str, Any]) -> Callable[[Dict[str, Any], int], Dict[str, Any]]:
    """The row normaliser for this file's layout (row 0's); it fails on a row that does not fit, naming it."""
    if not {"chosen", "rejected"} <= set(columns):
        raise DataError(
            f"{source} has columns {columns}; a preference dataset needs 'chosen' and 'rejected' "
            "(lists of chat messages, or texts with a 'prompt' column)"
        )
    conversational = _is_chat(f"{source}: row 0 (0-based)", "chosen", first["chosen"])
    if not conversational and "prompt" not in columns:
        raise DataError(f"{source}: 'chosen'/'rejected' are texts, so a 'prompt' column is needed (columns: {columns})")
    layout = "a list of chat messages" if conversational else "text"

    def as_messages(where: str, prompt: Any) -> Messages:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}] if prompt.strip() else []
        if isinstance(prompt, list):
            return [_message(where, m) for m in prompt]
        raise DataError(f"{where}: 'prompt' must be text or a list of chat messages, got {kind_of(prompt)}")

    def normalise(row: Dict[str, Any], idx: int) -> Dict[str, Any]:
        where = f"{source}: row {idx} (0-based)"
        for name in ("chosen", "rejected"):
            if _is_chat(where, name, row[name]) != conversational:
                other = "text" if conversational else "a list of chat messages"
                raise DataError(f"{where}: '{name}' is {other} but row 0's 'chosen' is {layout}; use one layout in every row")
        if conversational:
            chosen, rejected = [_message(where, m) for m in row["chosen"]], [_message(where, m) for m in row["rejected"]]
            if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise DataError(f"{where}: each 'chosen'/'rejected' conversation must end with an assistant message")
            prompt = as_messages(where, row["prompt"]) if "prompt" in row and row["prompt"] else chosen[:-1]
            if "prompt" not in row and chosen[:-1] != rejected[:-1]:
                raise DataError(f"{where}: 'chosen' and 'rejected' must share the turns before the last one (the prompt)")
            chosen_text, rejected_text = chosen[-1]["content"], rejected[-1]["content"]
        else:
            prompt, chosen_text, rejected_text = as_messages(where, row["prompt"]), row["chosen"], row["rejected"]
        if not prompt:
            raise DataError(f"{where}: the prompt is empty; fill it or remove that row")
        for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            if not text.strip():
                raise DataError(f"{where}: the '{name}' response is empty; fill it or remove that row")
        users = [m["content"] for m in prompt if m["role"] == "user"]
        return {
            "prompt_messages": prompt,
            "prompt": users[-1] if users else prompt[-1]["content"],
            "chosen": chosen_text,
            "rejected": rejected_text,
        }

    return normalise


def _is_chat(where: str, name: str, value: Any) -> bool:
    """Whether a `chosen`/`rejected` value is a conversation (else text); anything else would fail
    far later, inside the chat template."""
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: '{name}' must be text or a list of chat messages, got {kind_of(value)}")
    return isinstance(value, list)


def _message(where: str, m: Any) -> Dict[str, str]:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"{where}: chat messages must be {{'role': ..., 'content': ...}} mappings, got {m!r:.80}")
    if not isinstance(m["content"], str):
        raise DataError(f"{where}: a chat message's 'content' must be text, got {kind_of(m['content'])}")
    return {"role": m["role"], "content": m["content"]}


def _check_pairs(source: str, ds: Dataset) -> None:
    same = [idx for idx, (chosen, rejected) in enumerate(zip(ds["chosen"], ds["rejected"])) if chosen == rejected]
    if same:
        raise DataError(
            f"{source}: {len(same)} of {len(ds)} pairs have 'chosen' identical to 'rejected' (first: row {same[0]} (0-based)); "
            "such a pair teaches nothing (DPO loss stays log 2): remove them"
        )
