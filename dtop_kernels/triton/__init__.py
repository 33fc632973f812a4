"""Triton kernels and their host launchers. Imported only when the triton backend runs."""
