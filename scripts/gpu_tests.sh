#!/usr/bin/env bash
# Run the device-dependent guarantees (pytest -m gpu) on a lent GPU, in one call.
#
# The GPU machine has torch but neither pyro-ppl nor diffusers: carry their wheels. Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform any -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2 diffusers==0.42.1
# (and keep .whl out of git: echo /.whl/ >> .git/info/exclude). Then, as the device command with
# `.whl` carried:
#   bash scripts/gpu_tests.sh
# The summary line, with the date and the device, goes to stdout and to $OUT/gpu_tests.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/carv-site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/carv-site:$PWD/src:${PYTHONPATH:-}"
out="${OUT:-/tmp/carv-gpu-out}"
mkdir -p "$out"
{
    date -u +"%Y-%m-%d %H:%M UTC"
    python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
    python3 -m pytest -m gpu -p no:cacheprovider -rs tests/test_gpu.py tests/test_gpu_paths.py
} 2>&1 | tee "$out/gpu_tests.txt"
exit "${PIPESTATUS[0]}"
