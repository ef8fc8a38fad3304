#!/usr/bin/env bash
# Every GPU check in one device call: the gpu-marked tests, the bit-exactness suite on the GPU,
# and the benchmarks behind docs/benchmarks.md. Usage: bash benchmarks/gpu_checks.sh [part ...]
# (parts: tests, fqtests, bitexact, quantize, kernel, qkernel, matmul, packed, mlp, optim, optimfused,
# lm, lmprofile, scaling; default: all but fqtests, optimfused, lmprofile and scaling, which needs
# >= 2 GPUs: nvidia-h200-x2).
set -u
export PYTHONPATH="$PWD:$PWD/benchmarks"
parts="${*:-tests bitexact quantize kernel qkernel matmul packed mlp optim lm}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
for part in $parts; do
  echo "=== $part"
  case $part in
    fqtests) timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_fake_quant.py \
               2>&1 | grep -v Warning | tail -12 ;;
    tests) timeout 400 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | grep -v Warning | tail -30 ;;
    bitexact) timeout 300 python -m pytest -q -p no:cacheprovider tests/test_reference_bitexact.py \
                2>&1 | grep -v "^$" | tail -40 ;;
    quantize) timeout 200 python benchmarks/quantize_bandwidth.py 2>&1 | tail -25 ;;
    kernel) timeout 200 python benchmarks/fake_quant_kernel.py --formats mxfp4,mxfp8,int4,nvfp4 \
              --configs 8x512x4,16x512x4,4x2048x8 2>&1 | tail -16 ;;
    qkernel) timeout 120 python benchmarks/quantize_kernel.py --formats mxfp4,mxfp8,nvfp4 2>&1 | tail -18 ;;
    packed) timeout 300 python benchmarks/packed_matmul.py --budget 240 2>&1 | tail -30 ;;
    mlp) timeout 400 python benchmarks/mlp_step.py 2>&1 | grep -v Warn | grep -v "^ \|^E1\|^This\|^If" \
           | tail -12 ;;
    matmul) [ -f benchmarks/scaled_matmul.py ] && timeout 300 python benchmarks/scaled_matmul.py 2>&1 | tail -40 ;;
    optim) timeout 400 python benchmarks/optim_update.py --hlo --only "optax.adamw" "int8 state + bf16_sr" \
             "fp8 state + bf16_sr" "fp32 state + bf16_sr" 2>&1 | tail -14 ;;
    optimfused) timeout 400 python benchmarks/optim_update.py --layers 4 --only "optax.adamw" \
                  "(fused kernel)" "kernel only, b8 w4" 2>&1 | tail -8 ;;
    lmprofile) timeout 300 python benchmarks/lm_step_profile.py --recipes flax,bf16,mxfp4 \
                 --trace "${OUT:-/tmp}/lm_traces" 2>&1 | grep -v Warn | tail -45 ;;
    scaling) timeout 580 python benchmarks/lm_scaling.py --preset base --recipe mxfp4 --steps 30 \
               --out "${OUT:-/tmp}/scaling" 2>&1 | grep -v Warn | tail -8 ;;
    lm) timeout 300 python examples/train_lm.py --preset small --steps 40 --eval-every 1000 \
          --recipes flax,bf16,mxfp8,mxfp4 --out "${OUT:-/tmp}/lm" 2>&1 | tail -12 ;;
  esac
done
