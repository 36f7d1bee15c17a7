"""Triton kernels for minillm's GPU hot path, each beside a pure-PyTorch reference.

Installed as `minillm.kernels`. Kernels never import model code; the model reaches them only
through `minillm.dispatch`.
"""
