"""Pure-PyTorch references: the specification of every op (CPU and CUDA, autograd)."""
