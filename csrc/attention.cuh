// Building blocks of the varlen attention kernels (attention_*.cu): tensor-core MMA through
// inline PTX (mma.sync.m16n8k16, fp16 / bf16 in, fp32 accumulate), ldmatrix fragment loads,
// cp.async tile copies, and the host-side checks and head-dim / dtype dispatch they share.
//
// Shared-memory tiles are [rows][kD + 8] (row pitch kD + 8 elements): the 16-byte pad puts the
// 8 rows read by one ldmatrix phase on distinct banks for every supported head dim, so no
// swizzle is needed and kD = 80 (10 chunks per row) works like the powers of two.
//
// Fragment layouts (PTX ISA, mma.m16n8k16; g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 (k x n, "col"): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C 16x8 fp32:          c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// so the accumulators of two adjacent n-tiles are, once rounded, the A fragment of the next
// product (FlashAttention-2's P @ V without a trip through shared memory).
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>
#include <utility>

#include "common.h"

namespace dtop {
namespace attn {

constexpr int kWarpThreads = 32;

// ---------------------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (nothing is read then).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b on tensor cores, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);

template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---------------------------------------------------------------------------- tiles
template <int kD>
struct TileShape {
  static_assert(kD % 16 == 0, "head dim must be a multiple of 16");
  static constexpr int kPitch = kD + 8;  // elements per shared-memory row
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
};

// Rows [0, kRows) of a tile, global row r at gmem + r * stride, into shared memory; rows
// >= valid (>= 1) are zero-filled. Issued by all kThreads threads; the caller commits.
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int valid) {
  constexpr int kChunks = TileShape<kD>::kChunks, kTotal = kRows * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int c = static_cast<int>(threadIdx.x) + it * kThreads;
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = r < valid;
      const T* src = gmem + (ok ? r * stride + ch * 8 : 0);
      cp_async_16(smem_addr(smem + r * TileShape<kD>::kPitch + ch * 8), src, ok);
    }
  }
}

// A fragment: rows [r0, r0 + 16), columns [c0, c0 + 16) of a row-major tile.
template <int kD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int r0, int c0,
                                       int lane) {
  ldsm_x4(a, smem_addr(tile + (r0 + lane % 16) * TileShape<kD>::kPitch + c0 + (lane / 16) * 8));
}

// B fragments of two adjacent n-tiles from a tile stored [n][k] (keys by head dim for Q K^T):
// b[0], b[1] for n in [n0, n0 + 8), b[2], b[3] for [n0 + 8, n0 + 16); k in [k0, k0 + 16).
template <int kD, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int n0, int k0,
                                          int lane) {
  ldsm_x4(b, smem_addr(tile + (n0 + lane % 8 + 8 * (lane / 16)) * TileShape<kD>::kPitch + k0 +
                       8 * ((lane / 8) % 2)));
}

// Same from a tile stored [k][n] (keys by head dim for P V), transposed by ldmatrix.
template <int kD, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0,
                                          int lane) {
  ldsm_x4_trans(b, smem_addr(tile + (k0 + lane % 8 + 8 * ((lane / 8) % 2)) *
                                        TileShape<kD>::kPitch +
                                    n0 + 8 * (lane / 16)));
}

// A fragment of k-step kk of a 16 x (8 * kTiles) fp32 accumulator block, rounded to T.
template <typename T, int kTiles>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[kTiles][4],
                                         int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc[16 x 8 * kNTiles] += A[16 x 16 kSteps] * B, A rows [r0, r0 + 16) of tile_a ([m][k]),
// B from tile_b stored [n][k] with n in [0, 8 * kNTiles).
template <typename T, int kD, int kSteps, int kNTiles>
__device__ __forceinline__ void gemm_a_smem_b_nk(float (&acc)[kNTiles][4], const T* tile_a,
                                                 int r0, const T* tile_b, int lane) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    uint32_t a[4];
    load_a<kD>(a, tile_a, r0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      load_b_nk<kD>(b, tile_b, np * 16, kk * 16, lane);
      mma<T>(acc[2 * np], a, b[0], b[1]);
      mma<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x kD] += P[16 x 8 * kPTiles] (fp32 accumulators, rounded to T) * B, B from tile_b
// stored [k][n] (k = the columns of P, n = head dim).
template <typename T, int kD, int kPTiles>
__device__ __forceinline__ void gemm_acc_a_b_kn(float (&acc)[kD / 8][4],
                                                const float (&p)[kPTiles][4], const T* tile_b,
                                                int lane) {
#pragma unroll
  for (int kk = 0; kk < kPTiles / 2; ++kk) {
    uint32_t a[4];
    acc_to_a<T, kPTiles>(a, p, kk);
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t b[4];
      load_b_kn<kD>(b, tile_b, kk * 16, dp * 16, lane);
      mma<T>(acc[2 * dp], a, b[0], b[1]);
      mma<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Writes a warp's 16 x kD fp32 accumulator rows, times `scale` and rounded to T, into rows
// [r0, r0 + 16) of a shared tile, then copies the rows r < valid (relative to r0) to global
// memory (row r at gmem + r * stride) with 16-byte stores. Only the warp's own rows are touched.
template <typename T, int kD>
__device__ __forceinline__ void store_rows(const float (&acc)[kD / 8][4], float scale, T* tile,
                                           int r0, T* gmem, int64_t stride, int64_t valid,
                                           int lane) {
  constexpr int kPitch = TileShape<kD>::kPitch, kChunks = TileShape<kD>::kChunks;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<uint32_t*>(tile + (r0 + g + 8 * half) * kPitch + dt * 8 + 2 * t) =
          pack2<T>(acc[dt][2 * half] * scale, acc[dt][2 * half + 1] * scale);
    }
  }
  __syncwarp();
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += kWarpThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    if (r < valid) {
      *reinterpret_cast<uint4*>(gmem + r * stride + ch * 8) =
          *reinterpret_cast<const uint4*>(tile + (r0 + r) * kPitch + ch * 8);
    }
  }
}

// Blocks of 128 threads per SM that __launch_bounds__ asks the compiler to fit, which caps the
// registers at 65536 / (128 * n): 128 for kD = 32, 168 for 64, 255 above. Left alone, ptxas
// spends registers on prefetched fragments beyond what buys latency; tighter caps spill.
template <int kD>
constexpr int min_blocks_128() {
  return kD <= 32 ? 4 : (kD <= 64 ? 3 : 2);
}

// ---------------------------------------------------------------------------- host side
// Token and head strides, in elements, of a [T, H, D] tensor whose last stride is 1.
struct Strides {
  int64_t token;
  int64_t head;
};

inline void check_half_dtype(const char* op, int dtype) {
  const DType dt = dtype_from_code(dtype);
  require(dt != DType::kFloat32, op,
          "float32 is not supported by the CUDA attention kernels (tensor cores take "
          "float16 / bfloat16); use backend='triton' or backend='torch'");
}

// The head dims the attention kernels are instantiated for: the one list every check, the
// dispatch switch and the module's head_dims() derive from.
#define DTOP_FOR_EACH_HEAD_DIM(X) X(32) X(64) X(80) X(96) X(128)

inline std::vector<int> head_dims() {
#define DTOP_HEAD_DIM_ITEM(d) d,
  return {DTOP_FOR_EACH_HEAD_DIM(DTOP_HEAD_DIM_ITEM)};
#undef DTOP_HEAD_DIM_ITEM
}

inline bool supported_head_dim(int64_t d) {
  for (int h : head_dims()) {
    if (h == d) return true;
  }
  return false;
}

inline void check_head_dim(const char* op, int64_t d) {
  if (supported_head_dim(d)) return;
  std::string list;
  for (int h : head_dims()) list += (list.empty() ? "" : ", ") + std::to_string(h);
  require(false, op,
          "head dim " + std::to_string(d) + " is not supported by the CUDA attention kernels (" +
              list + "); use backend='triton' or backend='torch'");
}

// 16-byte loads need a 16-byte aligned base and strides that are multiples of 8 elements.
inline void check_rows(const char* op, const char* name, const void* p, Strides s) {
  require(p != nullptr, op, std::string(name) + " is a null pointer");
  require(aligned_to(p, 16) && s.token % 8 == 0 && s.head % 8 == 0, op,
          std::string(name) +
              " must be 16-byte aligned with token and head strides that are multiples of 8 "
              "elements (got strides " +
              std::to_string(s.token) + ", " + std::to_string(s.head) +
              "); pass a contiguous copy");
}

inline void check_batch_heads(const char* op, int64_t batch, int64_t heads) {
  require(batch >= 0 && batch <= 65535, op,
          "batch must be in [0, 65535], got " + std::to_string(batch));
  require(heads >= 1 && heads <= 65535, op,
          "heads must be in [1, 65535], got " + std::to_string(heads));
}

// Largest dynamic shared memory per block on every GPU the build serves: sm_86 / sm_89 run the
// sm_80 build and allow 99 KB (A100 163 KB, H100 227 KB).
constexpr size_t kMaxSmemBytes = 99 * 1024;

// Dynamic shared memory above 48 KB must be allowed per kernel and device. The attribute is
// set once per (kernel, device), not at every launch: later launches only look it up.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  DTOP_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> bytes
  std::lock_guard<std::mutex> lock(mutex);
  size_t& done = allowed[{reinterpret_cast<const void*>(kernel), device}];
  if (done >= bytes) return;
  DTOP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
  done = bytes;
}

}  // namespace attn
}  // namespace dtop

// Runs the statement(s) with T = __half / __nv_bfloat16 (float32 was rejected before).
#define DTOP_DISPATCH_HALF(dtype, T, ...)                                     \
  switch (::dtop::dtype_from_code(dtype)) {                                 \
    case ::dtop::DType::kFloat16: {                                         \
      using T = __half;                                                     \
      __VA_ARGS__;                                                          \
      break;                                                                \
    }                                                                       \
    case ::dtop::DType::kBFloat16: {                                        \
      using T = __nv_bfloat16;                                              \
      __VA_ARGS__;                                                          \
      break;                                                                \
    }                                                                       \
    default:                                                                \
      throw std::invalid_argument("attention kernels take float16 / bfloat16"); \
  }

namespace dtop {

// Calls f(std::integral_constant<int, kD>) for the head dim d (checked before).
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
#define DTOP_HEAD_DIM_CASE(v) \
  case v:                     \
    f(std::integral_constant<int, v>{}); \
    return;
  switch (d) { DTOP_FOR_EACH_HEAD_DIM(DTOP_HEAD_DIM_CASE) }
#undef DTOP_HEAD_DIM_CASE
  throw std::invalid_argument("unsupported head dim " + std::to_string(d));
}

}  // namespace dtop

// Runs the statement(s) with constexpr int kD = the head dim (checked before).
#define DTOP_DISPATCH_HEAD_DIM(d, kD, ...)                          \
  dtop::dispatch_head_dim(d, [&](auto kD##_tag) {                   \
    constexpr int kD = decltype(kD##_tag)::value;                   \
    __VA_ARGS__;                                                    \
  })

