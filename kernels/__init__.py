"""Triton kernels for minillm's GPU hot path, each file opening with its pure-PyTorch reference.

Installed as `minillm.kernels`. Kernels never import model code; the model reaches them only
through `minillm.dispatch`. The one minillm module they import is `minillm.attention`, the
torch-only attention math that is both the model's `reference` backend and the oracle the
attention kernel is tested against.
"""
