#!/usr/bin/env bash
# DPO step throughput and MFU on one GPU: our `dpo` recipe vs torchtune's `full_dpo_distributed`,
# on a random-init 1B-class Llama (dim 2048, 16 layers, GQA 32/8 heads, MLP 8192) in bf16.
# Target: 40% MFU on an H100. Runs bench/dpo_throughput.py; prints its table.
#
# For a machine that has PyTorch (with CUDA) but none of our packages and no network: everything
# else installs from wheels carried beside this script, into a venv that reuses the machine's torch.
#
# 1. Here (with PyPI access), build the carry-along directory:
#        bash bench/gpu_check.sh --build-wheels outputs/gpu_check
#    It copies this script and dpo_throughput.py, builds our wheel (`pip wheel --no-deps .`) and
#    every other dependency's (`pip wheel -w DIR torchtune==0.6.1 torchao==0.15.0 hydra-core ...`),
#    leaving torch out: the GPU machine's own build is used. `pip wheel` builds for the Python
#    it runs under, so use the target's Python version (PIP=/path/to/a/py3.X/venv/bin/pip).
# 2. Copy that directory to the GPU machine and run:  bash gpu_check/gpu_check.sh
#
# Settings (environment): SIZE=1b DEVICE=cuda DTYPE=bf16 NPROC=1 BATCH=8 SEQ=512 STEPS=20
# WARMUP=5 PEAK_TFLOPS=989 (H100 SXM bf16 dense; H200 is the same chip) OUT=./gpu_check_out.
# SKIP_INSTALL=1 uses the current python as it is (e.g. a dev checkout). A CPU dry run of the
# whole path: SKIP_INSTALL=1 SIZE=tiny DEVICE=cpu DTYPE=fp32 NPROC=2 BATCH=2 SEQ=128 STEPS=4 WARMUP=1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPS=(torchtune==0.6.1 torchao==0.15.0 "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "datasets>=3.0"
      "safetensors>=0.4" "tokenizers>=0.20" "transformers>=4.50" tqdm)

if [[ "${1:-}" == "--build-wheels" ]]; then
  DEST="${2:?usage: gpu_check.sh --build-wheels DIR}"
  ROOT="$(cd "$HERE/.." && pwd)"
  PIP="${PIP:-$ROOT/.venv/bin/pip}"
  mkdir -p "$DEST/wheels"
  cp "$HERE/gpu_check.sh" "$HERE/dpo_throughput.py" "$DEST/"
  "$PIP" wheel -q --no-deps -w "$DEST/wheels" "$ROOT"
  # Every dependency (and theirs) as a wheel; sdist-only ones (antlr4 for hydra) are built here.
  # None of them needs torch; any torch/CUDA wheel that slips in is removed: the target's is used.
  "$PIP" wheel -q -w "$DEST/wheels" "${DEPS[@]}"
  rm -f "$DEST"/wheels/torch-*.whl "$DEST"/wheels/nvidia_*.whl "$DEST"/wheels/triton-*.whl
  echo "carry $DEST to the GPU machine, then: bash $(basename "$DEST")/gpu_check.sh"
  exit 0
fi

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
if [[ "${SKIP_INSTALL:-0}" == "1" ]]; then
  PY="${PYTHON:-python}"
else
  BASE_PY="${PYTHON:-python3}"
  "$BASE_PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  if "$BASE_PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
    PY="$BASE_PY"  # torch lives in a venv: install beside it
  else
    [[ -x "$OUT/venv/bin/python" ]] || "$BASE_PY" -m venv --system-site-packages "$OUT/venv"  # reuse the machine's torch
    PY="$OUT/venv/bin/python"
  fi
  "$PY" -m pip install -q --no-index --find-links "$HERE/wheels" "${DEPS[@]}"
  "$PY" -m pip install -q --no-index --no-deps --find-links "$HERE/wheels" rlaif-recipes
fi
"$PY" -c "import torch; assert torch.cuda.is_available() or '${DEVICE:-cuda}' == 'cpu', 'no CUDA device visible'"
[[ "${DEVICE:-cuda}" == "cuda" ]] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

"$PY" "$HERE/dpo_throughput.py" --out "$OUT" --size "${SIZE:-1b}" --device "${DEVICE:-cuda}" \
  --dtype "${DTYPE:-bf16}" --nproc "${NPROC:-1}" --batch-size "${BATCH:-8}" --max-seq-len "${SEQ:-512}" \
  --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" --peak-tflops "${PEAK_TFLOPS:-989}" | tee "$OUT/table.md"
