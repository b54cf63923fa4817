#!/usr/bin/env bash
# Everything this project checks on a GPU, as one command for a lent machine (the `device`
# tool's run; its image has torch, triton, onnx, onnxruntime, onnxscript, networkx, pytest and
# hypothesis, and nothing can be fetched there):
#
#     bash benchmarks/gpu_run.sh          # results and logs under $OUT (./gpu_out without it)
#
# 1. installs this package in place, without dependencies (an editable install maps
#    attnrewrite.passes and attnrewrite.kernels as pyproject.toml says);
# 2. runs the Triton kernel tests on the GPU (Monarch, HSA, ZeroS: forward, backward, fp16/bf16);
# 3. runs benchmarks/attention_speed.py in fp16 and bf16 (Monarch T = 1, 2 vs SDPA, whose CUDA
#    flash backend is FlashAttention-2's algorithm; flash_attn itself when installed).
# Each step has its own time limit, so one that hangs leaves time for the next.
#
# DEVICE=cpu LENGTHS=256,512 runs steps 1 and 3 on the CPU: a dry run of the script itself.
set -uo pipefail
out=${OUT:-gpu_out}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

"$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee "$out/install.log" || exit 1
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$out/gpu.txt"
    timeout 240 "$python" -m pytest -q -p no:cacheprovider -k "kernel" \
        tests/test_monarch_kernels.py tests/test_hsa.py tests/test_zeros.py 2>&1 \
        | tee "$out/kernel_tests.log"
fi
lengths=()
if [ -n "${LENGTHS:-}" ]; then lengths=(--lengths "$LENGTHS"); fi
timeout 300 "$python" benchmarks/attention_speed.py --device "$device" "${lengths[@]}" \
    --out "$out/attention_speed_$device.json" 2>&1 | tee "$out/attention_speed.log"
