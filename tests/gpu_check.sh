#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one command: the engine tests (greedy equality with HF generate on
# all three architectures, every policy and several N; sessions batched together; seeded sampling and the
# model's distribution) with every drafter and verifier on the GPU. CI has no GPU and runs the same tests
# on the CPU (`make test`).
#
#   tests/gpu_check.sh [pytest args]        # from the repository root, on the GPU machine
#
# It needs only torch, transformers, scipy, pytest and pytest-timeout, and uses whichever `python3`
# (or $PYTHON) holds them: these tests import neither the services nor tests/unit/conftest.py
# (--noconftest; tests/conftest.py comes in as a plugin for its tiny models), so a GPU image that has
# PyTorch but none of the serving stack runs them as it is (tests/unit/test_gpu_check.py keeps it so).
# EESD_TEST_DEVICE=cpu runs the same command here.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export EESD_TEST_DEVICE=${EESD_TEST_DEVICE:-cuda} PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c '
import os, torch, transformers
device = os.environ["EESD_TEST_DEVICE"]
where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device}: {where}")'
exec "$python" -m pytest -q -p no:cacheprovider --noconftest -p tests.conftest \
  tests/unit/test_greedy_equality.py tests/unit/test_batched_engine.py tests/unit/test_engine_sampling.py "$@"
