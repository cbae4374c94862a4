#!/usr/bin/env bash
# The sweeps behind docs/RESULTS.md, then its table and plot.
#
#   bash scripts/results.sh [--full] [OUT_DIR]     (default OUT_DIR: results/; data: ../shared/data or
#                                                   $DPLORA_SHARED_DATA)
#
# With --full: the whole grid docs/RESULTS.md reports, 3 datasets x 4 epsilons x 2 partitioners x 3 seeds
# (72 jobs, 254 minutes on a 2-core CPU). Without: a first look in 22 of them (89 minutes): every epsilon on
# IID shares for FPB, PubMedQA and SST-2; three seeds for the FPB target (epsilon 8 vs non-private); the
# Dirichlet(0.5) shares at epsilon 8 and non-private. --full later adds the other 50 in the same OUT_DIR.
#
# Every job is a full `flwr run` simulation (scripts/sweep.py) with 5 data owners. Each stage is one Hydra
# multirun in OUT_DIR/<stage>/; a finished stage is marked (OUT_DIR/<stage>/stage.done) and skipped when the
# script is run again, so a killed run continues with the stage it was in. A failed job fails its stage (it is
# rerun next time), the other stages still run, and the script exits 1. Then scripts/report.py builds
# OUT_DIR/report/{results.md,results.csv,privacy_utility.png} from every job below OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
if [[ "${1:-}" == "--full" ]]; then full=1; shift; fi
data="${DPLORA_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
out="$(mkdir -p "${1:-results}" && cd "${1:-results}" && pwd)"
for name in fpb pubmedqa sst2; do
  [[ -f "$data/$name/train.jsonl" ]] || { echo "error: $data/$name/train.jsonl not found" >&2; exit 2; }
done
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1

# The settings every job shares (docs/RESULTS.md explains the choice of optimizer and learning rate).
common=(model=minilm num_rounds=3 sweep.num_supernodes=5 "data_dir=$data" privacy.delta=1e-5
        train.optimizer=sgd train.learning_rate=0.2 train.momentum=0.9 train.local_epochs=1 train.batch_size=64)
sst2=(dataset=sst2 dataset.max_train=2000)  # a fixed subsample of SST-2's 67,349 training sentences

failed=()
stage() {  # stage NAME OVERRIDES...: one multirun into $out/NAME, skipped if it finished before
  local name=$1; shift
  if [[ -f "$out/$name/stage.done" ]]; then
    echo "[results] stage $name: finished before, skipped"
    return
  fi
  echo "[results] stage $name: $*"
  local start=$SECONDS
  if python scripts/sweep.py -m "${common[@]}" "$@" "hydra.sweep.dir=$out/$name"; then
    touch "$out/$name/stage.done"
    echo "[results] stage $name: done in $((SECONDS - start)) s"
  else
    failed+=("$name")
    echo "[results] stage $name: FAILED (rerun the script to retry it)" >&2
  fi
}

# A first look (22 jobs) ...
stage fpb-target dataset=fpb partitioner=iid privacy.target_epsilon=8,null seed=0,1,2
stage fpb-iid dataset=fpb partitioner=iid privacy.target_epsilon=1,4 seed=0
stage pubmedqa-iid dataset=pubmedqa partitioner=iid privacy.target_epsilon=1,4,8,null seed=0
stage sst2-iid "${sst2[@]}" partitioner=iid privacy.target_epsilon=1,4,8,null seed=0
stage dirichlet dataset=fpb,pubmedqa partitioner=dirichlet privacy.target_epsilon=8,null seed=0
stage sst2-dirichlet "${sst2[@]}" partitioner=dirichlet privacy.target_epsilon=8,null seed=0
if [[ $full == 1 ]]; then  # ... and the rest of the grid (50 jobs)
  stage fpb-iid-seeds dataset=fpb partitioner=iid privacy.target_epsilon=1,4 seed=1,2
  stage pubmedqa-iid-seeds dataset=pubmedqa partitioner=iid privacy.target_epsilon=1,4,8,null seed=1,2
  stage sst2-iid-seeds "${sst2[@]}" partitioner=iid privacy.target_epsilon=1,4,8,null seed=1,2
  stage dirichlet-low-epsilon dataset=fpb,pubmedqa partitioner=dirichlet privacy.target_epsilon=1,4 seed=0
  stage sst2-dirichlet-low-epsilon "${sst2[@]}" partitioner=dirichlet privacy.target_epsilon=1,4 seed=0
  stage dirichlet-seeds dataset=fpb,pubmedqa partitioner=dirichlet privacy.target_epsilon=1,4,8,null seed=1,2
  stage sst2-dirichlet-seeds "${sst2[@]}" partitioner=dirichlet privacy.target_epsilon=1,4,8,null seed=1,2
fi

python scripts/report.py "$out" --out "$out/report"
if (( ${#failed[@]} )); then
  echo "[results] failed stages: ${failed[*]} (their finished jobs are in the report; rerun to retry)" >&2
  exit 1
fi
