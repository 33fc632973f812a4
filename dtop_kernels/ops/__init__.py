"""Public ops: checks, autograd and backend dispatch; one module per op."""
