"""Demo step 1: an over-cautious starting policy, fine-tuned with torchtune's own SFT recipe.

Make the tiny model (a few million parameters) and fine-tune it with
`tune run full_finetune_single_device --config conf/sft.yaml` on XSTest's human-annotated
completions, train split only. The annotated model refuses many of XSTest's safe prompts, so its
imitator does too: the false refusals RLAIF is meant to remove. `evaluate` measures it.

    python -m rlaif_recipes.demo_policy --out outputs/demo
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from rlaif_recipes.config import CONF_DIR
from rlaif_recipes.models import make_tiny_model

# The demo's model: about 4M parameters, small enough to fine-tune in minutes on 2 CPU cores,
# big enough to answer in the style of its training data (make_tiny_model's defaults are smaller).
DEMO_MODEL = dict(dim=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_dim=768)
SFT_CONFIG = CONF_DIR / "sft.yaml"


def last_checkpoint(output_dir: Path) -> Path:
    """The HF checkpoint of the last finished epoch (`output_dir/epoch_N` with the largest N)."""
    epochs = sorted((int(m.group(1)), p) for p in output_dir.glob("epoch_*") if (m := re.fullmatch(r"epoch_(\d+)", p.name)))
    if not epochs:
        raise FileNotFoundError(f"no epoch_N checkpoint in {output_dir}; run the SFT step first")
    return epochs[-1][1]


def sft(checkpoint_dir: Path, output_dir: Path, overrides: Sequence[str] = ()) -> Path:
    """Fine-tune with torchtune's recipe and our config, as a user would run it; return the final
    checkpoint (the earlier epochs' copies are deleted: ~17 MB each)."""
    cmd = [
        str(Path(sys.executable).parent / "tune"), "run", "full_finetune_single_device", "--config", str(SFT_CONFIG),
        f"checkpoint_dir={checkpoint_dir}", f"output_dir={output_dir}", *overrides,
    ]  # fmt: skip
    log = output_dir.parent / f"{output_dir.name}.log"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("epoch_*"):  # a previous run's checkpoints must not pass for this one's
        shutil.rmtree(stale)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"SFT failed: {' '.join(cmd)}; see {log}")
    final = last_checkpoint(output_dir)
    shards = sorted(final.glob("model-*-of-*.safetensors"))
    if len(shards) == 1:  # one shard: name it as model_type=tiny's checkpointer expects (model.safetensors)
        os.replace(shards[0], final / "model.safetensors")
        (final / "model.safetensors.index.json").unlink(missing_ok=True)
    for earlier in output_dir.glob("epoch_*"):  # torchtune saves every epoch; the demo needs only the last
        if earlier != final:
            shutil.rmtree(earlier)
    return final


def starting_policy(out: Path, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """Step 1 of the demo: the tiny model, fine-tuned; reused when a finished SFT run is there."""
    done = out / "sft" / "DONE"
    if done.is_file():
        return Path(done.read_text().strip())
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(str(model_dir), seed=seed, **DEMO_MODEL)
    checkpoint = sft(model_dir, out / "sft", [f"seed={seed}", *overrides])
    done.write_text(str(checkpoint))
    return checkpoint


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="directory for the model and the SFT run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's weights and SFT")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for conf/sft.yaml (e.g. epochs=2)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    checkpoint = starting_policy(Path(args.out), args.seed, args.overrides)
    print(f"SFT policy: {checkpoint} ({time.perf_counter() - start:.0f} s); measure it with: rlaif run evaluate checkpoint_dir={checkpoint}")
    return checkpoint


if __name__ == "__main__":
    main()
