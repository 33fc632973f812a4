// Packed linear layer on tensor cores (see ops.h): y = epilogue(A @ B) over the rows of a
// ragged token batch, the CUDA twin of _linear_kernel in dtop_kernels/triton/linear.py.
//
// One kernel serves the forward (B = W [N, K], read as [n][k]) and the input gradient of the
// backward (dx = dz @ W, B read as [k][n]). The block tile is a compile-time configuration
// (TileConfig), two of which are instantiated and picked at launch by the GEMM's output width N
// (for dx: the layer's in_features), the rule of _config in dtop_kernels/triton/linear.py:
//   N > 1024:  128 x 128 x 32, 8 warps as 2 (m) x 4 (n), 3 cp.async stages, 60 KB shared;
//   N <= 1024: 128 x 64 x 64,  4 warps as 2 (m) x 2 (n), 3 cp.async stages, 81 KB shared.
// Both use warp tiles of 64 x 32 = 4 x 4 mma.m16n8k16 per 16-deep step. Half-width tiles for
// N <= 1024: at N = 768 (attention proj, MLP fc2) and M ~ 6000 rows, 128 x 128 tiles make
// 47 x 6 = 282 tiles, one more than two per SM on 132 SMs, so the busiest SMs run 3 tile-times
// against 2.14 for perfectly spread work; 128 x 64 tiles (564) bound that at 2.5. Not yet
// confirmed by timing on a GPU. The shared-memory tiles and fragment loads are the attention
// kernels' (attention.cuh): rows padded by 16 bytes, so every ldmatrix phase hits distinct banks
// without a swizzle.
//
// Ragged rows: T = cu_seqlens[B] is read on the device. Row tiles past T skip the main loop (the
// pruned rows cost no FLOPs and the host never learns T). The token gather is fused into the A
// load (row i of A is a[a_index[i]]: each thread resolves its rows once, then streams their
// k-chunks), and the epilogue adds the bias, stores the pre-activation, applies the exact GELU,
// adds the residual and writes row i either packed or scattered to y[y_index[i]].
//
// Epilogue: each warp parks 32 x 32 fp32 of its accumulators in shared memory (two rounds),
// then reads them back 4 columns per lane, 8 lanes per row, so every global access (bias,
// residual, pre-activation, output) is an 8-byte vector and a warp touches whole 32-byte sectors.
#include "attention.cuh"
#include "ops.h"

namespace dtop {
namespace {

using attn::cp_async_16;
using attn::cp_async_commit;
using attn::cp_async_wait;
using attn::kWarpThreads;
using attn::smem_addr;

constexpr int kGroupM = 8;  // row tiles per group of the tile order (L2 reuse of B)

// A block tile shape: BM x BN output tile, BK-deep k steps, `Stages` cp.async stages, warps
// laid out WarpsM (m) x WarpsN (n). Every divisibility the load loops and the epilogue assume is
// asserted here, so a new shape that breaks one fails to compile.
template <int BM, int BN, int BK, int Stages, int WarpsM, int WarpsN>
struct TileConfig {
  static constexpr int kBM = BM, kBN = BN, kBK = BK, kStages = Stages;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN;
  static constexpr int kThreads = kWarpsM * kWarpsN * kWarpThreads;
  static constexpr int kWarpM = kBM / kWarpsM, kWarpN = kBN / kWarpsN;
  static constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;

  static constexpr int kPitchK = kBK + 8;  // [rows][k] tiles (A, and B read as [n][k])
  static constexpr int kPitchN = kBN + 8;  // B read as [k][n]
  static constexpr int kATile = kBM * kPitchK;
  static constexpr int kBTile = kBN * kPitchK > kBK * kPitchN ? kBN * kPitchK : kBK * kPitchN;
  static constexpr int kStageElems = kATile + kBTile;

  // Epilogue staging: per warp 32 rows x (32 + 8) floats (pitch = 8 banks mod 32: the float2
  // writes of one half-warp land on distinct banks).
  static constexpr int kStagePitch = kWarpN + 8;
  static constexpr int kStageRows = 32;

  static constexpr size_t kSmemBytes = sizeof(__half) * kStages * kStageElems;
  static constexpr int kALoads = kBM * (kBK / 8) / kThreads;  // 16-byte A chunks per thread

  static_assert(kStages >= 2, "the pipeline needs at least two stages");
  static_assert(kBM % (kWarpsM * 16) == 0 && kBN % (kWarpsN * 8) == 0 && kBK % 16 == 0,
                "warp tiles must be whole mma.m16n8k16 tiles");
  static_assert(kNTiles % 2 == 0, "B fragments are loaded for two 8-column tiles at a time");
  static_assert(kWarpN == 32, "the epilogue reads back 32 columns per warp (8 lanes x 4)");
  static_assert(kWarpM % kStageRows == 0 && kStageRows == 32 && kMTiles % 2 == 0,
                "the epilogue parks two 16-row m tiles (32 rows) per round");
  static_assert(kThreads % (kBK / 8) == 0, "A rows must split evenly over the threads");
  static_assert(kBM * (kBK / 8) % kThreads == 0 && kBN * (kBK / 8) % kThreads == 0 &&
                    kBK * (kBN / 8) % kThreads == 0,
                "tile loads must split evenly over the threads");
  static_assert(sizeof(float) * kWarpsM * kWarpsN * kStageRows * kStagePitch <= kSmemBytes,
                "epilogue staging must fit in the pipeline's shared memory");
  static_assert(kSmemBytes <= attn::kMaxSmemBytes,
                "shared memory above the sm_86 / sm_89 limit");
};

// Wide outputs (N > 1024): 60 KB shared, two blocks of 8 warps per SM.
using WideTiles = TileConfig<128, 128, 32, 3, 2, 4>;
// Narrow outputs (N <= 1024; ViT-B's 768): twice the tiles, so the last wave is fuller. 81 KB
// shared (k steps of 64 halve the barriers per FLOP), two blocks of 4 warps per SM on
// H100 / H200 (227 KB) and A100 (164 KB: 2 x (81 + 1 reserved) KB fits exactly).
using NarrowTiles = TileConfig<128, 64, 64, 3, 2, 2>;
constexpr int64_t kNarrowMaxN = 1024;  // largest N launched with NarrowTiles
static_assert(WideTiles::kSmemBytes == 61440 && NarrowTiles::kSmemBytes == 82944,
              "the header comment's shared-memory figures");

struct LinearParams {
  const void* a;            // [rows, K] (rows of a_index, or cap)
  const int32_t* a_index;   // nullable: A row i is a[a_index[i]]
  const void* b;            // [N, K] (kBKN = false) or [K, N] (kBKN = true)
  const void* bias;         // nullable, [N]
  const void* residual;     // nullable, [cap, N]
  void* pre;                // nullable, [cap, N]: the pre-activation
  void* y;                  // [cap, N], or dense rows through y_index
  const int32_t* y_index;   // nullable: row i goes to y[y_index[i]]
  const int32_t* cu_seqlens;
  int64_t batch, cap, n, k;
  int64_t a_stride, b_stride, res_stride, pre_stride, y_stride;
  int act;
  int64_t dense_rows;  // rows a_index / y_index may address; others are never dereferenced
};

// Row `i` of an index, or -1 when the entry lies outside [0, rows) (a broken contract with the
// checks off): such rows read as zeros and are written nowhere.
__device__ __forceinline__ int64_t checked_row(const int32_t* index, int64_t i, int64_t rows) {
  const int64_t r = index[i];
  return r >= 0 && r < rows ? r : -1;
}

__device__ __forceinline__ float gelu(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

template <typename T>
__device__ __forceinline__ void load4(float (&v)[4], const T* src) {
  const Pack<T, 4> pk = *reinterpret_cast<const Pack<T, 4>*>(src);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = to_float(pk.v[i]);
}

template <typename T>
__device__ __forceinline__ void store4(T* dst, const float (&v)[4]) {
  Pack<T, 4> pk;
#pragma unroll
  for (int i = 0; i < 4; ++i) pk.v[i] = from_float<T>(v[i]);
  *reinterpret_cast<Pack<T, 4>*>(dst) = pk;
}

// Zeros rows [m0, m_end) x columns [n0, n_end) of a [rows][stride] buffer, 8 columns a store.
template <int kThreads, typename T>
__device__ void zero_rows(T* buf, int64_t stride, int64_t m0, int64_t m_end, int64_t n0,
                          int64_t n_end) {
  const int64_t cols = (n_end - n0) / 8, count = (m_end - m0) * cols;
  for (int64_t c = threadIdx.x; c < count; c += kThreads) {
    *reinterpret_cast<uint4*>(buf + (m0 + c / cols) * stride + n0 + (c % cols) * 8) =
        make_uint4(0, 0, 0, 0);
  }
}

template <typename T, bool kBKN, typename C>
__global__ void __launch_bounds__(C::kThreads, 2) linear_kernel(const LinearParams p) {
  constexpr int kBM = C::kBM, kBN = C::kBN, kBK = C::kBK, kStages = C::kStages;
  constexpr int kWarpsN = C::kWarpsN, kThreads = C::kThreads;
  constexpr int kWarpM = C::kWarpM, kWarpN = C::kWarpN, kMTiles = C::kMTiles;
  constexpr int kNTiles = C::kNTiles, kPitchK = C::kPitchK, kPitchN = C::kPitchN;
  constexpr int kATile = C::kATile, kStageElems = C::kStageElems, kALoads = C::kALoads;
  constexpr int kStagePitch = C::kStagePitch, kStageRows = C::kStageRows;
  extern __shared__ __align__(16) unsigned char smem[];
  T* tiles = reinterpret_cast<T*>(smem);

  // Grouped tile order: consecutive blocks share B's columns while walking kGroupM row tiles.
  const int64_t num_m = ceil_div_dev(p.cap, kBM), num_n = ceil_div_dev(p.n, kBN);
  const int64_t pid = blockIdx.x, per_group = kGroupM * num_n;
  const int64_t first_m = pid / per_group * kGroupM;
  const int64_t group_m = num_m - first_m < kGroupM ? num_m - first_m : kGroupM;
  const int64_t m0 = (first_m + (pid % per_group) % group_m) * kBM;
  const int64_t n0 = (pid % per_group) / group_m * kBN;
  const int64_t n_end = p.n - n0 < kBN ? p.n : n0 + kBN;
  const int64_t total = valid_rows(p.cu_seqlens, p.batch, p.cap);
  T* y = static_cast<T*>(p.y);
  T* pre = static_cast<T*>(p.pre);

  if (m0 >= total) {  // padding rows only: no product; packed outputs are zero
    const int64_t m_end = p.cap - m0 < kBM ? p.cap : m0 + kBM;
    if (p.y_index == nullptr) zero_rows<kThreads>(y, p.y_stride, m0, m_end, n0, n_end);
    if (pre != nullptr) zero_rows<kThreads>(pre, p.pre_stride, m0, m_end, n0, n_end);
    return;
  }

  const int tid = threadIdx.x, warp = tid / kWarpThreads, lane = tid % kWarpThreads;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;

  // This thread's A rows (the gather resolved once) and their 16-byte column chunk.
  const T* a_src[kALoads];
  bool a_ok[kALoads];
  const int a_chunk = tid % (kBK / 8);
#pragma unroll
  for (int i = 0; i < kALoads; ++i) {
    const int64_t row = m0 + tid / (kBK / 8) + i * (kThreads / (kBK / 8));
    int64_t src_row = row < total ? row : -1;
    if (src_row >= 0 && p.a_index != nullptr) src_row = checked_row(p.a_index, row, p.dense_rows);
    // With K = 0 nothing is read and `a` may be null: no offset is applied to it then.
    a_ok[i] = src_row >= 0 && p.k > 0;
    a_src[i] = static_cast<const T*>(p.a) + (a_ok[i] ? src_row * p.a_stride + a_chunk * 8 : 0);
  }
  const T* b = static_cast<const T*>(p.b);

  auto load_stage = [&](int stage, int64_t k0) {
    T* s_a = tiles + stage * kStageElems;
    T* s_b = s_a + kATile;
    const bool k_ok = k0 + a_chunk * 8 < p.k;
#pragma unroll
    for (int i = 0; i < kALoads; ++i) {
      const int r = tid / (kBK / 8) + i * (kThreads / (kBK / 8));
      const bool ok = a_ok[i] && k_ok;
      cp_async_16(smem_addr(s_a + r * kPitchK + a_chunk * 8), ok ? a_src[i] + k0 : a_src[i], ok);
    }
    if constexpr (!kBKN) {  // B = W [N, K]: tile rows n, 16-byte chunks along k
#pragma unroll
      for (int i = 0; i < kBN * (kBK / 8) / kThreads; ++i) {
        const int c = tid + i * kThreads, r = c / (kBK / 8), ch = c % (kBK / 8);
        const bool ok = n0 + r < p.n && k0 + ch * 8 < p.k;
        const T* src = b + (ok ? (n0 + r) * p.b_stride + k0 + ch * 8 : 0);
        cp_async_16(smem_addr(s_b + r * kPitchK + ch * 8), src, ok);
      }
    } else {  // B = W [K, N] row-major: tile rows k, 16-byte chunks along n
#pragma unroll
      for (int i = 0; i < kBK * (kBN / 8) / kThreads; ++i) {
        const int c = tid + i * kThreads, r = c / (kBN / 8), ch = c % (kBN / 8);
        const bool ok = k0 + r < p.k && n0 + ch * 8 < p.n;
        const T* src = b + (ok ? (k0 + r) * p.b_stride + n0 + ch * 8 : 0);
        cp_async_16(smem_addr(s_b + r * kPitchN + ch * 8), src, ok);
      }
    }
  };

  float acc[kMTiles][kNTiles][4] = {};
  const int64_t k_tiles = ceil_div_dev(p.k, kBK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * kBK);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed for all threads; slot of kt - 1 is free
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next * kBK);
    cp_async_commit();

    const T* s_a = tiles + (kt % kStages) * kStageElems;
    const T* s_b = s_a + kATile;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        attn::load_a<kBK>(a[mi], s_a, warp_m * kWarpM + mi * 16, kk * 16, lane);
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bf[4];
        if constexpr (!kBKN) {
          attn::load_b_nk<kBK>(bf, s_b, warp_n * kWarpN + np * 16, kk * 16, lane);
        } else {
          attn::load_b_kn<kBN>(bf, s_b, kk * 16, warp_n * kWarpN + np * 16, lane);
        }
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          attn::mma<T>(acc[mi][2 * np], a[mi], bf[0], bf[1]);
          attn::mma<T>(acc[mi][2 * np + 1], a[mi], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the epilogue's staging area

  float* stage = reinterpret_cast<float*>(smem) + warp * kStageRows * kStagePitch;
  const int g = lane / 4, t = lane % 4;
  const int rr = lane / 8, cq = (lane % 8) * 4;  // read-back: 4 rows per pass, 4 columns a lane
  const int64_t col = n0 + warp_n * kWarpN + cq;
  const bool col_ok = col < p.n;  // N % 8 == 0: a lane's 4 columns are all in or all out
  float bias[4] = {0.f, 0.f, 0.f, 0.f};
  if (p.bias != nullptr && col_ok) load4(bias, static_cast<const T*>(p.bias) + col);
  const T* res = static_cast<const T*>(p.residual);

#pragma unroll
  for (int half = 0; half < kMTiles / 2; ++half) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
        float* dst = stage + (mi * 16 + g) * kStagePitch + ni * 8 + 2 * t;
        const float* c = acc[2 * half + mi][ni];
        *reinterpret_cast<float2*>(dst) = make_float2(c[0], c[1]);
        *reinterpret_cast<float2*>(dst + 8 * kStagePitch) = make_float2(c[2], c[3]);
      }
    }
    __syncwarp();
#pragma unroll
    for (int pass = 0; pass < kStageRows / 4; ++pass) {
      const int lr = pass * 4 + rr;
      const int64_t row = m0 + warp_m * kWarpM + half * kStageRows + lr;
      if (!col_ok || row >= p.cap) continue;
      if (row >= total) {  // padding row inside a tile with tokens
        const float zero[4] = {0.f, 0.f, 0.f, 0.f};
        if (p.y_index == nullptr) store4(y + row * p.y_stride + col, zero);
        if (pre != nullptr) store4(pre + row * p.pre_stride + col, zero);
        continue;
      }
      const float4 s = *reinterpret_cast<const float4*>(stage + lr * kStagePitch + cq);
      float v[4] = {s.x + bias[0], s.y + bias[1], s.z + bias[2], s.w + bias[3]};
      if (pre != nullptr) store4(pre + row * p.pre_stride + col, v);
      if (p.act == 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = gelu(v[i]);
      }
      if (res != nullptr) {
        float r[4];
        load4(r, res + row * p.res_stride + col);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] += r[i];
      }
      const int64_t dst_row =
          p.y_index != nullptr ? checked_row(p.y_index, row, p.dense_rows) : row;
      if (dst_row >= 0) store4(y + dst_row * p.y_stride + col, v);
    }
    __syncwarp();  // the next round overwrites the staging rows
  }
}

// ---------------------------------------------------------------------------- host side
void check_operand(const char* op, const char* name, const void* ptr, int64_t stride,
                   bool required) {
  if (ptr == nullptr) {
    require(!required, op, std::string(name) + " is a null pointer");
    return;
  }
  require(aligned_to(ptr, 16) && stride % 8 == 0, op,
          std::string(name) +
              " must be 16-byte aligned with a row stride that is a multiple of 8 elements (got " +
              std::to_string(stride) + "); pass a contiguous copy");
}

template <typename T, bool kBKN, typename C>
void launch(const char* op, const LinearParams& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.cap, C::kBM) * ceil_div(p.n, C::kBN);
  require(blocks <= 0x7fffffff, op, "too many tiles");
  auto kernel = linear_kernel<T, kBKN, C>;
  attn::allow_smem(kernel, C::kSmemBytes);
  kernel<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmemBytes, stream>>>(p);
  DTOP_CHECK_LAUNCH();
}

// The tile shape by the GEMM's output width (for dx: the layer's in_features).
template <typename T, bool kBKN>
void launch_by_width(const char* op, const LinearParams& p, cudaStream_t stream) {
  if (p.n <= kNarrowMaxN) {
    launch<T, kBKN, NarrowTiles>(op, p, stream);
  } else {
    launch<T, kBKN, WideTiles>(op, p, stream);
  }
}

void run(const char* op, LinearParams p, bool b_kn, int dtype, void* stream) {
  const DType dt = dtype_from_code(dtype);
  require(dt != DType::kFloat32, op,
          "float32 is not supported by the CUDA linear kernel (tensor cores take float16 / "
          "bfloat16); use backend='triton' or backend='torch'");
  require(p.batch >= 0 && p.cap >= 0 && p.n >= 0 && p.k >= 0, op, "negative size");
  require(p.n % 8 == 0 && p.k % 8 == 0, op,
          "the output and reduction sizes must be multiples of 8 (16-byte rows); got N = " +
              std::to_string(p.n) + ", K = " + std::to_string(p.k));
  require(p.act == 0 || p.act == 1, op, "act must be 0 (none) or 1 (exact GELU)");
  require(p.cu_seqlens != nullptr, op, "cu_seqlens is a null pointer");
  if (p.k > 0) {  // with K = 0 nothing is read (y = bias + residual); empty tensors may be null
    check_operand(op, "a", p.a, p.a_stride, true);
    check_operand(op, "b", p.b, p.b_stride, true);
  }
  check_operand(op, "y", p.y, p.y_stride, true);
  check_operand(op, "residual", p.residual, p.res_stride, false);
  check_operand(op, "pre", p.pre, p.pre_stride, false);
  require(p.bias == nullptr || aligned_to(p.bias, 8), op, "bias must be 8-byte aligned");
  if (p.cap == 0 || p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  DTOP_DISPATCH_HALF(dtype, T,
                     b_kn ? launch_by_width<T, true>(op, p, s)
                          : launch_by_width<T, false>(op, p, s));
}

}  // namespace

void linear_fwd(const void* x, const int32_t* x_index, const void* weight, const void* bias,
                const void* residual, void* pre, void* y, const int32_t* y_index,
                const int32_t* cu_seqlens, int64_t batch, int64_t capacity, int64_t out_features,
                int64_t in_features, int64_t x_stride, int64_t weight_stride,
                int64_t residual_stride, int64_t pre_stride, int64_t y_stride, int64_t dense_rows,
                int act, int dtype, void* stream) {
  require(dense_rows >= 0, "linear_fwd", "dense_rows must be >= 0");
  LinearParams p{x, x_index, weight, bias, residual, pre, y, y_index, cu_seqlens,
                 batch, capacity, out_features, in_features, x_stride, weight_stride,
                 residual_stride, pre_stride, y_stride, act, dense_rows};
  run("linear_fwd", p, /*b_kn=*/false, dtype, stream);
}

void linear_bwd_input(const void* dz, const void* weight, void* dx, const int32_t* cu_seqlens,
                      int64_t batch, int64_t capacity, int64_t out_features,
                      int64_t in_features, int64_t dz_stride, int64_t weight_stride,
                      int64_t dx_stride, int dtype, void* stream) {
  // dx [cap, in] = dz [cap, out] @ W [out, in]: a GEMM of N = in, K = out with B read [k][n].
  LinearParams p{dz, nullptr, weight, nullptr, nullptr, nullptr, dx, nullptr, cu_seqlens,
                 batch, capacity, in_features, out_features, dz_stride, weight_stride,
                 0, 0, dx_stride, 0, 0};
  run("linear_bwd_input", p, /*b_kn=*/true, dtype, stream);
}

}  // namespace dtop
