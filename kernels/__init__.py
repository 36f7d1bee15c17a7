"""Triton kernels for minillm's GPU hot path, each file opening with its pure-PyTorch reference.

Installed as `minillm.kernels`. Kernels never import model code; the model reaches them only
through `minillm.dispatch`. The one minillm module they import is `minillm.attention`, the
torch-only attention math that is both the model's `reference` backend and the oracle the
attention kernel is tested against. Nothing here is imported until a Triton backend runs (see
`minillm.dispatch`), so minillm imports and trains where Triton is not installed.
"""
