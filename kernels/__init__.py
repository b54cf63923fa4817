"""Triton kernels, one module per method. Installed as `attnrewrite.kernels`."""
