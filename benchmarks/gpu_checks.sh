#!/usr/bin/env bash
# Every GPU check in one device call: the gpu-marked tests, the bit-exactness suite on the GPU,
# and the benchmarks behind docs/benchmarks.md. Usage: bash benchmarks/gpu_checks.sh [part ...]
# (parts: tests, fqtests, qtests, hqtests, bitexact, quantize, kernel, kernelaxis0, qkernel,
# nvfp4costs, operands, matmul, fp8gemm, packed, mlp, mlptrace, optim, optimfused, optimcosts, lm,
# lmprofile, lmunrolled, scaling, collectives; default: all but fqtests, qtests, hqtests,
# kernelaxis0, nvfp4costs, operands, mlptrace, optimfused, optimcosts, lmprofile, lmunrolled and
# the parts that need >= 2 GPUs (nvidia-h200-x2): scaling, collectives).
# Each part's whole output goes to $OUT/<part>.txt (default OUT: /tmp); its last lines are printed.
# The whole gpu suite (`tests`) took more than 400 s on an H200 on 2026-12-04: give it a call of
# its own (the device allows 600 s per command), or run the per-file parts.
set -u
export PYTHONPATH="$PWD:$PWD/benchmarks"
parts="${*:-tests bitexact quantize kernel qkernel matmul fp8gemm packed mlp optim lm}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
OUT="${OUT:-/tmp}"
for part in $parts; do
  echo "=== $part"
  case $part in
    fqtests) timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_fake_quant.py \
               2>&1 | grep -v Warning ;;
    qtests) timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_quantize.py \
              2>&1 | grep -v Warning ;;
    hqtests) timeout 300 python -m pytest -q -m gpu -p no:cacheprovider \
               tests/test_pallas_hadamard_quant.py 2>&1 | grep -v Warning ;;
    tests) timeout 590 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | grep -v Warning ;;
    bitexact) timeout 300 python -m pytest -q -p no:cacheprovider tests/test_reference_bitexact.py \
                2>&1 | grep -v "^$" ;;
    quantize) timeout 200 python benchmarks/quantize_bandwidth.py 2>&1 ;;
    kernel) timeout 200 python benchmarks/fake_quant_kernel.py --formats mxfp4,mxfp8,int4,nvfp4 \
              --configs 8x512x4,16x512x4,4x2048x8 2>&1 ;;
    kernelaxis0) timeout 200 python benchmarks/fake_quant_kernel.py --axis 0 --formats mxfp4,mxfp8 \
                   --configs 256x32x4,128x64x4,512x32x4,256x64x8,64x128x4,1024x32x8,128x32x4 2>&1 ;;
    qkernel) timeout 120 python benchmarks/quantize_kernel.py --formats mxfp4,mxfp8,nvfp4 2>&1 ;;
    nvfp4costs) timeout 200 python benchmarks/nvfp4_kernel_costs.py 2>&1 ;;
    operands) timeout 200 python benchmarks/operand_costs.py --recipes mxfp4,nvfp4,fp8 2>&1 ;;
    fp8gemm) timeout -s INT 200 python benchmarks/fp8_gemm.py 2>&1 ;;
    packed) timeout 300 python benchmarks/packed_matmul.py --budget 240 2>&1 ;;
    mlp) timeout 400 python benchmarks/mlp_step.py 2>&1 | grep -v Warn | grep -v "^ \|^E1\|^This\|^If" ;;
    mlptrace) timeout 400 python benchmarks/mlp_step.py --recipes bf16,fp8,mxfp4 --iters 10 \
                --trace "$OUT/mlp_traces" --top 15 2>&1 | grep -v Warn | grep -v "^ \|^E1\|^This\|^If" ;;
    matmul) [ -f benchmarks/scaled_matmul.py ] && timeout 300 python benchmarks/scaled_matmul.py 2>&1 ;;
    optim) timeout 400 python benchmarks/optim_update.py --hlo --only "optax.adamw" "int8 state + bf16_sr" \
             "fp8 state + bf16_sr" "fp32 state + bf16_sr" 2>&1 ;;
    optimfused) timeout 400 python benchmarks/optim_update.py --layers 4 --only "optax.adamw" \
                  "int8 state + bf16_sr" "kernel only" 2>&1 ;;
    optimcosts) timeout -s INT 250 python benchmarks/adamw_kernel_costs.py --layers 4 2>&1 ;;
    lmprofile) timeout -s INT 190 python benchmarks/lm_step_profile.py --preset base --scan-layers \
                 --recipes flax,bf16,mxfp4,mxfp8 --trace "$OUT/lm_traces" 2>&1 | grep -v Warn ;;
    lmunrolled) timeout 200 python benchmarks/lm_step_profile.py --preset base --recipes flax,bf16 \
                  2>&1 | grep -v Warn ;;
    scaling) timeout -s INT 320 python benchmarks/lm_scaling.py --preset base --recipe mxfp4 --steps 30 \
               --scan-layers --out "$OUT/scaling" 2>&1 | grep -v Warn ;;
    collectives) timeout -s INT 80 python benchmarks/collective_bytes.py --meshes "data=2;fsdp=2" \
                   --recipes bf16,mxfp4 --d-model 768 --mlp-hidden 2048 --heads 12 ;;
    lm) timeout 300 python examples/train_lm.py --preset small --steps 40 --eval-every 1000 \
          --recipes flax,bf16,mxfp8,mxfp4 --out "$OUT/lm" 2>&1 ;;
  esac > "$OUT/$part.txt" 2>&1
  grep -v "^step \|it/s\]" "$OUT/$part.txt" | tail -n 14
done
