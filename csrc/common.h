// Shared helpers for the CUDA sources: error checks, dtype codes, dtype dispatch, conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dtop {

// ---------------------------------------------------------------------------- errors
inline void check_cuda(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) {
    // A failed runtime call also leaves its error pending for cudaGetLastError: clear it, or the
    // next launch's check (DTOP_CHECK_LAUNCH) would report this error as its own.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err) + " (" + expr + ") at " + file + ":" +
                             std::to_string(line));
  }
}

}  // namespace dtop

// Throws std::runtime_error (RuntimeError in Python) when a CUDA runtime call fails.
#define DTOP_CUDA_CHECK(expr) ::dtop::check_cuda((expr), #expr, __FILE__, __LINE__)
// Call right after a kernel launch: raises on a bad launch configuration or a missing kernel image.
#define DTOP_CHECK_LAUNCH() DTOP_CUDA_CHECK(cudaGetLastError())

namespace dtop {

// ---------------------------------------------------------------------------- dtypes
// Codes shared with Python (dtop_kernels.cuda.DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Throws std::invalid_argument (ValueError in Python) for an unknown code.
inline DType dtype_from_code(int code) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument("unsupported dtype code " + std::to_string(code) +
                                " (expected 0 = float32, 1 = float16, 2 = bfloat16)");
  }
  return static_cast<DType>(code);
}

inline int64_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Runs the statement(s) with T = float / __half / __nv_bfloat16 for the given DType:
//   DTOP_DISPATCH_DTYPE(dtype, T, launch<T>(args));
#define DTOP_DISPATCH_DTYPE(dtype, T, ...)          \
  switch (dtype) {                                  \
    case ::dtop::DType::kFloat32: {                 \
      using T = float;                              \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::dtop::DType::kFloat16: {                 \
      using T = __half;                             \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::dtop::DType::kBFloat16: {                \
      using T = __nv_bfloat16;                      \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    default:                                        \
      throw std::invalid_argument("unsupported dtype"); \
  }

// ---------------------------------------------------------------------------- conversions
// Arithmetic is done in float: load with to_float, store with from_float (round to nearest).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// kVec elements moved as one aligned load/store (16 bytes when kVec * sizeof(T) == 16).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------- host checks
// Throws std::invalid_argument (ValueError in Python) prefixed with the op name.
[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

inline void require(bool ok, const char* op, const std::string& msg) {
  if (!ok) fail(op, msg);
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// ---------------------------------------------------------------------------- device helpers
// Rows [0, valid) of a packed buffer are tokens: valid = cu_seqlens[batch] clamped to
// [0, capacity]; read on the device, so the host never waits for it.
__device__ __forceinline__ int64_t valid_rows(const int32_t* cu_seqlens, int64_t batch,
                                              int64_t capacity) {
  const int64_t t = cu_seqlens[batch];
  return t < 0 ? 0 : (t > capacity ? capacity : t);
}

// Packed rows of image b: [start, start + len), both clamped to [0, capacity].
struct Segment {
  int64_t start;
  int64_t len;
};

__device__ __forceinline__ Segment image_segment(const int32_t* cu_seqlens, int64_t b,
                                                 int64_t capacity) {
  int64_t lo = cu_seqlens[b], hi = cu_seqlens[b + 1];
  lo = lo < 0 ? 0 : (lo > capacity ? capacity : lo);
  hi = hi < lo ? lo : (hi > capacity ? capacity : hi);
  return Segment{lo, hi - lo};
}

__device__ __forceinline__ int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace dtop
