"""The torch backend: pure-PyTorch references, the specification of every op (CPU and CUDA,
autograd). It runs every floating dtype (float64 included), any head dim, and attention
dropout; on CUDA its GEMMs are cuBLAS and its attention PyTorch's varlen attention where the
call fits (:mod:`.torch_varlen`)."""
