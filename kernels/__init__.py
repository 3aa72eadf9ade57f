"""Numeric hot paths: numba kernels (CPU, nogil, cache=True) and array-API code."""
