#!/usr/bin/env bash
# The privacy-utility grid behind docs/RESULTS.md, then its table and plot (beside the grid before the recipes).
#
#   bash scripts/results.sh [--full] [--dry-run] [OUT_DIR]   (default OUT_DIR: results/frontier; data:
#                                                            ../shared/data or $DPLORA_SHARED_DATA)
#
# Every job uses the default training recipe of its privacy choice (conf/recipe/dp.yaml for epsilon 1, 4 and 8,
# conf/recipe/none.yaml for the non-private arm; on SST-2 with the share SST-2's own check chose): MiniLM, 5
# data owners, FedAvg on IID shares and FedProx on Dirichlet(0.5) shares. Without --full, a first look: every epsilon and three seeds on IID shares for FPB,
# SST-2 (a 2,000-sentence subsample) and PubMedQA. --full adds SST-2 with 10,000 sentences (IID: how the gap
# closes with more records per owner) and the Dirichlet shares, in the same OUT_DIR.
#
# Every job is a full `flwr run` simulation (scripts/sweep.py). Each stage is one Hydra multirun in
# OUT_DIR/<stage>/; a finished stage is marked (OUT_DIR/<stage>/stage.done) and skipped when the script is run
# again, and within a stage every finished job is skipped (scripts/sweep.py), so a killed run continues with
# the job it was in, from its last finished round. A failed job fails its stage (it is rerun next time), the other stages still run, and the
# script exits 1. Then scripts/report.py builds
# OUT_DIR/report/{results.md,results.csv,targets.md,privacy_utility.png,before.md} from every job below OUT_DIR, beside
# docs/results/before/results.csv (the grid before the recipes). --dry-run prints each stage's sweep command
# and runs nothing.
set -euo pipefail
{  # bash reads all of it before it runs: editing this file cannot change a grid that is running
cd "$(dirname "$0")/.."

full=0 dry=0
while [[ "${1:-}" == --* ]]; do
  case $1 in
    --full) full=1 ;;
    --dry-run) dry=1 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
data="${DPLORA_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
out="${1:-results/frontier}"
for name in fpb pubmedqa sst2; do
  [[ -f "$data/$name/train.jsonl" ]] || { echo "error: $data/$name/train.jsonl not found" >&2; exit 2; }
done
[[ $dry == 1 ]] || out="$(mkdir -p "$out" && cd "$out" && pwd)"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1

# What every job shares; the training settings are the recipes' (conf/recipe/).
common=(model=minilm sweep.num_supernodes=5 "data_dir=$data" privacy.delta=1e-5)
dp=(privacy=dp privacy.target_epsilon=1,4,8)
none=(privacy=none)
seeds=seed=0,1,2
sst2k2=(dataset=sst2 dataset.max_train=2000)    # fixed subsamples of SST-2's 67,349 training sentences
sst2k10=(dataset=sst2 dataset.max_train=10000)
# SST-2's own check of the recipes (docs/results/recipe-sst2.json, on its 2,000-sentence validation split)
# chose FPB's recipe for the DP arm and another share for the non-private one; PubMedQA has no check.
sst2none=(train.sample_rate=0.5)
skew=(partitioner=dirichlet partitioner.alpha=0.5 strategy=fedprox)

tag=results
source scripts/stage.sh  # stage NAME OVERRIDES...: one multirun into $out/NAME, skipped if it finished before

# A first look (36 jobs): IID shares, every epsilon, three seeds ...
stage fpb-iid-dp dataset=fpb partitioner=iid "${dp[@]}" $seeds
stage fpb-iid-none dataset=fpb partitioner=iid "${none[@]}" $seeds
stage sst2-2000-iid-dp "${sst2k2[@]}" partitioner=iid "${dp[@]}" $seeds
stage sst2-2000-iid-none "${sst2k2[@]}" partitioner=iid "${none[@]}" "${sst2none[@]}" $seeds
stage pubmedqa-iid-dp dataset=pubmedqa partitioner=iid "${dp[@]}" $seeds
stage pubmedqa-iid-none dataset=pubmedqa partitioner=iid "${none[@]}" $seeds
if [[ $full == 1 ]]; then  # ... then 10,000 SST-2 sentences and the skewed shares (48 jobs)
  stage sst2-10000-iid-dp "${sst2k10[@]}" partitioner=iid "${dp[@]}" $seeds
  stage sst2-10000-iid-none "${sst2k10[@]}" partitioner=iid "${none[@]}" "${sst2none[@]}" $seeds
  stage fpb-dirichlet-dp dataset=fpb "${skew[@]}" "${dp[@]}" $seeds
  stage fpb-dirichlet-none dataset=fpb "${skew[@]}" "${none[@]}" $seeds
  stage sst2-2000-dirichlet-dp "${sst2k2[@]}" "${skew[@]}" "${dp[@]}" $seeds
  stage sst2-2000-dirichlet-none "${sst2k2[@]}" "${skew[@]}" "${none[@]}" "${sst2none[@]}" $seeds
  stage pubmedqa-dirichlet-dp dataset=pubmedqa "${skew[@]}" "${dp[@]}" $seeds
  stage pubmedqa-dirichlet-none dataset=pubmedqa "${skew[@]}" "${none[@]}" $seeds
fi
[[ $dry == 1 ]] && exit 0

python scripts/report.py "$out" --out "$out/report" --before docs/results/before/results.csv
if (( ${#failed[@]} )); then
  echo "[results] failed stages: ${failed[*]} (their finished jobs are in the report; rerun to retry)" >&2
  exit 1
fi
exit 0
}
