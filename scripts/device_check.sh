#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (no internet there), most wanted first: the reinforce
# job as its defaults run it against the bare bf16 teacher forward (bench_gpu --job-only, which times fp32 and tf32
# forwards too); the compiled job against float32 crops in interleaved rounds (bench_gpu_ab; TF32 crops became the
# default beside bf16 teachers on 2026-11-28's 1.09x); the eager job, the default, whose teacher's forward is launched
# op by op from Python beside the render and preparing threads, its launches taking twice the bare forward's host
# time in the job (run G): its forward traced (--compile trace: launched from C++ without the GIL; 1.71-2.30x on a CPU
# core beside 2 preparing threads, results/bench_trace.md), 2 preparing threads instead of 4 (1.07x, 1.02-1.31, on
# 2026-11-28) and torch's intra-op threads 1 (no OpenMP team spinning beside the launches); which thread holds the GIL in the eager
# job (profile_job --profiler py-spy, its wheel carried); then the training loader with replay_on_device decoding and
# rendering on the GPU, and its fidelity (bench_loader --device cuda). Figures land in $OUT (default results/gpu),
# each step's Markdown as it ends; the rest (JSON, py-spy's stacks) is packed into $OUT/rest.tgz at the end, as the
# device tool brings back 8 files at most. (bench_decode, bench_resample and imagenet+rare's render threads, measured
# on 2026-11-27 and -28, run on their own: results/bench_decode_h100.md, bench_resample_h100.md,
# bench_gpu_ab_rare.md; the eager job's torch profile is run G's, results/bench_gpu.md.)
#
#   bash scripts/device_check.sh DATASET [WHEELS]
#   DEVICE=cpu OUT=/tmp/dry bash scripts/device_check.sh DATASET   # a dry run on a CPU
#
# DATASET: an image dataset folder (e.g. 64 imagenet-sample rows as parquet); WHEELS: a folder of wheels the machine
# lacks (installed with --no-deps into /tmp/site; one the machine's Python cannot take leaves the machine's own in
# place). scripts/device_prepare.sh builds both here (.gpudata/imagenet64, .whl), to carry to the machine. Each step
# has its own time limit, so one that hangs leaves time for the others; they add up to 580 s (on the H100 this
# script took 250-323 s on 2026-11-27 and 452-480 s on 2026-11-28 with more steps, wheels installed; bench_gpu alone
# 97 s warm).
set -uo pipefail
cd "$(dirname "$0")/.."
dataset=${1:?usage: device_check.sh DATASET [WHEELS]}
out=${OUT:-results/gpu}
mkdir -p "$out"
exec > >(tee "$out/device_check.log") 2>&1  # the whole log comes back with the figures
if [ -n "${2:-}" ]; then
  for wheel in "$2"/*.whl; do  # one by one: a wheel this machine's Python cannot take leaves its own in place
    pip install -q --no-index --no-deps --target /tmp/site "$wheel" || echo "kept the machine's own for $wheel"
  done
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # (py-spy's binary)
else
  export PYTHONPATH=$PWD
fi
[ -e dr_hf/cards ] || ln -sfn ../cards dr_hf/cards  # the card template, as the installed package holds it
python -c "import sys, platform; print(sys.version.split()[0], platform.libc_ver())"; pip list 2>/dev/null | grep -i -E "^(torch|pyarrow|datasets|transformers|timm) " || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, torchcodec; print('torch', torch.__version__, 'torchcodec', torchcodec.__version__)" \
  || echo "no torchcodec here: replay_on_device hands over decoded pixels instead of JPEG bytes"
gpu=(--device cuda) ab=(--device cuda --rounds 3) loader=(--device cuda --epochs 3 --repeat 8)
ab_eager=(--device cuda --rounds 3 --rows 512 --eager)
profile=(--device cuda --rows 256)
if [ "${DEVICE:-cuda}" = cpu ]; then  # DEVICE=cpu: a dry run of every step (no figures worth reading)
  gpu=(--device cpu --rows 8 --gpu-repeat 1 --num-samples 4) ab=(--device cpu --rows 8 --rounds 1 --num-samples 4) loader=(--device cpu --epochs 1 --repeat 1)
  profile=(--device cpu --rows 4) ab_eager=("${ab[@]}" --eager)
fi
status=0
timeout 170 python scripts/bench_gpu.py --dataset "$dataset" --job-only "${gpu[@]}" --out "$out/bench_gpu.md" || status=$?
timeout 110 python scripts/bench_gpu_ab.py --dataset "$dataset" --arms float32_crops "${ab[@]}" \
  --out "$out/bench_gpu_ab.md" || status=$?
timeout 120 python scripts/bench_gpu_ab.py --dataset "$dataset" --arms trace_teacher,prepare_threads_2,intra_op_threads_1 \
  "${ab_eager[@]}" --out "$out/bench_gpu_ab_eager.md" || status=$?
timeout 80 python scripts/profile_job.py --dataset "$dataset" --profiler py-spy "${profile[@]}" \
  --out-prefix "$out/pyspy" || status=$?
timeout 100 python scripts/bench_loader.py --dataset "$dataset" --rows 63 "${loader[@]}" --out "$out/bench_loader.md" \
  || status=$?
cat "$out"/*.md
(cd "$out" && extra=$(ls | grep -v -E '\.(md|log)$' | grep -v '^rest\.tgz$') \
  && [ -n "$extra" ] && tar czf rest.tgz $extra && rm -rf $extra)
exit $status
