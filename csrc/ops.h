// Host entry points of the CUDA kernels. Plain C++ (no CUDA headers) so bindings.cpp stays a
// thin pybind11 file. Pointers are device pointers; `stream` is a cudaStream_t passed as void*.
// Invalid arguments throw std::invalid_argument; CUDA failures throw std::runtime_error.
#pragma once

#include <cstdint>

namespace dtop {

// Packed ragged token layout shared by the ops:
//   indices    int32 [capacity]  flat row indices into the B * N rows of a dense x [B, N, C],
//                                image after image; entries [T, capacity) are padding.
//   cu_seqlens int32 [B + 1]     T = cu_seqlens[B] is read on the device (no host sync).
// `dtype` is 0 = float32, 1 = float16, 2 = bfloat16.

// dst[i] = src[indices[i]] for i < T; dst[i] = 0 for T <= i < capacity.
// src: [B * N, num_cols], dst: [capacity, num_cols], both row-major and contiguous.
void gather_rows(const void* src, const int32_t* indices, const int32_t* cu_seqlens, void* dst,
                 int64_t batch, int64_t capacity, int64_t num_cols, int dtype, void* stream);

// For i < T: dst[indices[i]] = src[i] (add = false) or dst[indices[i]] += src[i] (add = true,
// summed in float32). Rows i >= T are ignored. Indices must be unique (no atomics).
// src: [capacity, num_cols], dst: [B * N, num_cols], both row-major and contiguous.
void scatter_rows(const void* src, const int32_t* indices, const int32_t* cu_seqlens, void* dst,
                  int64_t batch, int64_t capacity, int64_t num_cols, int dtype, bool add,
                  void* stream);

}  // namespace dtop
