"""Test setup: on a machine without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at collection time, and only when no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
