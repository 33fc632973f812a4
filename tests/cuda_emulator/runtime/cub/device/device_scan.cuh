// CUB's DeviceScan for the CUDA emulator: a sequential stand-in (not CUB's algorithm), run on
// the host at the call, as the emulator runs every stream operation. Only what csrc/ calls.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <iterator>

namespace cub {

struct DeviceScan {
  // out[i] = in[0] + ... + in[i - 1] (out[0] = 0), accumulated in the input's value type.
  // With d_temp_storage == nullptr, only sets temp_storage_bytes (to 1, as a real size would be
  // non-zero).
  template <typename InputIt, typename OutputIt>
  static cudaError_t ExclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes,
                                  InputIt d_in, OutputIt d_out, int num_items,
                                  cudaStream_t stream = 0) {
    (void)stream;
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = 1;
      return cudaSuccess;
    }
    if (temp_storage_bytes < 1) return cudaErrorInvalidValue;
    using T = typename std::iterator_traits<InputIt>::value_type;
    T sum{};
    for (int i = 0; i < num_items; ++i) {
      const T v = d_in[i];
      d_out[i] = sum;
      sum = sum + v;
    }
    return cudaSuccess;
  }
};

}  // namespace cub
