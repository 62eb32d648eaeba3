# Sourced by scripts/demo.sh and scripts/test.sh: make (once) and activate the project venv.
# The venv is made with the system /usr/bin/python3.11 because the python backend stub of the
# Triton server in nvidia-pytriton links the system libpython (reference/triton-cpu.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AF3TRT_VENV:-$ROOT/.venv}"
PY="${AF3TRT_PYTHON:-/usr/bin/python3.11}"
say() { echo "af3trt: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
    say "first run: making the venv $VENV with $PY"
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        echo "af3trt: installing python3.11-venv (needed for $PY -m venv)" >&2
        apt-get update -qq && apt-get install -y -qq python3.11-venv >/dev/null
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.af3trt-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
    # torch 2.13.0 first: the CPU wheel (a bare `torch` requirement would pull a CUDA build)
    start=$SECONDS
    say "installing torch 2.13.0 (CPU build, ~200 MB download; about a minute)..."
    "$VENV/bin/pip" install -q "torch==2.13.0"
    say "installing af3trt and its dependencies (transformers, onnxruntime, nvidia-modelopt, tritonclient," \
        "nvidia-pytriton with a tritonserver; about two more minutes)..."
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    touch "$stamp"
    say "installed in $((SECONDS - start)) s; later runs skip this"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
