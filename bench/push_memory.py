"""Peak memory of one weight push into vLLM: the whole model gathered at once vs streamed.

    python bench/push_memory.py                        # SmolLM2-135M-Instruct, full and LoRA, 2 ranks (FSDP2, gloo)
    python bench/push_memory.py --model DIR --nproc 1  # any local HF checkpoint, one process

Each case runs in fresh processes under torchrun, as online_dpo does: the policy is built and
sharded with FSDP2 (`build_policy`), one vLLM engine per rank, then one push. Rank 0's resident
memory (RSS) is sampled every millisecond during the push; the figure is its peak minus its level
just before. `whole` pushes as online_dpo did before streaming: every weight gathered into one
dict (LoRA merged into copies of the base weights) and the whole dict renamed before vLLM's reload;
`streamed` pushes `streamed_state_dict` (LoRA merged module by module) through the sampler's
lazy renaming. Run `whole` against the code before streaming with --code DIR (an export of that commit).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
LORA = dict(
    _component_="rlaif_recipes.models.lora_decoder_from_hf_dir",
    lora_attn_modules=["q_proj", "v_proj", "output_proj"],
    apply_lora_to_mlp=True,
    lora_rank=8,
    lora_alpha=16.0,
)


def worker(model_dir: str, mode: str, lora: bool, result: str) -> None:
    """One rank: build the policy, start the engine, push once while a thread samples RSS."""
    import psutil
    import torch
    from omegaconf import OmegaConf
    from torchtune import training

    from rlaif_recipes.distributed import destroy_process_group, init_process_group
    from rlaif_recipes.lora import adapter_shapes, fresh_adapters, merged_weights
    from rlaif_recipes.models import hf_checkpointer
    from rlaif_recipes.policy import build_policy, full_state_dict
    from rlaif_recipes.samplers import VLLMSampler

    init_process_group()
    rank = torch.distributed.get_rank()
    base = hf_checkpointer(model_dir, output_dir="/tmp/push-memory-unused").load_checkpoint()[training.MODEL_KEY]
    component = LORA if lora else {"_component_": "rlaif_recipes.models.decoder_from_hf_dir"}
    cfg = OmegaConf.create({**component, "checkpoint_dir": model_dir})
    adapters = fresh_adapters(adapter_shapes(cfg), seed=0) if lora else {}
    model = build_policy(cfg, {**base, **adapters}, device=torch.device("cpu"), dtype=torch.float32)
    del base
    sampler = VLLMSampler(model_dir, dtype="float32", kv_cache_memory_bytes=64 << 20, max_tokens=8, max_model_len=512)
    process, peak, running = psutil.Process(), [0], [True]

    def watch() -> None:
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    torch.distributed.barrier()
    before = process.memory_info().rss
    thread = threading.Thread(target=watch)
    thread.start()
    start = time.perf_counter()
    if mode == "whole":
        weights = full_state_dict(model)
        sampler.update_weights(merged_weights(model, weights) if lora else weights)
        del weights
    else:
        from rlaif_recipes.lora import merge_adapters
        from rlaif_recipes.policy import streamed_state_dict

        stream = streamed_state_dict(model)
        sampler.update_weights(merge_adapters(model, stream) if lora else stream)
    seconds = time.perf_counter() - start
    running[0] = False
    thread.join()
    params = sum(p.numel() for p in model.parameters())  # a DTensor counts its full shape
    if rank == 0:
        Path(result).write_text(json.dumps({"peak_delta_mb": (peak[0] - before) / 2**20, "rss_before_mb": before / 2**20,
                                            "seconds": seconds, "model_mb": params * 4 / 2**20}))
    sampler.close()
    destroy_process_group()


def run_case(model_dir: str, mode: str, lora: bool, nproc: int, code: Path, out: Path) -> Dict[str, float]:
    result = out / f"{mode}-{'lora' if lora else 'full'}.json"
    env = {**os.environ, "PYTHONPATH": f"{code}:{os.environ.get('PYTHONPATH', '')}", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__, "--worker",
           model_dir, mode, str(int(lora)), str(result)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=out, stdout=subprocess.DEVNULL, stderr=open(out / "log.txt", "a"))
    return json.loads(result.read_text())


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint directory (default: SmolLM2-135M-Instruct via rlaif get-model)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["whole", "streamed"], choices=["whole", "streamed"])
    parser.add_argument("--code", default=str(ROOT), help="the package's source tree to measure (default: this one)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "push_memory"))
    args = parser.parse_args(argv)
    if args.model is None:
        from rlaif_recipes.models.get_model import get_model

        args.model = str(get_model("smollm2-135m-instruct"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.uname().nodename} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); "
          f"model {args.model}, {args.nproc} rank(s), FSDP2 on CPU, fp32; code {args.code}")
    print("| push | model | rank 0 RSS before (MiB) | peak during push (MiB above before) | push time (s) |")
    print("|---|---|---:|---:|---:|")
    for lora in (False, True):
        for mode in args.modes:
            r = run_case(args.model, mode, lora, args.nproc, Path(args.code), out)
            print(f"| {mode} | {'LoRA' if lora else 'full'} ({r['model_mb']:.0f} MiB fp32) | {r['rss_before_mb']:.0f} | "
                  f"+{r['peak_delta_mb']:.0f} | {r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], bool(int(sys.argv[4])), sys.argv[5])
    else:
        main(sys.argv[1:])
