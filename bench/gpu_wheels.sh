#!/usr/bin/env bash
# Prepare what bench/gpu_run.sh needs on the lent GPU machine, which has no internet (run this here, first):
#   1. .whl/ : exactly the wheels of our requirements that the GPU image lacks (its package list is in the
#      workplace's device notes: torch, transformers, peft, accelerate, safetensors, einops, pillow, numpy, tqdm,
#      pytest, matplotlib, pandas, tokenizers are there; diffusers and two of its small dependencies are not).
#      The image's own versions of everything else are kept: carrying newer transformers/huggingface_hub would
#      pull a chain of further upgrades over packages whose installed versions we cannot check from here.
#   2. bench/vendor/DiffSynth-Studio : DiffSynth-Studio at the commit our baselines were written against, from a
#      DiffSynth git directory or checkout named by DIFFSYNTH_GIT (skipped when unset; the run then records
#      DiffSynth's sides as skipped). Its commit goes into .git_commit (an archive has no .git of its own).
# Both folders are git-ignored; the run call carries them (carry: [".whl", "bench/vendor"]).
#
#   bash bench/gpu_wheels.sh                      # wheels only
#   DIFFSYNTH_GIT=/path/to/DiffSynth-Studio/.git bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version of each wheel to carry (versions from constraints.txt, the set the tests pass with)
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0)
DIFFSYNTH_COMMIT=fed7b18fac2e
LIMIT_MIB=64  # everything that travels with one run call (working tree + carried folders)

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
n=$(ls .whl/*.whl | wc -l)
if [[ "$n" -ne "${#WHEELS[@]}" ]]; then
  echo "expected ${#WHEELS[@]} wheels, got $n:" >&2; ls .whl >&2; exit 1
fi

if [[ -n "${DIFFSYNTH_GIT:-}" ]]; then
  dest=bench/vendor/DiffSynth-Studio
  rm -rf "$dest" && mkdir -p "$dest"
  git --git-dir="$DIFFSYNTH_GIT" archive "$DIFFSYNTH_COMMIT" | tar -x -C "$dest"
  git --git-dir="$DIFFSYNTH_GIT" rev-parse "$DIFFSYNTH_COMMIT^{commit}" > "$dest/.git_commit"
fi

ls -l .whl
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl $( [[ -d bench/vendor ]] && echo bench/vendor ) | tail -1 | cut -f1)
total=$(( ${tracked:-0} + ${untracked:-0} + carried ))
printf 'wheels + vendor: %.1f MiB; with the working tree: %.1f MiB of the %d MiB a call may carry\n' \
  "$(echo "$carried / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if (( total > LIMIT_MIB * 1048576 * 3 / 4 )); then
  echo "too close to the ${LIMIT_MIB} MiB transfer limit" >&2; exit 1
fi
