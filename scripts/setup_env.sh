#!/usr/bin/env bash
# Create (or update) the project's virtual environment: torch, this pack with its test extras, and, when a
# ComfyUI checkout is found at $COMFYUI_PATH (default ~/ComfyUI), the host's own requirements (minus torch).
# Usage: bash scripts/setup_env.sh [VENV_DIR]     (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="${PYTHON:-python3}"
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"
# torch pins: the builds that this workplace keeps on local disk (a CUDA build that also runs on the CPU).
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch torchvision" on a machine with normal PyPI access.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "is ignored" || true
fi
python -c "import torch, torchvision" || { echo "[setup] torch/torchvision do not import"; exit 1; }
echo "[setup] installing comfyui-silo (editable) with test extras and the batch extra (ray, for the Ray batch tests)"
python -m pip install -q -e '.[test,batch]' 2>&1 | grep -v "is ignored" || true
if [ -f "$COMFYUI_PATH/main.py" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  echo "[setup] ComfyUI host found at $COMFYUI_PATH: installing its requirements (torch lines skipped)"
  req="$(mktemp)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFYUI_PATH/requirements.txt" > "$req"
  python -m pip install -q -r "$req" requests 2>&1 | grep -v "is ignored" || true
  rm -f "$req"
else
  echo "[setup] no ComfyUI host at $COMFYUI_PATH: host test tiers will be skipped"
fi
python -c "import comfyui_silo, torch; print('[setup] ready: comfyui_silo', comfyui_silo.__version__, '| torch', torch.__version__)"
