# Sourced by scripts/results.sh and scripts/llm_results.sh: one stage of a grid. Needs $tag (the log prefix),
# $dry, $out and the array common; appends a failed stage's name to the array failed.
failed=()
stage() {  # stage NAME OVERRIDES...: one multirun into $out/NAME, skipped if it finished before
  local name=$1; shift
  if [[ $dry == 1 ]]; then
    echo "python scripts/sweep.py -m ${common[*]} $* hydra.sweep.dir=$out/$name"
    return
  fi
  if [[ -f "$out/$name/stage.done" ]]; then
    echo "[$tag] stage $name: finished before, skipped"
    return
  fi
  echo "[$tag] stage $name: $*"
  local start=$SECONDS
  if python scripts/sweep.py -m "${common[@]}" "$@" "hydra.sweep.dir=$out/$name"; then
    touch "$out/$name/stage.done"
    echo "[$tag] stage $name: done in $((SECONDS - start)) s"
  else
    failed+=("$name")
    echo "[$tag] stage $name: FAILED (rerun the script to retry it)" >&2
  fi
}
