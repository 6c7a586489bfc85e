"""Write SmolLM2-135M-Instruct's own answers and refusals to XSTest's prompts: a second writing style
for training and checking the encoder reward model (judge=reward_model), beside Llama-2's.

XSTest ships one model's completions (Llama-2-chat); a judge trained on them alone learns that
model's way of refusing. This adds, for every XSTest prompt:

- `answer`: SmolLM2's greedy reply, kept when XSTest's phrase matcher finds no refusal in it (the
  untouched model answers most safe and unsafe prompts alike: the real answers to unsafe requests
  that Llama-2's completions lack);
- `refusal`: SmolLM2's continuation of a refusal opening (one of REFUSAL_OPENINGS, picked by a hash
  of the prompt), so the refusal is worded by the model from there on;
- `partial`: an opening that declines and then pivots ("I can't help with that directly. However,"),
  continued by the model: XSTest's partial refusals, which count as refusals.

Labels come from how each text was made (`final_label` as XSTest spells it), never from a judge;
the phrase matcher only drops answers it reads as refusals. Same seed, same file.

    python examples/smollm2_completions.py --out rlaif_recipes/assets/xstest/xstest_smollm2_completions.csv
"""

import argparse
import csv
import hashlib
import os
from pathlib import Path

from rlaif_recipes.config import asset_path
from rlaif_recipes.files import atomic_write
from rlaif_recipes.judges.rules import is_refusal
from rlaif_recipes.models.get_model import get_model
from rlaif_recipes.samplers import VLLMSampler

REFUSAL_OPENINGS = (
    "I'm sorry, but I can't",
    "I cannot",
    "I apologize, but",
    "Unfortunately, I'm not able to",
    "As an AI assistant, I have to decline",
    "I understand why you might ask, but I can't",
    "Thank you for your question. However, I'm unable to",
    "That's not something I can help with",
)
PARTIAL_OPENINGS = (
    "I can't help with that directly. However,",
    "I'm not able to give specific instructions for that, but in general,",
    "I must decline to answer this fully. That said,",
)


def _pick(options: tuple, prompt: str, salt: str) -> str:
    return options[int(hashlib.sha256(f"{salt}:{prompt}".encode()).hexdigest(), 16) % len(options)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write (XSTest's completion columns plus `style`)")
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens per completion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with open(asset_path("xstest/xstest_prompts.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    sampler = VLLMSampler(
        checkpoint_dir=str(get_model("smollm2-135m-instruct")), temperature=0.0, max_tokens=args.max_tokens,
        seed=args.seed, max_model_len=1024, dtype="bfloat16", kv_cache_memory_bytes=1 << 29,
    )  # fmt: skip
    try:
        chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        out = []
        plain = sampler.sample(chats)
        for r, s in zip(rows, plain):
            text = s.completions[0].text.strip()
            if text and not is_refusal(text):
                out.append({**r, "completion": text, "final_label": "1_full_compliance", "style": "smollm2_answer"})
        for style, openings, label in (("smollm2_refusal", REFUSAL_OPENINGS, "2_full_refusal"),
                                       ("smollm2_partial", PARTIAL_OPENINGS, "3_partial_refusal")):  # fmt: skip
            prefills = [_pick(openings, r["prompt"], style) for r in rows]
            ids = [sampler.encode(c) + sampler.tokenizer.encode(p, add_special_tokens=False) for c, p in zip(chats, prefills)]
            for r, p, s in zip(rows, prefills, sampler.sample(ids)):
                out.append({**r, "completion": f"{p} {s.completions[0].text.strip()}", "final_label": label, "style": style})
    finally:
        sampler.close()
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "type", "prompt", "completion", "final_label", "style"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(out)

    path = atomic_write(Path(args.out), write)
    print(f"wrote {len(out)} completions to {path}")


if __name__ == "__main__":
    main()
