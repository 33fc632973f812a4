// Varlen attention backward (see ops.h), FlashAttention-2 scheme, the CUDA twin of
// _bwd_dkdv_kernel / _bwd_dq_kernel in dtop_kernels/triton/attention.py. Three kernels, no
// atomics, deterministic:
//   delta: delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] (fp32; 0 on padding rows).
//   dK/dV: grid (cdiv(max_seqlen_k, 64), B, H); warp w owns keys [16w, 16w + 16) of the block
//          and loops over the image's query tiles (double-buffered by cp.async):
//          S^T = K Q^T, P^T = exp2(S^T * scale * log2(e) - lse), dV += P^T dO,
//          dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q; dK *= scale at the end.
//          Working on the transposes keeps P^T and dS^T in the accumulator layout that feeds
//          the next product directly.
//   dQ:    grid (cdiv(max_seqlen_q, 64), B, H); warp w owns query rows [16w, 16w + 16) and
//          loops over the image's key tiles: S = Q K^T, P, dP = dO V^T, dS = P * (dP - delta),
//          dQ += dS K; dQ *= scale at the end.
// The probabilities are recomputed from the forward's base-2 lse, as in the Triton kernels.
#include "attention.cuh"
#include "ops.h"

namespace dtop {
namespace {

using namespace attn;

constexpr int kWarps = 4, kThreads = kWarps * kWarpThreads;

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;    // [H, cap_q]
  const float* delta;  // [H, cap_q]
  void* dq;
  void* dk;
  void* dv;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t cap_q, cap_k;
  Strides sq, sk, sv, sdo, sdq, sdk, sdv;
  float scale;       // softmax scale
  float scale_log2;  // softmax scale * log2(e)
};

// ---------------------------------------------------------------------------- delta
// One thread per (row, head); rows past T get 0.
template <typename T>
__global__ void __launch_bounds__(256)
    attention_delta_kernel(const T* __restrict__ out, Strides so, const T* __restrict__ dout,
                           Strides sdo, const int32_t* __restrict__ cu_q, int64_t batch,
                           int64_t cap_q, int64_t heads, int64_t head_dim,
                           float* __restrict__ delta) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= cap_q * heads) return;
  const int64_t row = idx / heads, h = idx % heads;
  float acc = 0.f;
  if (row < valid_rows(cu_q, batch, cap_q)) {
    const T* o = out + row * so.token + h * so.head;
    const T* d = dout + row * sdo.token + h * sdo.head;
    for (int64_t c = 0; c < head_dim; c += 8) {
      const Pack<T, 8> a = *reinterpret_cast<const Pack<T, 8>*>(o + c);
      const Pack<T, 8> b = *reinterpret_cast<const Pack<T, 8>*>(d + c);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += to_float(a.v[e]) * to_float(b.v[e]);
    }
  }
  delta[h * cap_q + row] = acc;
}

// ---------------------------------------------------------------------------- dQ
constexpr int kDqBlockM = 64;

// Key rows per step: 32 above kD = 64 keeps the shared memory (Q, dO and double-buffered K, V)
// under the 99 KB a block may use on sm_86 / sm_89, which run the sm_80 build.
template <int kD>
__host__ __device__ constexpr int dq_block_n() {
  return kD <= 64 ? 64 : 32;
}

template <int kD>
constexpr size_t dq_smem_bytes() {
  return sizeof(__half) * (2 * kDqBlockM + 4 * dq_block_n<kD>()) * TileShape<kD>::kPitch;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, min_blocks_128<kD>())
    attention_bwd_dq_kernel(const BwdParams p) {
  constexpr int kBlockN = dq_block_n<kD>(), kPitch = TileShape<kD>::kPitch;
  constexpr int kNTiles = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + kDqBlockM * kPitch;
  T* s_k = s_do + kDqBlockM * kPitch;  // [2][kBlockN][kPitch]
  T* s_v = s_k + 2 * kBlockN * kPitch;  // [2][kBlockN][kPitch]

  const int h = blockIdx.z;
  const Segment qs = image_segment(p.cu_q, blockIdx.y, p.cap_q);
  const int64_t m0 = int64_t(blockIdx.x) * kDqBlockM;
  if (m0 >= qs.len) return;
  const Segment ks = image_segment(p.cu_k, blockIdx.y, p.cap_k);
  const int warp = threadIdx.x / kWarpThreads, lane = threadIdx.x % kWarpThreads;
  const int t = lane % 4;
  const int64_t q_rows = qs.len - m0 < kDqBlockM ? qs.len - m0 : kDqBlockM;
  const int64_t n_tiles = ceil_div_dev(ks.len, kBlockN);
  const T* k = static_cast<const T*>(p.k) + ks.start * p.sk.token + h * p.sk.head;
  const T* v = static_cast<const T*>(p.v) + ks.start * p.sv.token + h * p.sv.head;
  const auto load_kv = [&](int64_t j, int buf) {
    const int64_t n0 = j * kBlockN;
    const int rows = static_cast<int>(ks.len - n0 < kBlockN ? ks.len - n0 : kBlockN);
    load_tile<kBlockN, kD, kThreads>(s_k + buf * kBlockN * kPitch, k + n0 * p.sk.token,
                                     p.sk.token, rows);
    load_tile<kBlockN, kD, kThreads>(s_v + buf * kBlockN * kPitch, v + n0 * p.sv.token,
                                     p.sv.token, rows);
  };

  load_tile<kDqBlockM, kD, kThreads>(
      s_q, static_cast<const T*>(p.q) + (qs.start + m0) * p.sq.token + h * p.sq.head,
      p.sq.token, static_cast<int>(q_rows));
  load_tile<kDqBlockM, kD, kThreads>(
      s_do, static_cast<const T*>(p.dout) + (qs.start + m0) * p.sdo.token + h * p.sdo.head,
      p.sdo.token, static_cast<int>(q_rows));
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  // Rows g and g + 8 of the warp; padding rows get lse = +inf, so their P is 0.
  float lse[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = m0 + warp * 16 + lane / 4 + 8 * half;
    const bool ok = r < qs.len;
    lse[half] = ok ? p.lse[h * p.cap_q + qs.start + r] : INFINITY;
    delta[half] = ok ? p.delta[h * p.cap_q + qs.start + r] : 0.f;
  }

  float dq[kD / 8][4] = {};
  for (int64_t j = 0; j < n_tiles; ++j) {
    const int buf = static_cast<int>(j & 1);
    if (j + 1 < n_tiles) {
      load_kv(j + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = s_k + buf * kBlockN * kPitch;
    const T* vt = s_v + buf * kBlockN * kPitch;
    const int kv_rows = static_cast<int>(ks.len - j * kBlockN < kBlockN ? ks.len - j * kBlockN
                                                                          : kBlockN);

    float s[kNTiles][4] = {}, dp[kNTiles][4] = {};
    gemm_a_smem_b_nk<T, kD, kD / 16, kNTiles>(s, s_q, warp * 16, kt, lane);
    gemm_a_smem_b_nk<T, kD, kD / 16, kNTiles>(dp, s_do, warp * 16, vt, lane);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2, col = nt * 8 + 2 * t + e % 2;
        const float prob = col < kv_rows ? exp2f(s[nt][e] * p.scale_log2 - lse[half]) : 0.f;
        s[nt][e] = prob * (dp[nt][e] - delta[half]);  // dS
      }
    }
    gemm_acc_a_b_kn<T, kD, kNTiles>(dq, s, kt, lane);
    __syncthreads();  // the next iteration overwrites this buffer
  }
  // Without key tiles the loop never waited for the prologue's copies: wait before reusing s_q.
  cp_async_wait<0>();
  __syncthreads();
  // The warp's own rows of s_q are no longer read by anyone: stage there.
  T* out = static_cast<T*>(p.dq) + (qs.start + m0 + warp * 16) * p.sdq.token + h * p.sdq.head;
  store_rows<T, kD>(dq, p.scale, s_q, warp * 16, out, p.sdq.token, q_rows - warp * 16, lane);
}

// ---------------------------------------------------------------------------- dK / dV
constexpr int kKvBlockN = 64;

// Query rows per step: dK and dV accumulators (kD / 2 registers each) stay live across the
// whole loop, so the S^T / dP^T tiles shrink as kD grows to keep everything in registers.
template <int kD>
__host__ __device__ constexpr int kv_block_m() {
  return kD <= 64 ? 64 : (kD <= 96 ? 32 : 16);
}

// Blocks per SM for __launch_bounds__: 3 (168 registers) at kD = 32, else 2 (255 registers).
template <int kD>
__host__ __device__ constexpr int kv_min_blocks() {
  return kD <= 32 ? 3 : 2;
}

template <int kD>
constexpr size_t dkdv_smem_bytes() {
  return sizeof(__half) * (2 * kKvBlockN + 4 * kv_block_m<kD>()) * TileShape<kD>::kPitch +
         sizeof(float) * 4 * kv_block_m<kD>();
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, kv_min_blocks<kD>())
    attention_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int kBlockM = kv_block_m<kD>(), kPitch = TileShape<kD>::kPitch;
  constexpr int kMTiles = kBlockM / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kKvBlockN * kPitch;
  T* s_q = s_v + kKvBlockN * kPitch;    // [2][kBlockM][kPitch]
  T* s_do = s_q + 2 * kBlockM * kPitch;  // [2][kBlockM][kPitch]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kBlockM * kPitch);  // [2][kBlockM]
  float* s_delta = s_lse + 2 * kBlockM;                                   // [2][kBlockM]

  const int h = blockIdx.z;
  const Segment ks = image_segment(p.cu_k, blockIdx.y, p.cap_k);
  const int64_t n0 = int64_t(blockIdx.x) * kKvBlockN;
  if (n0 >= ks.len) return;
  const Segment qs = image_segment(p.cu_q, blockIdx.y, p.cap_q);
  const int warp = threadIdx.x / kWarpThreads, lane = threadIdx.x % kWarpThreads;
  const int t = lane % 4;
  const int64_t kv_rows = ks.len - n0 < kKvBlockN ? ks.len - n0 : kKvBlockN;
  const int64_t m_tiles = ceil_div_dev(qs.len, kBlockM);
  const T* q = static_cast<const T*>(p.q) + qs.start * p.sq.token + h * p.sq.head;
  const T* dout = static_cast<const T*>(p.dout) + qs.start * p.sdo.token + h * p.sdo.head;
  const float* lse = p.lse + h * p.cap_q + qs.start;
  const float* delta = p.delta + h * p.cap_q + qs.start;
  const auto load_q = [&](int64_t i, int buf) {
    const int64_t m0 = i * kBlockM;
    const int rows = static_cast<int>(qs.len - m0 < kBlockM ? qs.len - m0 : kBlockM);
    load_tile<kBlockM, kD, kThreads>(s_q + buf * kBlockM * kPitch, q + m0 * p.sq.token,
                                     p.sq.token, rows);
    load_tile<kBlockM, kD, kThreads>(s_do + buf * kBlockM * kPitch, dout + m0 * p.sdo.token,
                                     p.sdo.token, rows);
    // Plain loads: visible after the __syncthreads that precedes their use. Padding rows get
    // lse = +inf, so their P is 0.
    for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
      const bool ok = r < rows;
      s_lse[buf * kBlockM + r] = ok ? lse[m0 + r] : INFINITY;
      s_delta[buf * kBlockM + r] = ok ? delta[m0 + r] : 0.f;
    }
  };

  load_tile<kKvBlockN, kD, kThreads>(
      s_k, static_cast<const T*>(p.k) + (ks.start + n0) * p.sk.token + h * p.sk.head,
      p.sk.token, static_cast<int>(kv_rows));
  load_tile<kKvBlockN, kD, kThreads>(
      s_v, static_cast<const T*>(p.v) + (ks.start + n0) * p.sv.token + h * p.sv.head,
      p.sv.token, static_cast<int>(kv_rows));
  if (m_tiles > 0) load_q(0, 0);
  cp_async_commit();

  // Keys g and g + 8 of the warp past the image contribute nothing (rows of dK / dV that are
  // never stored); their P is zeroed anyway.
  bool key_ok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) key_ok[half] = warp * 16 + lane / 4 + 8 * half < kv_rows;

  float dk[kD / 8][4] = {}, dv[kD / 8][4] = {};
  for (int64_t i = 0; i < m_tiles; ++i) {
    const int buf = static_cast<int>(i & 1);
    if (i + 1 < m_tiles) {
      load_q(i + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* qt = s_q + buf * kBlockM * kPitch;
    const T* dot = s_do + buf * kBlockM * kPitch;
    const float* lse_t = s_lse + buf * kBlockM;
    const float* delta_t = s_delta + buf * kBlockM;

    float st[kMTiles][4] = {};  // S^T: keys x queries
    gemm_a_smem_b_nk<T, kD, kD / 16, kMTiles>(st, s_k, warp * 16, qt, lane);
#pragma unroll
    for (int nt = 0; nt < kMTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + e % 2;
        st[nt][e] = key_ok[e / 2] ? exp2f(st[nt][e] * p.scale_log2 - lse_t[col]) : 0.f;
      }
    }
    gemm_acc_a_b_kn<T, kD, kMTiles>(dv, st, dot, lane);  // dV += P^T dO
    float dpt[kMTiles][4] = {};                           // dP^T = V dO^T
    gemm_a_smem_b_nk<T, kD, kD / 16, kMTiles>(dpt, s_v, warp * 16, dot, lane);
#pragma unroll
    for (int nt = 0; nt < kMTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + e % 2;
        dpt[nt][e] = st[nt][e] * (dpt[nt][e] - delta_t[col]);  // dS^T
      }
    }
    gemm_acc_a_b_kn<T, kD, kMTiles>(dk, dpt, qt, lane);  // dK += dS^T Q
    __syncthreads();  // the next iteration overwrites this buffer
  }
  // Without query tiles the loop never waited for the prologue's copies: wait before reusing.
  cp_async_wait<0>();
  __syncthreads();
  // Each warp read only its own rows of s_k / s_v: stage dK and dV there.
  const int64_t rows = kv_rows - warp * 16;
  T* dk_out = static_cast<T*>(p.dk) + (ks.start + n0 + warp * 16) * p.sdk.token + h * p.sdk.head;
  T* dv_out = static_cast<T*>(p.dv) + (ks.start + n0 + warp * 16) * p.sdv.token + h * p.sdv.head;
  store_rows<T, kD>(dk, p.scale, s_k, warp * 16, dk_out, p.sdk.token, rows, lane);
  store_rows<T, kD>(dv, 1.f, s_v, warp * 16, dv_out, p.sdv.token, rows, lane);
}

// ---------------------------------------------------------------------------- host side
template <typename T, int kD>
void launch_bwd(const BwdParams& p, int64_t batch, int64_t heads, int64_t max_seqlen_q,
                int64_t max_seqlen_k, cudaStream_t stream) {
  if (max_seqlen_k > 0) {
    const auto kernel = attention_bwd_dkdv_kernel<T, kD>;
    constexpr size_t smem = dkdv_smem_bytes<kD>();
    static_assert(smem <= kMaxSmemBytes, "shared memory above the sm_86 / sm_89 limit");
    allow_smem(kernel, smem);
    const dim3 grid(static_cast<unsigned>(ceil_div(max_seqlen_k, kKvBlockN)),
                    static_cast<unsigned>(batch), static_cast<unsigned>(heads));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    DTOP_CHECK_LAUNCH();
  }
  if (max_seqlen_q > 0) {
    const auto kernel = attention_bwd_dq_kernel<T, kD>;
    constexpr size_t smem = dq_smem_bytes<kD>();
    static_assert(smem <= kMaxSmemBytes, "shared memory above the sm_86 / sm_89 limit");
    allow_smem(kernel, smem);
    const dim3 grid(static_cast<unsigned>(ceil_div(max_seqlen_q, kDqBlockM)),
                    static_cast<unsigned>(batch), static_cast<unsigned>(heads));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    DTOP_CHECK_LAUNCH();
  }
}

}  // namespace

void attention_bwd(const void* dout, const void* q, const void* k, const void* v,
                   const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv,
                   const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t batch,
                   int64_t heads, int64_t head_dim, int64_t capacity_q, int64_t capacity_k,
                   int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t dout_stride_t,
                   int64_t dout_stride_h, int64_t q_stride_t, int64_t q_stride_h,
                   int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                   int64_t v_stride_h, int64_t out_stride_t, int64_t out_stride_h,
                   int64_t dq_stride_t, int64_t dq_stride_h, int64_t dk_stride_t,
                   int64_t dk_stride_h, int64_t dv_stride_t, int64_t dv_stride_h, double scale,
                   int dtype, void* stream) {
  const char* op = "attention_bwd";
  check_half_dtype(op, dtype);
  check_head_dim(op, head_dim);
  check_batch_heads(op, batch, heads);
  require(capacity_q >= 0 && capacity_k >= 0, op, "capacities must be >= 0");
  require(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, "max_seqlen_q/k must be >= 0");
  if (max_seqlen_q > capacity_q) max_seqlen_q = capacity_q;  // a larger bound is valid
  if (max_seqlen_k > capacity_k) max_seqlen_k = capacity_k;
  if (batch == 0 || capacity_q == 0 || capacity_k == 0) return;
  const Strides sdo{dout_stride_t, dout_stride_h}, sq{q_stride_t, q_stride_h},
      sk{k_stride_t, k_stride_h}, sv{v_stride_t, v_stride_h}, so{out_stride_t, out_stride_h},
      sdq{dq_stride_t, dq_stride_h}, sdk{dk_stride_t, dk_stride_h}, sdv{dv_stride_t, dv_stride_h};
  check_rows(op, "dout", dout, sdo);
  check_rows(op, "q", q, sq);
  check_rows(op, "k", k, sk);
  check_rows(op, "v", v, sv);
  check_rows(op, "out", out, so);
  check_rows(op, "dq", dq, sdq);
  check_rows(op, "dk", dk, sdk);
  check_rows(op, "dv", dv, sdv);
  require(lse != nullptr && delta != nullptr && cu_seqlens_q != nullptr &&
              cu_seqlens_k != nullptr,
          op, "lse, delta, cu_seqlens_q and cu_seqlens_k must be non-null");
  const auto s = static_cast<cudaStream_t>(stream);
  DTOP_DISPATCH_HALF(dtype, T, {
    const int64_t items = capacity_q * heads;
    attention_delta_kernel<T><<<static_cast<unsigned>(ceil_div(items, 256)), 256, 0, s>>>(
        static_cast<const T*>(out), so, static_cast<const T*>(dout), sdo, cu_seqlens_q, batch,
        capacity_q, heads, head_dim, delta);
    DTOP_CHECK_LAUNCH();
  });
  const BwdParams p{q, k, v, dout, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                    capacity_q, capacity_k, sq, sk, sv, sdo, sdq, sdk, sdv,
                    static_cast<float>(scale), static_cast<float>(scale * 1.4426950408889634)};
  DTOP_DISPATCH_HALF(dtype, T, {
    DTOP_DISPATCH_HEAD_DIM(head_dim, kD,
                           launch_bwd<T, kD>(p, batch, heads, max_seqlen_q, max_seqlen_k, s));
  });
}

}  // namespace dtop
