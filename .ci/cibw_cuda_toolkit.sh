#!/usr/bin/env bash
# cibuildwheel's before-all on Linux (pyproject.toml, [tool.cibuildwheel.linux]): puts a
# CUDA toolkit at $CUDA_HOME in the manylinux build image, so that setup.py also builds
# the CUDA extension into every wheel. Opt-in, by the CUDA version on the host:
#   PYFASTPO_CUDA_TOOLKIT=13.0 cibuildwheel
# Unset, it does nothing and the wheels carry the CPU extension only (setup.py skips
# pyfastpo.backends._cuda when it finds no nvcc). An image that already has a toolkit at
# $CUDA_HOME is used as it is. The toolkit is NVIDIA's pip wheels of CUDA 13, laid out
# under nvidia/cu13: nvcc, nvvm, the runtime headers and libcudart_static.a, and CCCL
# (cuda_fp16.h includes its <nv/target>). So the image needs no repository beyond the
# package index; every part is pinned to one version, as nvcc's headers must match the
# runtime it links.
set -euo pipefail
: "${CUDA_HOME:?must be set: the cibuildwheel environment in pyproject.toml sets it}"
if [ -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "pyfastpo: using the CUDA toolkit already at $CUDA_HOME"
    exit 0
fi
version="${PYFASTPO_CUDA_TOOLKIT:-}"
if [ -z "$version" ]; then
    echo "pyfastpo: PYFASTPO_CUDA_TOOLKIT is unset: wheels without the CUDA extension"
    exit 0
fi
prefix="${PYFASTPO_CUDA_PREFIX:-/opt/pyfastpo-cuda}"
python3 -m pip install --no-cache-dir --target "$prefix" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-runtime==$version.*" \
    "nvidia-nvvm==$version.*" "nvidia-cuda-crt==$version.*" "nvidia-cuda-cccl==$version.*"
ln -sfn "$prefix/nvidia/cu${version%%.*}" "$CUDA_HOME"
"$CUDA_HOME/bin/nvcc" --version
