"""Triton kernels for DDMIM's memory-bound steps, each beside the PyTorch reference it must match."""
