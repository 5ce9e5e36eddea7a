#!/usr/bin/env bash
# The GPU checks in one call on the device machine (prepared here with `python scripts/gpu_bundle.py`):
# the GPU tests (tests/gpu) and the engine-efficiency benchmark, sized (not yet measured) to stay within 8 minutes on an H100/H200.
# Everything it prints also goes to $OUT (or ./gpu-out) so it comes back.
set -uo pipefail
BUNDLE=carry/gpu
OUT_DIR=${OUT:-gpu-out}
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export EXITSERVE_GPU_MODEL_DIR=$BUNDLE/model EXITSERVE_GPU_TEST_DATA=$BUNDLE/test.jsonl
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
    'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'; \
    git log -1 --format='commit %H' 2>/dev/null; } | tee "$OUT_DIR/machine.txt"
timeout 170 python3 -m pytest -c tests/gpu/pytest.ini tests/gpu -q -s -p no:cacheprovider -p no:asyncio 2>&1 \
    | tee "$OUT_DIR/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 330 python3 -m loadtest.gpu_efficiency --out "$OUT_DIR/gpu-efficiency.json" 2>&1 \
    | tee "$OUT_DIR/gpu-efficiency.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, gpu-efficiency rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
