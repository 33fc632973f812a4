/* Device 0 as the current CUDA device, without a driver: torch's C++ entry points (indexing,
 * contiguous, ...) take a CUDA device guard on CUDA tensors before they dispatch, and the guard
 * asks the runtime for the current device. Fake CUDA tensors (tests/fake_cuda.py) dispatch to
 * FakeTensorMode and never reach a kernel; only the guard needs an answer. Preloaded
 * (LD_PRELOAD) by `python tests/fake_cuda.py`; nothing else of the runtime is replaced. */
int cudaGetDevice(int *device) {
  *device = 0;
  return 0; /* cudaSuccess */
}

int cudaSetDevice(int device) { return device == 0 ? 0 : 101; /* cudaErrorInvalidDevice */ }
