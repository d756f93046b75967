"""Build script: the pybind11 C++ extension ``pyfastpo._C`` (always) and the CUDA
extension ``pyfastpo._cuda`` (only when nvcc is found; skipped with a message
otherwise). Neither links against torch: both bind raw pointers."""

from setuptools import setup

setup()
