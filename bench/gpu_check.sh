#!/usr/bin/env bash
# GPU verification of the reward server in one command (docs/gpu.md):
#   bash bench/gpu_check.sh [OUT_DIR] [options of python -m bench.gpu_check]
# No network and nothing to download: it uses a Python that already has torch with CUDA (the
# repository's .venv when its torch sees a GPU, else the system's with PYTHONPATH = repository root),
# runs every stage within GPU_CHECK_BUDGET_S seconds (default 480) and prints where the results are.
# `--smoke` runs the CPU variant (tiny model, fp32, no TensorRT-LLM) with the first Python that has torch.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
OUT="$ROOT/bench/results/gpu"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option is OUT_DIR
    OUT="$1"; shift
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
SMOKE=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1; done

# Candidates in order of preference; each is asked (with a time limit) whether torch sees a GPU.
CANDIDATES=()
[ -x "$ROOT/.venv/bin/python" ] && CANDIDATES+=("$ROOT/.venv/bin/python")
for name in python3 python; do
    found="$(command -v "$name" 2>/dev/null)" && CANDIDATES+=("$found")
done
PYTHON="" ; FALLBACK=""
for candidate in "${CANDIDATES[@]}"; do
    timeout 60 "$candidate" -c "import torch" >/dev/null 2>&1 || continue
    [ -z "$FALLBACK" ] && FALLBACK="$candidate"
    [ "$SMOKE" = 1 ] && { PYTHON="$candidate"; break; }
    if timeout 60 "$candidate" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
            >/dev/null 2>&1; then
        PYTHON="$candidate"; break
    fi
done
if [ -z "$PYTHON" ]; then
    if [ -z "$FALLBACK" ]; then
        echo "gpu_check: no Python with torch found (tried: ${CANDIDATES[*]:-none})" >&2
        exit 2
    fi
    # The report then says that no CUDA device is visible, rather than nothing being written at all.
    echo "gpu_check: no Python whose torch sees a GPU; using $FALLBACK" >&2
    PYTHON="$FALLBACK"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

# The stages get what is left of the budget minus a margin for the final report write; `timeout`
# sends SIGTERM (the script writes its partial report and stops the server), then SIGKILL.
LEFT=$(( BUDGET_S - (SECONDS - START) ))
STAGES_S=$(( LEFT - 20 ))
if [ "$STAGES_S" -lt 30 ]; then
    echo "gpu_check: only ${LEFT}s of the ${BUDGET_S}s budget left after choosing a Python" >&2
    exit 2
fi
echo "gpu_check: $PYTHON, ${STAGES_S}s for the stages, results in $OUT"
cd "$ROOT"
timeout --signal=TERM --kill-after=10 "$(( LEFT - 5 ))" \
    "$PYTHON" -m bench.gpu_check --out "$OUT" --budget-s "$STAGES_S" "$@"
CODE=$?
[ "$CODE" = 124 ] && echo "gpu_check: the ${BUDGET_S}s budget ran out; the report holds every finished stage" >&2
echo "gpu_check: results in $OUT/gpu_check.json and $OUT/gpu_check.md (logs in $OUT/logs)"
exit "$CODE"
