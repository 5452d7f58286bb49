#!/usr/bin/env bash
# The whole GPU evidence run (issue 14) in one call on a lent GPU machine, inside 8 minutes of wall time:
# set-up from carried wheels, the environment and its measured ceilings, `pytest -m gpu`, then the benchmarks
# (AAADiT SFT eager and compiled, Direct Distill, Qwen-Image LoRA, issue 11's memory evidence: bf16 / fp8 /
# fp8 + block swap, teacher generation), then a summary that reads the results against the issues' goals. Every
# step has its own `timeout`; a global deadline shrinks or skips a step rather than overrun; a failed step is
# recorded and the run goes on. The memory step also gets whatever the steps before it left unused.
#
#   bash bench/gpu_run.sh              # on the GPU machine (see bench/README.md, "The GPU runs", for the call)
#   bash bench/gpu_run.sh --dry-run    # the same steps at tiny sizes on a CPU (minutes): the rehearsal
#   bash bench/gpu_run.sh --plan       # list the steps, their timeouts and commands; run nothing
#   bash bench/gpu_run.sh --only pytest_gpu,lora   # a subset (setup and env always run first)
#
# Inputs (all optional, git-ignored, carried by the run call): .whl/ (bench/gpu_wheels.sh), DiffSynth-Studio in
# $DIFFSYNTH_DIR (default bench/vendor/DiffSynth-Studio; its sides are recorded as skipped without it), ComfyUI in
# $COMFYUI_DIR (+ $COMFYUI_PYTHON) for the LoRA comparison (skipped without it).
# Output: at most 5 files in $OUT (default bench/out/gpu), within the device tool's 8 files, 2 folders deep:
#   gpu_summary.md, gpu_summary.json, gpu_goals.png, gpu_run.log, gpu_results.tar.gz (every JSON / markdown /
#   chart / log, under one folder named after the device, ready to unpack into bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=480
DRY=0 PLAN=0 ONLY=""
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --plan) PLAN=1 ;;
    --only) ONLY="${2:?--only needs a comma list of steps}"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --dry-run, --plan, --only STEPS, --help)" >&2; exit 2 ;;
  esac
  shift
done

# step | timeout s | what. Order = priority: correctness, then the goals' benchmarks, then the extras.
STEPS=(
  "setup|15|install the carried wheels (.whl/) into /tmp/site"
  "env|15|device, driver, versions; bf16 matmul and copy ceilings; LoRA block count for the GPU's memory"
  "pytest_gpu|50|pytest -m gpu: bf16/CUDA sampling, SFT, Direct Distill, LoRA, resume"
  "train|80|AAADiT SFT images/s, MFU, memory at batch 1..256 (cached, eager) vs DiffSynth's tutorial loop"
  "distill|60|Direct Distill step (12 Qwen-Image blocks, 512², 4 student steps) vs DiffSynth's DirectDistillLoss"
  "lora|75|Qwen-Image LoRA step (60 blocks, 1024², rank 32) vs DiffSynth (and ComfyUI when carried)"
  "memory|80|issue 11: Qwen-Image 1024² LoRA SFT / Direct Distill 4 / sampling at bf16, fp8, fp8 + swap (24 / 16 GB): measured vs planned peak, s/step (+ the time earlier steps left)"
  "compile|40|AAADiT SFT at batch 256..1 with torch.compile'd blocks (ours)"
  "gen|50|teacher generation images/s (60 blocks + 7B encoder, 1024², 4 steps CFG 4) vs DiffSynth"
  "summary|15|read the results against the goals; pack everything into OUT"
)
SUMMARY_RESERVE=15
ELASTIC=memory  # this step's timeout grows by what the steps before it left unused (those after keep theirs)

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
export DIFFSYNTH_DIR=${DIFFSYNTH_DIR:-}
if [[ -z "$DIFFSYNTH_DIR" && -f bench/vendor/DiffSynth-Studio/diffsynth/__init__.py ]]; then
  export DIFFSYNTH_DIR=$PWD/bench/vendor/DiffSynth-Studio
fi
if [[ -z "${COMFYUI_DIR:-}" && -f bench/vendor/ComfyUI/comfy/sd.py ]]; then
  export COMFYUI_DIR=$PWD/bench/vendor/ComfyUI
fi
LORA_SIDES=ours,diffsynth${COMFYUI_DIR:+,comfyui}
# Sides run one after another inside a step: a cap per side (the last one runs to the step's deadline) keeps
# time for those after it.
LORA_CAPS=$([[ -n "${COMFYUI_DIR:-}" ]] && echo ours=22,diffsynth=22 || echo ours=32)

OUT_DIR=${OUT:-bench/out/gpu}
WORK=${GPU_RUN_WORK:-${TMPDIR:-/tmp}/gpu_run.$$}
RES=$WORK/results
export RES LORA_LAYERS=60

# The commands. $RES, $LORA_LAYERS and $STEP_DEADLINE are read when a step runs (env sets LORA_LAYERS).
declare -A CMD
if ((DRY)); then
  CMD[setup]='if ls .whl/*.whl >/dev/null 2>&1; then '"$PY"' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RES/site-check" .whl/*.whl && echo "wheels install (not used: dry run keeps this Python'"'"'s packages)"; else echo "no .whl/: nothing to install"; fi'
  CMD[env]="$PY bench/gpu_summary.py env --dry-run --out \$RES/env.json"
  CMD[pytest_gpu]="DIT_GPU_TESTS_DEVICE=cpu $PY -m pytest -m gpu -v -p no:cacheprovider -rfE -k 'sampling and aaadit or agrees' --junitxml=\$RES/pytest_gpu.xml tests/test_gpu.py"
  CMD[train]="$PY bench/train_speed.py --device cpu --no-uncached --batch-sizes 2,1 --warmup 1 --steps 1 --side-timeout ours=50 --deadline \$STEP_DEADLINE --out \$RES/train"
  CMD[distill]="$PY bench/distill_speed.py --device cpu --image-size 32 --student-steps 2 --batch-sizes 1 --warmup 1 --steps 1 --side-timeout ours=25 --deadline \$STEP_DEADLINE --out \$RES/distill"
  CMD[lora]="$PY bench/lora_qwen_speed.py --device cpu --image-size 32 --warmup 1 --steps 1 --sides $LORA_SIDES --side-timeout $LORA_CAPS --deadline \$STEP_DEADLINE --out \$RES/lora"
  CMD[memory]="$PY bench/memory.py --device cpu --tiny --layers 2 --warmup 1 --steps 1 --budget 1GB --sampling-budget 1GB --setting-timeout 30 --deadline \$STEP_DEADLINE --results \$RES/memory"
  CMD[compile]="TORCH_COMPILE_DISABLE=1 $PY bench/train_speed.py --device cpu --no-uncached --compile --sides ours --batch-sizes 2,1 --warmup 1 --steps 1 --no-overheads --deadline \$STEP_DEADLINE --out \$RES/compile"
  CMD[gen]="$PY bench/gen_speed.py --device cpu --image-size 32 --teacher-steps 2 --batch-sizes 1 --warmup 1 --steps 1 --side-timeout ours=20 --deadline \$STEP_DEADLINE --out \$RES/gen"
  CMD[summary]="$PY bench/gpu_summary.py summary --dry-run --results \$RES --out-dir \$RES"
else
  CMD[setup]='ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ carried: run bash bench/gpu_wheels.sh here and carry .whl" >&2; exit 1; }; '"$PY"' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl'
  CMD[env]="$PY bench/gpu_summary.py env --out \$RES/env.json"
  CMD[pytest_gpu]="$PY -m pytest -m gpu -v -p no:cacheprovider -rfE --continue-on-collection-errors --junitxml=\$RES/pytest_gpu.xml \$(grep -l 'pytest.mark.gpu' tests/test_*.py)"
  CMD[train]="$PY bench/train_speed.py --device cuda --no-uncached --batch-sizes 256,128,64,32,16,8,4,2,1 --warmup 3 --steps 10 --side-timeout ours=50 --deadline \$STEP_DEADLINE --out \$RES/train"
  CMD[distill]="$PY bench/distill_speed.py --device cuda --batch-sizes 1,2,4 --warmup 2 --steps 5 --side-timeout ours=30 --deadline \$STEP_DEADLINE --out \$RES/distill"
  CMD[lora]="$PY bench/lora_qwen_speed.py --device cuda --num-layers \$LORA_LAYERS --warmup 2 --steps 3 --sides $LORA_SIDES --side-timeout $LORA_CAPS --deadline \$STEP_DEADLINE --out \$RES/lora"
  # memory: the 24 GB claims (fp8 + swap LoRA SFT, Direct Distill) first, then fp8, bf16, sampling (16 GB); a
  # setting past its limit keeps what it measured and the next one starts (bench/memory.py, MEASURE_ORDER)
  CMD[memory]="$PY bench/memory.py --device cuda --warmup 1 --steps 2 --budget 24GB --sampling-budget 16GB --setting-timeout lora_sft=25,direct4_lora=45,teacher_sampling=20 --deadline \$STEP_DEADLINE --results \$RES/memory"
  CMD[compile]="$PY bench/train_speed.py --device cuda --no-uncached --compile --sides ours --batch-sizes 256,128,64,32,16,8,4,2,1 --warmup 3 --steps 8 --no-overheads --deadline \$STEP_DEADLINE --out \$RES/compile"
  CMD[gen]="$PY bench/gen_speed.py --device cuda --teacher-steps 4 --batch-sizes 1 --warmup 1 --steps 1 --side-timeout ours=20 --deadline \$STEP_DEADLINE --out \$RES/gen"
  CMD[summary]="$PY bench/gpu_summary.py summary --results \$RES --out-dir \$RES"
fi

if ((PLAN)); then
  total=0
  echo "plan: $([[ $DRY == 1 ]] && echo 'dry run (CPU, tiny sizes)' || echo 'GPU'), budget ${BUDGET_S} s"
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name t what <<<"$entry"
    printf 'step\t%s\t%s\t%s\t%s\n' "$name" "$t" "$what" "${CMD[$name]}"
    total=$((total + t))
  done
  printf 'total\t%s\t%s\n' "$total" "$BUDGET_S"
  exit 0
fi

mkdir -p "$OUT_DIR" "$RES/logs"
rm -f "$OUT_DIR"/gpu_summary.md "$OUT_DIR"/gpu_summary.json "$OUT_DIR"/gpu_goals.png "$OUT_DIR"/gpu_results.tar.gz
LOG=$OUT_DIR/gpu_run.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
echo "gpu_run: $([[ $DRY == 1 ]] && echo 'DRY RUN' || echo 'GPU run'), $(date -u '+%F %T UTC'), budget ${BUDGET_S} s, work $WORK"
echo "DIFFSYNTH_DIR=${DIFFSYNTH_DIR:-<none>} COMFYUI_DIR=${COMFYUI_DIR:-<none>}"

record() {  # name planned timeout rc wall status
  printf '{"step": "%s", "planned_s": %s, "timeout_s": %s, "rc": %s, "wall_s": %s, "status": "%s"}\n' "$@" >>"$RES/steps.jsonl"
}

selected() {  # does step $1 run (--only)?
  [[ -z "$ONLY" || $1 == setup || $1 == env || $1 == summary || ",$ONLY," == *",$1,"* ]]
}

run_step() {
  local name=$1 planned=$2 what=$3
  selected "$name" || return
  local elapsed=$((SECONDS - START)) reserve=$SUMMARY_RESERVE
  [[ $name == summary ]] && reserve=0
  local left=$((BUDGET_S - elapsed - reserve)) t=$planned
  if [[ $name == "$ELASTIC" ]]; then  # all the time not promised to the steps after it
    local later=0 after=0 n2 t2 w2
    for e in "${STEPS[@]}"; do
      IFS='|' read -r n2 t2 w2 <<<"$e"
      ((after)) && [[ $n2 != summary ]] && selected "$n2" && later=$((later + t2))
      [[ $n2 == "$name" ]] && after=1
    done
    ((left - later > t)) && t=$((left - later))
  fi
  ((t > left)) && t=$left
  if ((t < 5)); then
    echo "=== $name: skipped, ${left} s left of the budget"
    record "$name" "$planned" 0 null 0 "skipped: no time left"
    return
  fi
  echo "=== $name (timeout ${t} s, at ${elapsed} s): $what"
  local t0=$SECONDS rc
  STEP_DEADLINE=$(($(date +%s) + t - 2))  # a benchmark writes its results before this; its timeout kills after
  export STEP_DEADLINE
  timeout --kill-after=5 "$t" bash -c "${CMD[$name]}" 2>&1 | tee "$RES/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local wall=$((SECONDS - t0)) status=ok
  ((rc == 124 || rc == 137)) && status="timed out"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed (exit $rc)"
  echo "=== $name: $status in ${wall} s"
  record "$name" "$planned" "$t" "$rc" "$wall" "$status"
  if [[ $name == setup && $rc == 0 && $DRY == 0 ]]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [[ $name == env && -f $RES/lora_layers.txt ]]; then
    LORA_LAYERS=$(cat "$RES/lora_layers.txt")
    export LORA_LAYERS
  fi
}

for entry in "${STEPS[@]}"; do
  IFS='|' read -r name t what <<<"$entry"
  run_step "$name" "$t" "$what"
done

# Pack: the summary files beside the tarball of everything, under a folder named after the device.
tag=$(cat "$RES/tag.txt" 2>/dev/null || echo gpu-unknown)
cp "$LOG" "$RES/logs/gpu_run.log" 2>/dev/null
for f in gpu_summary.md gpu_summary.json gpu_goals.png; do
  [[ -f $RES/$f ]] && cp "$RES/$f" "$OUT_DIR/$f"
done
rm -rf "$RES/site-check" "$WORK/$tag"
mv "$RES" "$WORK/$tag"
tar -czf "$OUT_DIR/gpu_results.tar.gz" -C "$WORK" "$tag"
echo "gpu_run: done in $((SECONDS - START)) s; $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
[[ -n "${GPU_RUN_WORK:-}" ]] || rm -rf "$WORK"
ok=0; [[ -f $OUT_DIR/gpu_summary.md ]] || ok=1
exec >&- 2>&-; wait  # let tee finish the log
exit $ok
