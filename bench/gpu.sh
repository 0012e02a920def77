#!/bin/bash
# The GPU measurements of the README's "The engine on a GPU" table (issue 13 point 3), as run on a lent
# NVIDIA H100/H200 from the repository root:  OUT=/some/folder bash bench/gpu.sh
# 1. bench/gpu_check.py: exactness of the fused and block routes against eager on the device;
# 2. bench/engine.py: the llama8b shape in bfloat16 at 8K and 32K tokens: flash sdpa, the sink probe
#    (fused route), the default set's plain probes (block route), and the sink probe on the block route;
# 3. a torch.profiler table of the block route at 8K (where its time goes).
# Wheels in .whl/ (e.g. the transformers this checkout pins) are installed into /tmp/site first.
set -u
OUT=${OUT:-/tmp/headmap-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 60 python3 bench/gpu_check.py --device cuda 2>&1 | tee "$OUT/check.txt"
timeout ${ENGINE_S:-260} python3 bench/engine.py --device cuda --shape llama8b --dtype bfloat16 \
  --lengths 8192 32768 --modes sdpa headmap default blocks --logits-to-keep 1 --repeats 2 --repeat-max-t 32768 \
  --timeout 150 --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.txt"
if [ "${PROFILE:-1}" = 1 ]; then
  timeout ${PROFILE_S:-80} python3 bench/engine.py --device cuda --shape llama8b --dtype bfloat16 --lengths 8192 \
    --modes blocks --logits-to-keep 1 --profile torch --timeout 90 2>&1 | tee "$OUT/profile.txt"
fi
