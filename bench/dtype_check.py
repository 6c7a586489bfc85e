"""Which dtype this machine should train and sample in: bf16 against fp32, side by side, and what
`dtype: auto` picks here (rlaif_recipes/dtypes.py).

Why: bf16 halves memory and, on CPUs with AVX512-BF16 or AMX, runs matmuls 2-5x faster than fp32;
on a CPU without them (AVX2 only) torch emulates bf16: 5-200x slower than fp32 (bench/RESULTS.md).
The demo's configs ask for `auto`; this shows the reason on the machine at hand:

- the CPU's reading (torch's AVX512-BF16 / AMX checks) and what `auto` resolves to;
- the best square matmul in each dtype, and SmolLM2-135M-Instruct's own matmul shapes at 64 tokens
  (`online_dpo.shape_peak`);
- one SmolLM2 forward on 64 tokens in each dtype, as the recipes build the model.

    python bench/dtype_check.py [--threads 2]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchtune import training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_dpo import peak_flops, shape_peak  # noqa: E402

from rlaif_recipes import dtypes  # noqa: E402
from rlaif_recipes.models.get_model import get_model  # noqa: E402
from rlaif_recipes.models.hf_model import hf_checkpointer  # noqa: E402
from rlaif_recipes.policy import build_policy  # noqa: E402

TOKENS = 64


def forward_seconds(model_dir: Path, dtype: torch.dtype, reps: int) -> float:
    """Best time of one SmolLM2 forward on TOKENS tokens, the model built as the recipes build it."""
    with tempfile.TemporaryDirectory(prefix="rlaif-dtype-") as unused:  # the checkpointer wants an output dir
        state = hf_checkpointer(str(model_dir), output_dir=unused).load_checkpoint()[training.MODEL_KEY]
    model_cfg = OmegaConf.create({"_component_": "rlaif_recipes.models.decoder_from_hf_dir", "checkpoint_dir": str(model_dir)})
    model = build_policy(model_cfg, state, device=torch.device("cpu"), dtype=dtype).eval()
    tokens = torch.randint(0, 1000, (1, TOKENS))
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):  # the first is a warm-up
            start = time.perf_counter()
            model(tokens)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the recipes' default on 2 cores)")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = get_model("smollm2-135m-instruct")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}: "
          f"native bf16 {dtypes.bf16_is_native('cpu')}, so dtype=auto -> {dtypes.resolve_dtype('auto', 'cpu')}, "
          f"{args.threads} threads")  # fmt: skip
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows[name] = (
            peak_flops(dtype, sizes=(1024,), reps=args.reps) / 1e9,
            shape_peak(model_dir, TOKENS, TOKENS, dtype, reps=args.reps) / 1e9,
            forward_seconds(model_dir, dtype, args.reps),
        )
    print(f"\n| dtype | square matmul GFLOP/s (1024) | SmolLM2 shapes GFLOP/s ({TOKENS} tokens) | SmolLM2 forward s ({TOKENS} tokens) | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, (square, shapes, forward) in rows.items():
        print(f"| {name} | {square:.1f} | {shapes:.1f} | {forward:.3f} | {forward / rows['fp32'][2]:.1f}x the time |")


if __name__ == "__main__":
    main()
