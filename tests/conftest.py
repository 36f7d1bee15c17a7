"""Test-wide setup.

TRITON_INTERPRET must be set before any module defining `@triton.jit` functions is imported:
the decorator decides between compiling and interpreting when it runs. With it set, every
Triton kernel runs on CPU tensors through numpy, so kernels are checked on machines with no GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
