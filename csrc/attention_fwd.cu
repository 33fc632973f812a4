// Varlen attention forward (see ops.h), FlashAttention-2 style, the CUDA twin of _fwd_kernel in
// dtop_kernels/triton/attention.py.
//
// Grid (cdiv(max_seqlen_q, 64), B, H), 4 warps; warp w owns query rows [16w, 16w + 16) of the
// block's tile and keeps its Q fragments in registers. Per key tile of 64: S = Q K^T on tensor
// cores, online softmax in fp32 with base-2 exponentials (scores pre-multiplied by
// scale * log2(e)), O += P V with P taken straight from the S accumulators. K and V tiles come
// in by cp.async, each load overlapping the other product: V_j while S_j is computed, K_{j+1}
// while P_j V_j is. Output rows are divided by the row sum (1 when an image has no keys, so its
// output is zero) and lse = m + log2(l) (base 2, -inf without keys) is stored as [H, Tq] fp32.
// Padding query rows (past T) are never written.
#include <cstring>

#include "attention.cuh"
#include "ops.h"

namespace dtop {
namespace {

using namespace attn;

constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * kWarpThreads;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // [H, cap_q]
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t cap_q, cap_k;
  Strides sq, sk, sv, so;
  float scale_log2;  // softmax scale * log2(e)
};

template <int kD>
constexpr size_t fwd_smem_bytes() {
  return sizeof(__half) * (kBlockM + 2 * kBlockN) * TileShape<kD>::kPitch;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, min_blocks_128<kD>())
    attention_fwd_kernel(const FwdParams p) {
  constexpr int kPitch = TileShape<kD>::kPitch, kNTiles = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + kBlockM * kPitch;
  T* s_v = s_k + kBlockN * kPitch;

  const int h = blockIdx.z;
  const Segment qs = image_segment(p.cu_q, blockIdx.y, p.cap_q);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  if (m0 >= qs.len) return;  // past this image's queries
  const Segment ks = image_segment(p.cu_k, blockIdx.y, p.cap_k);
  const int warp = threadIdx.x / kWarpThreads, lane = threadIdx.x % kWarpThreads;
  const int t = lane % 4;

  const T* q = static_cast<const T*>(p.q) + (qs.start + m0) * p.sq.token + h * p.sq.head;
  const T* k = static_cast<const T*>(p.k) + ks.start * p.sk.token + h * p.sk.head;
  const T* v = static_cast<const T*>(p.v) + ks.start * p.sv.token + h * p.sv.head;
  const int64_t q_rows = qs.len - m0 < kBlockM ? qs.len - m0 : kBlockM;
  const int64_t n_tiles = ceil_div_dev(ks.len, kBlockN);

  load_tile<kBlockM, kD, kThreads>(s_q, q, p.sq.token, static_cast<int>(q_rows));
  if (n_tiles > 0) {
    load_tile<kBlockN, kD, kThreads>(s_k, k, p.sk.token,
                                     static_cast<int>(ks.len < kBlockN ? ks.len : kBlockN));
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[kD / 16][4];
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) load_a<kD>(qf[kk], s_q, warp * 16, kk * 16, lane);

  float o[kD / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // rows g, g + 8
  for (int64_t j = 0; j < n_tiles; ++j) {
    const int64_t n0 = j * kBlockN;
    const int kv_rows = static_cast<int>(ks.len - n0 < kBlockN ? ks.len - n0 : kBlockN);
    load_tile<kBlockN, kD, kThreads>(s_v, v + n0 * p.sv.token, p.sv.token, kv_rows);
    cp_async_commit();

    float s[kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        load_b_nk<kD>(b, s_k, np * 16, kk * 16, lane);
        mma<T>(s[2 * np], qf[kk], b[0], b[1]);
        mma<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }

    // Online softmax, base 2; keys past the image are -inf (at least one key is valid).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * t + e;
          float& x = s[nt][2 * half + e];
          x = col < kv_rows ? x * p.scale_log2 : -INFINITY;
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[half], mx);
      const float alpha = exp2f(row_max[half] - new_max);
      row_max[half] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * half + e];
          x = exp2f(x - new_max);
          sum += x;
        }
      }
      row_sum[half] = row_sum[half] * alpha + sum;  // this thread's columns only
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[dt][2 * half] *= alpha;
        o[dt][2 * half + 1] *= alpha;
      }
    }

    cp_async_wait<0>();  // V_j has landed
    __syncthreads();     // ... for every thread, and nobody reads K_j any more
    if (j + 1 < n_tiles) {
      const int64_t n1 = n0 + kBlockN;
      load_tile<kBlockN, kD, kThreads>(
          s_k, k + n1 * p.sk.token, p.sk.token,
          static_cast<int>(ks.len - n1 < kBlockN ? ks.len - n1 : kBlockN));
      cp_async_commit();
    }
    gemm_acc_a_b_kn<T, kD, kNTiles>(o, s, s_v, lane);
    cp_async_wait<0>();  // K_{j+1} has landed
    __syncthreads();     // ... and nobody reads V_j any more
  }

  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = row_sum[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float l_safe = l > 0.f ? l : 1.f;  // no keys: zero output
    inv[half] = 1.f / l_safe;
    const int64_t row = m0 + warp * 16 + lane / 4 + 8 * half;
    if (t == 0 && row < qs.len) {
      p.lse[h * p.cap_q + qs.start + row] = row_max[half] + log2f(l_safe);
    }
  }
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
    o[dt][0] *= inv[0];
    o[dt][1] *= inv[0];
    o[dt][2] *= inv[1];
    o[dt][3] *= inv[1];
  }
  // The warp's own rows of s_q are free (its Q fragments are in registers): stage there.
  T* out = static_cast<T*>(p.out) + (qs.start + m0 + warp * 16) * p.so.token + h * p.so.head;
  store_rows<T, kD>(o, 1.f, s_q, warp * 16, out, p.so.token, q_rows - warp * 16, lane);
}

template <typename T, int kD>
void launch_fwd(const FwdParams& p, int64_t batch, int64_t heads, int64_t max_seqlen_q,
                cudaStream_t stream) {
  const auto kernel = attention_fwd_kernel<T, kD>;
  constexpr size_t smem = fwd_smem_bytes<kD>();
  static_assert(smem <= kMaxSmemBytes, "shared memory above the sm_86 / sm_89 limit");
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div(max_seqlen_q, kBlockM)),
                  static_cast<unsigned>(batch), static_cast<unsigned>(heads));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  DTOP_CHECK_LAUNCH();
}

// The non-finite rule of every backend, applied after attention_fwd_kernel (whose online
// softmax would not propagate a NaN score reliably): block (b, h) scans the key and value rows of
// image b, head h for a NaN or Inf; then each query row of the image with a non-finite entry, or
// every row when a key or value row had one, is overwritten with NaN. Images without keys keep
// their zero rows; padding rows are never touched.
constexpr int kNonfiniteThreads = 128;

// NaN or +-Inf: the exponent bits all set (a bit test: immune to fast-math assumptions).
__device__ __forceinline__ bool non_finite(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ float quiet_nan() {
  const uint32_t u = 0x7fc00000u;
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kNonfiniteThreads)
    attention_nonfinite_kernel(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, T* __restrict__ out,
                               const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k,
                               int64_t capacity_q, int64_t capacity_k, int64_t head_dim,
                               Strides sq, Strides sk, Strides sv, Strides so) {
  const int64_t b = blockIdx.x, h = blockIdx.y;
  const Segment ks = image_segment(cu_k, b, capacity_k);
  if (ks.len == 0) return;  // the same for every thread of the block: no barrier skipped
  int bad = 0;
  for (int64_t j = ks.start + threadIdx.x; j < ks.start + ks.len; j += blockDim.x) {
    const T* kr = k + j * sk.token + h * sk.head;
    const T* vr = v + j * sv.token + h * sv.head;
    for (int64_t d = 0; d < head_dim; ++d)
      bad |= non_finite(to_float(kr[d])) | non_finite(to_float(vr[d]));
  }
  const bool image_bad = __syncthreads_or(bad) != 0;
  const Segment qs = image_segment(cu_q, b, capacity_q);
  const T nan = from_float<T>(quiet_nan());
  for (int64_t r = qs.start + threadIdx.x; r < qs.start + qs.len; r += blockDim.x) {
    const T* qr = q + r * sq.token + h * sq.head;
    bool row_bad = image_bad;
    for (int64_t d = 0; d < head_dim && !row_bad; ++d) row_bad = non_finite(to_float(qr[d]));
    if (!row_bad) continue;
    T* orow = out + r * so.token + h * so.head;
    for (int64_t d = 0; d < head_dim; ++d) orow[d] = nan;
  }
}

}  // namespace

void attention_nonfinite_rows(const void* q, const void* k, const void* v, void* out,
                              const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                              int64_t batch, int64_t heads, int64_t head_dim, int64_t capacity_q,
                              int64_t capacity_k, int64_t q_stride_t, int64_t q_stride_h,
                              int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                              int64_t v_stride_h, int64_t out_stride_t, int64_t out_stride_h,
                              int dtype, void* stream) {
  const char* op = "attention_nonfinite_rows";
  check_half_dtype(op, dtype);
  check_batch_heads(op, batch, heads);
  require(capacity_q >= 0 && capacity_k >= 0 && head_dim > 0, op,
          "capacities must be >= 0 and head_dim > 0");
  if (batch == 0 || capacity_q == 0 || capacity_k == 0) return;
  require(cu_seqlens_q != nullptr && cu_seqlens_k != nullptr, op,
          "cu_seqlens_q and cu_seqlens_k must be non-null");
  const Strides sq{q_stride_t, q_stride_h}, sk{k_stride_t, k_stride_h},
      sv{v_stride_t, v_stride_h}, so{out_stride_t, out_stride_h};
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(heads));
  const auto s = static_cast<cudaStream_t>(stream);
  DTOP_DISPATCH_HALF(dtype, T, {
    attention_nonfinite_kernel<T><<<grid, kNonfiniteThreads, 0, s>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<T*>(out), cu_seqlens_q, cu_seqlens_k, capacity_q, capacity_k, head_dim, sq,
        sk, sv, so);
  });
  DTOP_CHECK_LAUNCH();
}

void attention_fwd(const void* q, const void* k, const void* v, void* out, float* lse,
                   const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t batch,
                   int64_t heads, int64_t head_dim, int64_t capacity_q, int64_t capacity_k,
                   int64_t max_seqlen_q, int64_t q_stride_t, int64_t q_stride_h,
                   int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                   int64_t v_stride_h, int64_t out_stride_t, int64_t out_stride_h, double scale,
                   int dtype, void* stream) {
  const char* op = "attention_fwd";
  check_half_dtype(op, dtype);
  check_head_dim(op, head_dim);
  check_batch_heads(op, batch, heads);
  require(capacity_q >= 0 && capacity_k >= 0, op, "capacities must be >= 0");
  require(max_seqlen_q >= 0, op, "max_seqlen_q must be >= 0");
  if (max_seqlen_q > capacity_q) max_seqlen_q = capacity_q;  // a larger bound is valid
  if (batch == 0 || capacity_q == 0 || max_seqlen_q == 0) return;
  const Strides sq{q_stride_t, q_stride_h}, so{out_stride_t, out_stride_h};
  check_rows(op, "q", q, sq);
  check_rows(op, "out", out, so);
  require(lse != nullptr && cu_seqlens_q != nullptr && cu_seqlens_k != nullptr, op,
          "lse, cu_seqlens_q and cu_seqlens_k must be non-null");
  Strides sk{k_stride_t, k_stride_h}, sv{v_stride_t, v_stride_h};
  if (capacity_k > 0) {
    check_rows(op, "k", k, sk);
    check_rows(op, "v", v, sv);
  }
  const FwdParams p{q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, capacity_q, capacity_k,
                    sq, sk, sv, so, static_cast<float>(scale * 1.4426950408889634)};
  const auto s = static_cast<cudaStream_t>(stream);
  DTOP_DISPATCH_HALF(dtype, T, {
    DTOP_DISPATCH_HEAD_DIM(head_dim, kD, launch_fwd<T, kD>(p, batch, heads, max_seqlen_q, s));
  });
}

std::vector<int> attention_head_dims() { return head_dims(); }

}  // namespace dtop
