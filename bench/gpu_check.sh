#!/usr/bin/env bash
# Everything issue 5 still needs a GPU for, in one command (CI never has a GPU; run it by hand on one).
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA, torch and triton
# 1. the Triton BSA kernels compiled for the GPU, fp32/fp16/bf16, against the dense masked reference;
# 2. bench/bsa.py at LongCat's 480p and 720p shapes (bf16, 32 heads, head_dim 128), which rewrites the
#    GPU rows of bench/RESULTS.md (target: >= 10x over dense at 720p on an H100; bench/bsa_model.py says
#    what that needs);
# 3. bench/kernel_report.py --autotune: the launch options triton.autotune picked on this GPU, and
#    bench/kernel_report.py: the sm_80 / sm_90 compile report (the same as on CPU; a check that this
#    machine's triton builds the same kernels). Both rewrite their RESULTS.md sections.
# Needs only torch, triton and pytest (flash-attn is used as the dense baseline when installed).
# With $OUT set (the device tool's output folder) the updated RESULTS.md and the logs are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
"$PY" -m pytest tests/kernels -p no:cacheprovider 2>&1 | tee /tmp/gpu_kernels.log | tail -15
kernels_rc=${PIPESTATUS[0]}
"$PY" bench/bsa.py 2>&1 | tee /tmp/gpu_bench.log
bench_rc=${PIPESTATUS[0]}
{ "$PY" bench/kernel_report.py --autotune && env -u TRITON_INTERPRET "$PY" bench/kernel_report.py; } 2>&1 \
    | tee /tmp/gpu_report.log | tail -40
report_rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
    cp bench/RESULTS.md /tmp/gpu_kernels.log /tmp/gpu_bench.log /tmp/gpu_report.log "$OUT"/
fi
echo "kernel tests rc=$kernels_rc, benchmark rc=$bench_rc, kernel report rc=$report_rc"
exit $(( kernels_rc || bench_rc || report_rc ))
