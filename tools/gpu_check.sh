#!/usr/bin/env bash
# The GPU-only checks, on one CUDA machine: the `gpu`-marked tests (MegaBlocks dMoE, the merge layer on CUDA
# against float64, no host sync in a training forward+backward), the merge layer's speed and launch counts on the
# GPU, bf16 training throughput and MFU per method (gradient accumulation 1 and 4, eager and compiled), a
# profile of one dense training step, and activation checkpointing's memory (`torch.cuda.max_memory_allocated`)
# next to the memory model's prediction. CI never runs this (it has no GPU); docs/gpu.md records what it printed.
#
#   bash tools/gpu_check.sh setup test layer train profile memory   # all of it (the stages run in the order given)
#
# Budget: about 10 minutes of device time in all on an H100 (setup ~1.5 min with prebuilt wheels, test ~1, layer
# ~1, train ~6, profile ~0.5, memory ~0.5); TRAIN_STEPS (default 20) trades precision for time.
#
# `setup` installs the `gpu` extra. With no network, put the wheels/sdists in $WHEELS (default .whl/):
# deepspeed and its pure-Python needs as wheels, megablocks, grouped_gemm and stanford-stk as sdists, which
# are compiled here for this GPU's architecture only (TORCH_CUDA_ARCH_LIST, default from the device).
# Built wheels are copied to $OUT/wheels when $OUT is set, so a later machine can skip the compile.
set -euo pipefail
if [[ " $* " == *" -h "* || " $* " == *" --help "* ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0
fi
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/camex_site}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# DeepSpeed's op builder reads TORCH_CUDA_ARCH_LIST as numbers: a '9.0a' (as some CUDA images set) breaks its JIT
[ -z "${TORCH_CUDA_ARCH_LIST:-}" ] || export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9])[a-z]+/\1/g')

stage_setup() {
  if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch sees no CUDA device" >&2; exit 1
  fi
  if [ ! -d "$WHEELS" ]; then
    $PY -m pip install -q --target "$SITE" "deepspeed==0.19.8" "megablocks==0.10.0" "grouped_gemm==0.3.0"
    return
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  local built="$LOGS/wheels" src=/tmp/camex_sdists start=$SECONDS
  mkdir -p "$built" "$src"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
    "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")} MAX_JOBS=${MAX_JOBS:-16}
  for sdist in "$WHEELS"/*.tar.gz; do  # an sdist whose wheel is not already in $WHEELS
    local name; name=$(basename "$sdist" .tar.gz)
    ls "$WHEELS/$name"-*.whl >/dev/null 2>&1 || tar xzf "$sdist" -C "$src"
  done
  # megablocks 0.10.0 passes CUB's `debug_synchronous` argument, which CUDA 13's CUB no longer has
  [ ! -f "$src"/megablocks-0.10.0/csrc/cumsum.h ] ||
    sed -i -z 's/stream,\s*debug_synchronous))/stream))/g' "$src"/megablocks-0.10.0/csrc/cumsum.h
  if [ -n "$(ls "$src")" ]; then
    ls -d "$src"/*/ | xargs -P 3 -I{} $PY -m pip wheel -q --no-build-isolation --no-deps -w "$built" {}
    echo "gpu_check: built $(ls "$built" | tr '\n' ' ')in $((SECONDS - start)) s (arch $TORCH_CUDA_ARCH_LIST)"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$built"/*.whl
  fi
  $PY -c "import deepspeed, megablocks, grouped_gemm, torch; print('gpu_check: torch', torch.__version__,
  'deepspeed', deepspeed.__version__, 'on', torch.cuda.get_device_name())"
}

stage_test() {
  $PY -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$LOGS/test.log"
}

stage_layer() {
  # the issue-2 shapes in fp32, then GPT-2-small shapes in bf16 (the shapes of ds_configs/models/gpt2_small_camex.json)
  $PY tools/bench_layer.py --device cuda --methods euclid,camex,camex-ties --warmup 5 --steps 10 --repeats 2 \
    --pair-steps 10 2>&1 | tee "$LOGS/layer_fp32.log"
  $PY tools/bench_layer.py --device cuda --dtype bfloat16 --d 768 --h 3072 --T 256 --seq 1024 \
    --methods euclid,camex,camex-ties --warmup 5 --steps 10 --repeats 2 --pair-steps 10 2>&1 | tee "$LOGS/layer_bf16.log"
  $PY tools/bench_layer.py --device cuda --dtype bfloat16 --d 768 --h 3072 --T 256 --seq 1024 --batch 8 \
    --methods euclid,camex,camex-ties --grad_accum 4 --no-naive --warmup 3 --steps 5 --repeats 1 --pair-steps 0 \
    2>&1 | tee "$LOGS/layer_bf16_grad_accum4.log"
  $PY tools/bench_layer.py --device cuda --dtype bfloat16 --d 768 --h 3072 --T 256 --seq 1024 --batch 8 \
    --methods euclid,camex,camex-ties --count-ops 2>&1 | tee "$LOGS/layer_bf16_count_ops.log"
}

stage_train() {
  # one GPU, ZeRO 0 (nothing to shard), bf16, GPT-2 small, 16 sequences of 1024 tokens per micro-batch
  local common=(--ranks 1 --steps "${TRAIN_STEPS:-20}" --log_interval 5 --model ds_configs/models/gpt2_small_camex.json
                --deepspeed_config ds_configs/gpu_zero0_bf16.json --peak_tflops "${PEAK_TFLOPS:-989}")
  $PY tools/bench_train.py "${common[@]}" --methods dense,smoe,camex-dynamic --smoe_backend megablocks 2>&1 |
    tee "$LOGS/train.log"
  $PY tools/bench_train.py "${common[@]}" --methods smoe --smoe_backend deepspeed 2>&1 | tee "$LOGS/train_smoe_ds.log"
  $PY tools/bench_train.py "${common[@]}" --methods euclid,camex,camex-ties --grad_accum 1,4 2>&1 |
    tee "$LOGS/train_grad_accum.log"
  $PY tools/bench_train.py "${common[@]}" --methods dense,camex --compile 2>&1 | tee "$LOGS/train_compiled.log"
}

stage_profile() {
  # where one dense bf16 training step of GPT-2 small spends its time (top ops by CUDA time, and a Chrome trace)
  $PY - "$LOGS" <<'PROFILE' 2>&1 | tee "$LOGS/profile_dense.log"
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from camex_ds.model import build_model
cfg = json.load(open("ds_configs/models/gpt2_small_camex.json")); cfg.update(moe=None, vocab_size=50304)
model = build_model(cfg).cuda().to(torch.bfloat16)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, 50304, (16, 1024), device="cuda")
def step():
    model(ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
prof.export_chrome_trace(f"{sys.argv[1]}/profile_dense_trace.json")
PROFILE
}

stage_memory() {
  # issue 27: one training step of the gpt2_small_camex shapes (fp32, micro-batch 8, ep 1) with and without
  # checkpointing, measured by torch.cuda.max_memory_allocated, then the memory model's peaks for the same step
  $PY tools/bench_checkpointing.py --device cuda 2>&1 | tee "$LOGS/memory.log"
  for every in "" "--checkpoint_every 1"; do
    $PY -c 'import sys; from camex_ds.cli.flops import main; sys.exit(main(sys.argv[1:]))' --memory \
      --model_config ds_configs/models/gpt2_small_camex.json --vocab_size 4096 --micro_batch 8 --ep_size 1 \
      --zero_stage 0 $every 2>&1 | grep -E "^\| (peak|activations|camex)" | \
      sed "s/^/${every:-no checkpointing}: /" | tee -a "$LOGS/memory.log"
  done
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(setup test layer train profile memory)
for stage in "${stages[@]}"; do
  case $stage in
    setup | test | layer | train | profile | memory) ;;
    *) echo "gpu_check: unknown stage '$stage' (choose from setup, test, layer, train, profile, memory)" >&2; exit 2 ;;
  esac
done
failed=()
for stage in "${stages[@]}"; do
  if [ "$stage" = setup ]; then stage_setup; else "stage_$stage" || failed+=("$stage"); fi  # the others need setup
done
[ ${#failed[@]} -eq 0 ] || { echo "gpu_check: failed: ${failed[*]}" >&2; exit 1; }
