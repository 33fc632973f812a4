"""Public ops, one module per op: argument checks, the checked mode and backend dispatch, then
a call of the op's ``dtop_py::`` custom op (:mod:`.library`: the kernel entry points of every
backend, with fake kernels and registered backwards)."""
