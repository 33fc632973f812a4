// Head-averaged pre-softmax logits (see ops.h), the CUDA twin of _logits_kernel in
// dtop_kernels/triton/attention.py: for image b with a uniform query layout (Kq queries per
// image, query row b * Kq + c),
//   L[c, j] = sum_h q[b * Kq + c, h] . k[j, h] * scale / H   for key rows j of image b,
// one GEMM with a reduction over all heads, fp32 accumulation, rounded once to the inputs'
// dtype. Grid (cdiv(Kq, 64), cdiv(max_seqlen_k, 64), B); 4 warps of 16 query rows; the Q and K
// tiles of head h + 1 are copied (cp.async) while head h is multiplied. Columns of padding keys
// are never written.
#include "attention.cuh"
#include "ops.h"

namespace dtop {
namespace {

using namespace attn;

constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * kWarpThreads;

struct LogitsParams {
  const void* q;
  const void* k;
  void* logits;  // [Kq, logits_stride]
  const int32_t* cu_k;
  int64_t cap_k, num_q, heads, logits_stride;
  Strides sq, sk;
  float logit_scale;  // scale / H
};

template <int kD>
constexpr size_t logits_smem_bytes() {
  return sizeof(__half) * 2 * (kBlockM + kBlockN) * TileShape<kD>::kPitch;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, min_blocks_128<kD>())
    attention_logits_kernel(const LogitsParams p) {
  constexpr int kPitch = TileShape<kD>::kPitch, kNTiles = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);     // [2][kBlockM][kPitch]
  T* s_k = s_q + 2 * kBlockM * kPitch;     // [2][kBlockN][kPitch]

  const int64_t b = blockIdx.z;
  const Segment ks = image_segment(p.cu_k, b, p.cap_k);
  const int64_t n0 = int64_t(blockIdx.y) * kBlockN;
  if (n0 >= ks.len) return;
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  const int warp = threadIdx.x / kWarpThreads, lane = threadIdx.x % kWarpThreads;
  const int q_rows = static_cast<int>(p.num_q - m0 < kBlockM ? p.num_q - m0 : kBlockM);
  const int k_rows = static_cast<int>(ks.len - n0 < kBlockN ? ks.len - n0 : kBlockN);
  const T* q = static_cast<const T*>(p.q) + (b * p.num_q + m0) * p.sq.token;
  const T* k = static_cast<const T*>(p.k) + (ks.start + n0) * p.sk.token;
  const auto load_head = [&](int64_t h, int buf) {
    load_tile<kBlockM, kD, kThreads>(s_q + buf * kBlockM * kPitch, q + h * p.sq.head,
                                     p.sq.token, q_rows);
    load_tile<kBlockN, kD, kThreads>(s_k + buf * kBlockN * kPitch, k + h * p.sk.head,
                                     p.sk.token, k_rows);
  };

  load_head(0, 0);
  cp_async_commit();
  float acc[kNTiles][4] = {};
  for (int64_t h = 0; h < p.heads; ++h) {
    const int buf = static_cast<int>(h & 1);
    if (h + 1 < p.heads) {
      load_head(h + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    gemm_a_smem_b_nk<T, kD, kD / 16, kNTiles>(acc, s_q + buf * kBlockM * kPitch, warp * 16,
                                               s_k + buf * kBlockN * kPitch, lane);
    __syncthreads();  // the next iteration overwrites this buffer
  }

  // Scalar stores: a row of L starts at an arbitrary key offset, so pairs may be misaligned.
  T* out = static_cast<T*>(p.logits) + ks.start + n0;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = warp * 16 + lane / 4 + 8 * (e / 2);
      const int col = nt * 8 + 2 * (lane % 4) + e % 2;
      if (row < q_rows && col < k_rows) {
        out[(m0 + row) * p.logits_stride + col] = from_float<T>(acc[nt][e] * p.logit_scale);
      }
    }
  }
}

template <typename T, int kD>
void launch_logits(const LogitsParams& p, int64_t batch, int64_t max_seqlen_k,
                   cudaStream_t stream) {
  const auto kernel = attention_logits_kernel<T, kD>;
  constexpr size_t smem = logits_smem_bytes<kD>();
  static_assert(smem <= kMaxSmemBytes, "shared memory above the sm_86 / sm_89 limit");
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.num_q, kBlockM)),
                  static_cast<unsigned>(ceil_div(max_seqlen_k, kBlockN)),
                  static_cast<unsigned>(batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  DTOP_CHECK_LAUNCH();
}

}  // namespace

void attention_head_mean_logits(const void* q, const void* k, void* logits,
                                const int32_t* cu_seqlens_k, int64_t batch, int64_t heads,
                                int64_t head_dim, int64_t num_q, int64_t capacity_k,
                                int64_t max_seqlen_k, int64_t q_stride_t, int64_t q_stride_h,
                                int64_t k_stride_t, int64_t k_stride_h, int64_t logits_stride,
                                double scale, int dtype, void* stream) {
  const char* op = "attention_head_mean_logits";
  check_half_dtype(op, dtype);
  check_head_dim(op, head_dim);
  check_batch_heads(op, batch, heads);
  require(num_q >= 0 && capacity_k >= 0 && max_seqlen_k >= 0, op,
          "num_q, capacity_k and max_seqlen_k must be >= 0");
  if (max_seqlen_k > capacity_k) max_seqlen_k = capacity_k;  // a larger bound is valid
  require(max_seqlen_k / kBlockN < 65535, op, "max_seqlen_k is too large for the grid");
  require(logits_stride >= capacity_k, op, "logits row stride must be >= capacity_k");
  if (batch == 0 || num_q == 0 || capacity_k == 0 || max_seqlen_k == 0) return;
  const Strides sq{q_stride_t, q_stride_h}, sk{k_stride_t, k_stride_h};
  check_rows(op, "q", q, sq);
  check_rows(op, "k", k, sk);
  require(logits != nullptr && cu_seqlens_k != nullptr, op,
          "logits and cu_seqlens_k must be non-null");
  const LogitsParams p{q, k, logits, cu_seqlens_k, capacity_k, num_q, heads, logits_stride,
                       sq, sk, static_cast<float>(scale / static_cast<double>(heads))};
  const auto s = static_cast<cudaStream_t>(stream);
  DTOP_DISPATCH_HALF(dtype, T, {
    DTOP_DISPATCH_HEAD_DIM(head_dim, kD, launch_logits<T, kD>(p, batch, max_seqlen_k, s));
  });
}

}  // namespace dtop
