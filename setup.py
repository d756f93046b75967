"""Build script: the pybind11 C++ extension ``pyfastpo.backends._C`` (always) and the CUDA
extension ``pyfastpo.backends._cuda`` (only when nvcc is found; skipped with a message
otherwise). Neither links against torch: both bind raw pointers.

``pyfastpo.backends._cuda``: csrc/cuda_logps.cu is compiled by nvcc into an object, then
linked with the pybind11 binding by the host compiler against the STATIC CUDA
runtime, so the module imports on machines without a GPU or libcudart.
Set ``PYFASTPO_NO_CUDA=1`` to skip it.
"""

import glob
import hashlib
import os
import shutil
import subprocess

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# -fno-trapping-math changes no result (it only drops the guarantee on FP
# exception flags) but lets GCC if-convert the selects in the polynomial exp,
# which is what vectorizes the CPU loops; -ffast-math is NOT used.
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-Xcompiler",
    "-fPIC",
    # SASS for each major (it runs on that major's later minors too: sm_80 serves A10/L4/
    # RTX 30-40 as well) and compute_100 PTX, which the driver JIT-compiles on GPUs newer
    # than sm_100. Each target adds about a third to nvcc's time (~23 s -> ~36 s CPU).
    "-gencode",
    "arch=compute_80,code=sm_80",  # A100
    "-gencode",
    "arch=compute_90,code=sm_90",  # H100, H200
    "-gencode",
    "arch=compute_100,code=[sm_100,compute_100]",  # B200; PTX for newer GPUs
]


def cuda_home():
    """(nvcc, CUDA root holding the static runtime) or (None, None)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (env and shutil.which("nvcc", path=os.path.join(env, "bin")))
    if not nvcc:
        return None, None
    roots = [env, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for root in filter(None, roots):
        if glob.glob(os.path.join(root, "lib*", "libcudart_static.a")):
            return nvcc, root
    return nvcc, None


class BuildExt(build_ext):
    """Compiles the .cu with nvcc first; drops ``pyfastpo.backends._cuda`` (never fails) if that fails."""

    def build_extensions(self):
        for ext in [e for e in self.extensions if e.name == "pyfastpo.backends._cuda"]:
            reason = self._prepare_cuda(ext)
            if reason:
                print(
                    f"pyfastpo: NOT building the CUDA extension pyfastpo.backends._cuda: {reason}. "
                    "The 'cpp' and 'reference' backends are unaffected."
                )
                self.extensions.remove(ext)
        super().build_extensions()

    def _prepare_cuda(self, ext):
        if os.environ.get("PYFASTPO_NO_CUDA"):
            return "PYFASTPO_NO_CUDA is set"
        nvcc, root = cuda_home()
        if nvcc is None:
            return "nvcc not found (put it on PATH or set CUDA_HOME)"
        if root is None:
            return f"no libcudart_static.a next to {nvcc} (set CUDA_HOME)"
        os.makedirs(self.build_temp, exist_ok=True)
        obj = os.path.join(self.build_temp, "cuda_logps.o")
        cmd = [nvcc, *NVCC_FLAGS, "-Icsrc", "-c", "csrc/cuda_logps.cu", "-o", obj]
        print(" ".join(cmd))
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            return f"nvcc failed ({err})"
        ext.extra_objects = [obj]
        ext.library_dirs = sorted(glob.glob(os.path.join(root, "lib*")))
        return None


def source_hash() -> str:
    """sha256 of csrc/ (file names and contents): baked into both extensions as
    ``source_hash`` so that a test can tell a stale build from the current sources
    (tests/test_build.py; the same function is written there)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob("csrc/*")):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


SOURCE_HASH = [("PFPO_SOURCE_HASH", f'"{source_hash()}"')]

ext_modules = [
    Pybind11Extension(
        "pyfastpo.backends._C",
        ["csrc/bind_cpu.cpp", "csrc/cpu_logps.cpp", "csrc/device_emulation.cpp"],
        include_dirs=["csrc"],
        depends=glob.glob("csrc/*"),  # rebuilt when any source changes (the hash above too)
        cxx_std=17,
        define_macros=SOURCE_HASH,
        extra_compile_args=CPU_FLAGS,
        extra_link_args=["-fopenmp"],
    ),
    Pybind11Extension(
        "pyfastpo.backends._cuda",
        ["csrc/bind_cuda.cpp"],
        include_dirs=["csrc"],
        depends=glob.glob("csrc/*"),  # the .cu is compiled apart: relink when any source changes
        cxx_std=17,
        define_macros=SOURCE_HASH,
        extra_compile_args=["-O3"],
        libraries=["cudart_static", "dl", "rt", "pthread"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
