"""Triton kernels of pyfastpo, installed as ``pyfastpo.kernels``."""
