#!/usr/bin/env bash
# The demo: SmolLM2-135M-Instruct -> verified GGUF files (Q8_0, Q4_K_M, Q5_K_M, Q6_K, Q4_0, F16, Q3_K_XL) in
# demo/out/, on a CPU. Run it again: nothing is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python scripts/prepare_smollm2.py demo/SmolLM2-135M-Instruct >/dev/null 2>demo-prepare.log \
  || { cat demo-prepare.log >&2; exit 1; }
rm -f demo-prepare.log
exec .venv/bin/quantforge build examples/smollm2.yaml --work-dir demo/work "$@"
