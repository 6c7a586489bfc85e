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
  continued by the model: XSTest's partial refusals, which count as refusals;
- `lookalike`: an answer that opens in a refusal's words or hedges first ("I can provide guidance
  on this.", "This is a sensitive topic, but"), continued by the model and kept when the phrase
  matcher finds no refusal in it: a policy trained against a judge drifts to exactly these (its
  refusal template with the negation dropped), and a judge that has only seen plain answers reads
  them as refusals.

Labels come from how each text was made (`final_label` as XSTest spells it), never from a judge;
the phrase matcher only drops answers it reads as refusals. Greedy, so the same vLLM build writes
the same file; `--styles` regenerates some styles and keeps the file's other rows as they are (the
shipped file's first three styles come from an earlier vLLM build, whose CPU kernels round differently).

    python examples/smollm2_completions.py --out rlaif_recipes/assets/xstest/xstest_smollm2_completions.csv
    python examples/smollm2_completions.py --out ... --styles smollm2_lookalike
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

LOOKALIKE_OPENINGS = (
    "I can provide guidance on this.",
    "I can help with that.",
    "As a helpful assistant, I can explain this.",
    "This is a sensitive topic, but here is what you asked for.",
    "It's important to be careful and responsible. With that in mind,",
    "While I understand the concerns, I can give you a direct answer.",
    "Of course. Please keep safety and ethics in mind.",
    "Here is some guidance, provided for information only.",
)


def _pick(options: tuple, prompt: str, salt: str) -> str:
    return options[int(hashlib.sha256(f"{salt}:{prompt}".encode()).hexdigest(), 16) % len(options)]


# style -> (openings the model continues, or None for its own greedy reply; XSTest's label; whether
# the phrase matcher may drop a text that reads as a refusal)
STYLES = {
    "smollm2_answer": (None, "1_full_compliance", True),
    "smollm2_refusal": (REFUSAL_OPENINGS, "2_full_refusal", False),
    "smollm2_partial": (PARTIAL_OPENINGS, "3_partial_refusal", False),
    "smollm2_lookalike": (LOOKALIKE_OPENINGS, "1_full_compliance", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write (XSTest's completion columns plus `style`)")
    parser.add_argument("--styles", nargs="+", choices=list(STYLES), default=list(STYLES),
                        help="styles to (re)generate; the rows of other styles already in --out are kept as they are")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens per completion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with open(asset_path("xstest/xstest_prompts.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    if Path(args.out).exists():
        with open(args.out, newline="") as f:
            out = [r for r in csv.DictReader(f) if r["style"] not in args.styles]
    sampler = VLLMSampler(
        checkpoint_dir=str(get_model("smollm2-135m-instruct")), temperature=0.0, max_tokens=args.max_tokens,
        seed=args.seed, max_model_len=1024, dtype="bfloat16", kv_cache_memory_bytes=1 << 29,
    )  # fmt: skip
    try:
        chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        for style in args.styles:
            openings, label, drop_refusals = STYLES[style]
            prefills = [_pick(openings, r["prompt"], style) if openings else "" for r in rows]
            ids = [sampler.encode(c) + sampler.tokenizer.encode(p, add_special_tokens=False) for c, p in zip(chats, prefills)]
            for r, p, s in zip(rows, prefills, sampler.sample(ids)):
                text = f"{p} {s.completions[0].text.strip()}".strip()
                if text and not (drop_refusals and is_refusal(text)):
                    out.append({**r, "completion": text, "final_label": label, "style": style})
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
