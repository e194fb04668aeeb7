#!/usr/bin/env bash
# The GPU checks of issues 13 and 14 as one prepared run on the device machine (an H200; its image has
# torch, triton, numpy, pytest, hypothesis, httpx but not the server's other packages). A session whose
# task is lent a GPU runs, here first:
#     scripts/fetch_device_wheels.sh                      # .whl/: the missing packages, cp312 wheels
# then the device tool's run with carry [".whl"], timeout_s 600, command:
#     bash scripts/device_check.sh
# Everything lands in $OUT (at most 8 files come back): the CUDA tests' log, the engine benchmark with
# and without the Triton kernels, GAE [1024, 8192] end to end over binary REST, and the GPU memory each
# --workers process holds. Copy what matters under bench/results/ and into the closing note (docs/kernels.md
# says what each kernel computes and the tolerances the CUDA tests hold them to).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/device-check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/service:$PWD/client PYTHONUNBUFFERED=1
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
} | tee -a "$OUT/summary.txt"

log "1. CUDA tests: kernels on the GPU (scans, group baselines, whitening, the fused ppo_clip + KL loss), device syncs, CUDA shared memory, streamed responses, goldens on CUDA"
timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "OnTheGpu or compile_for_the_gpu" \
    tests/test_device_syncs.py tests/test_http_stack.py tests/test_verl_golden.py tests/test_paper_golden.py \
    > "$OUT/tests.log" 2>&1; echo "exit $?" >> "$OUT/tests.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_shm.py >> "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
tail -n 3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

log "2. engine on CUDA: triton kernels vs torch, with the copy-bandwidth floor (the losses row adds kernels.losses.ppo_clip_kl with --kernels triton)"
for kernels in triton torch; do
    timeout 100 python3 bench/bench_engine.py --device cuda --kernels "$kernels" --cases gae,gae_gaps,gae_verl,grpo,grpo_compute,losses \
        --max-wait 0 --out "$OUT/engine-cuda-$kernels.json" > "$OUT/engine-cuda-$kernels.txt" 2>&1
    tail -n 25 "$OUT/engine-cuda-$kernels.txt" >> "$OUT/summary.txt"
done

log "2b. small requests [8, 512] in process: validation and compute (issue 14: GRPO's compute <= 0.15 ms)"
timeout 90 python3 bench/bench_small_requests.py --device cuda --kernels triton --out /tmp/small-cuda.json \
    2>&1 | tail -n 9 | tee -a "$OUT/summary.txt"

log "3. GAE [1024, 8192] over binary REST, engine on CUDA (issue 13: <= 60 ms end to end)"
timeout 120 python3 bench/bench_http.py --parts gae --server-flag=--device --server-flag=cuda \
    --out "$OUT/http-gae-cuda.json" 2>&1 | tail -n 8 | tee -a "$OUT/summary.txt"

log "4. GPU memory per --workers process (one CUDA context each)"
python3 -m advserve.cli serve --device cuda --workers 2 --host 127.0.0.1 --http-port 18700 --grpc-port 18701 \
    --log-level warning > "$OUT/workers.log" 2>&1 &
server=$!
python3 - <<'PY' >> "$OUT/summary.txt" 2>&1
import time, httpx
body = {"estimator": "grpo", "tensors": {"rewards": [1, 0], "response_mask": [[1, 1], [1, 0]], "group_ids": [0, 0]}}
for _ in range(120):  # up to 60 s for both workers to start
    try:
        if httpx.get("http://127.0.0.1:18700/health/ready").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
for _ in range(32):  # new connections spread over both workers: each initialises CUDA
    httpx.post("http://127.0.0.1:18700/v1/advantages", json=body).raise_for_status()
print("requests answered on the GPU")
PY
nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a "$OUT/summary.txt"
kill -TERM "$server"; wait "$server"
log "done"
