#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp itself, built from source) into .venv for the GGUF tests and benchmark.
# The build takes about 7 minutes on 2 cores, so the wheel is kept outside the clone and reused by every later
# install. It is built for this CPU (GGML_NATIVE), so the cache is keyed by the CPU's feature flags: a machine
# with another CPU builds its own wheel instead of crashing on an instruction it lacks.
set -euo pipefail
VERSION=0.3.36
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${GPTFLOW_WHEEL_CACHE:-$HOME/.cache/gptflow/wheels}
CPU_KEY=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m) | md5sum | cut -c1-12)
DIR="$CACHE/llama-cpp-python-$VERSION-$CPU_KEY"

if "$PYTHON" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed"; exit 0
fi
if ! ls "$DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION (llama.cpp from source, several minutes) into $DIR"
    mkdir -p "$DIR.tmp"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PYTHON" -m pip wheel -q --no-deps --no-binary llama-cpp-python -w "$DIR.tmp" "llama-cpp-python==$VERSION"
    rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
"$PYTHON" -m pip install -q --no-deps "$DIR"/llama_cpp_python-*.whl diskcache==5.6.3
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'from', '$DIR')"
