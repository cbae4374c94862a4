#!/usr/bin/env bash
# The README's FPB example: 5 simulated data owners fine-tune MiniLM + LoRA on Financial PhraseBank with the DP recipe
# at epsilon = 8 each; then every client's epsilon is re-derived with an independent accountant.
#   bash scripts/fpb_example.sh [OUTPUT_DIR]        (data: ../shared/data/fpb, or $DPLORA_SHARED_DATA/fpb)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${DPLORA_SHARED_DATA:-$(cd .. && pwd)/shared/data}/fpb"
out="$(mkdir -p "${1:-outputs/fpb-eps8}" && cd "${1:-outputs/fpb-eps8}" && pwd)"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
rm -f "$out/metrics.json"
start=$(date +%s)
flwr run . --stream --federation-config "num-supernodes=5" --run-config \
  "overrides='dataset=fpb dataset.path=$data privacy.target_epsilon=8' output-dir='$out'"
echo "wall-clock: $(( $(date +%s) - start )) s"
# `flwr run --stream` exits 0 even when the run fails: judge by the results.
python - "$out/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
assert len(m["rounds"]) == m["config"]["num_rounds"], "the run did not finish every round"
print(f"initial accuracy {m['initial']['accuracy']:.4f}")
for r in m["rounds"]:
    print(f"round {r['round']}: accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  epsilon {r['epsilon']:.3f}")
PY
python scripts/verify_privacy.py "$out/metrics.json"
