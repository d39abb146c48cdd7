#!/usr/bin/env bash
# Issue 21's GPU figures in one run on a lent H100/H200 (about 8 to 10 minutes there).
#
# Prepared on the development machine first (`make gpu-carry`, benchmarks/README.md "GPU
# preset"), in the git-ignored folder .carry/:
#   site/         pure-Python hydra, omegaconf, antlr4, kornia (the device's Python lacks them)
#   whl/          the cp312 kornia_rs wheel
#   FSRE-Depth/   the published code (hyBlue/FSRE-Depth)
# The device tool carries it (`carry: [".carry"]`); run there as
#   bash benchmarks/gpu_session.sh
# Writes the tables to $OUT (the device tool brings them back), else to ./gpu_out.
set -euo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=$PWD/src:$PWD/.carry/site:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    | tee "$out/machine.txt"

# 1. The acceptance table: the published code, the networks alone (the floor), fp32 without
#    options, bf16 + channels_last, and trainer=gpu_fast, interleaved over 2 rounds.
python3 benchmarks/train_step.py --device cuda --shape 192x640x12 \
    --objective reference networks optimised --preset fp32 bf16_nhwc bf16_nhwc_step gpu_fast \
    --reference-dir .carry/FSRE-Depth --rounds 2 --steps 10 --warmup 5 \
    2> "$out/train_step.log" | tee "$out/train_step.md"

# 2. Where the time of the preset's step goes (kernels vs launch), one profiled step.
python3 benchmarks/train_step.py --device cuda --shape 192x640x12 --preset gpu_fast \
    --steps 3 --warmup 5 --profile --profile-rows 25 2>> "$out/train_step.log" \
    | tee "$out/profile.txt"

# 3. The whole training loop, data included, with the preset and 2 / 4 loader workers.
python3 benchmarks/train_throughput.py --device cuda --shape 192x640x12 --workers 2 4 \
    --precision bf16 --channels-last --compile --compile-mode reduce-overhead \
    --steps 100 --warmup 30 --work-dir /tmp/fsre_throughput 2> "$out/throughput.log" \
    | tee "$out/throughput.md"
