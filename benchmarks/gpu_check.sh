#!/usr/bin/env bash
# The prepared GPU check, under 5 minutes on one GPU: the CUDA tests, then benchmarks/gpu_check.py (the update
# at the paper configuration in fp32 / TF32 / bf16, eager / CUDA graph / torch.compile, acting latency, peak
# memory), which writes benchmarks/results/gpu-<device>.{json,md} and the table into RESULTS.md.
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
  extra=()
fi
elapsed=$(( $(date +%s) - start ))
budget=$(( TOTAL_S - elapsed - 15 ))
timeout $(( TOTAL_S - elapsed )) python benchmarks/gpu_check.py --budget-s "$budget" --tests "$tests" "${extra[@]}"
