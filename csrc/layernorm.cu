// LayerNorm over packed token rows (see ops.h), the CUDA twin of dtop_kernels/triton/layernorm.py.
//
// Forward: one warp per row. Row i of the packed output reads row indices[i] of the dense input
// (GATHER) or row i of a packed input; rows i >= T = cu_seqlens[B] are padding and are written
// as zeros (mean = rstd = 0). Statistics are fp32: mean = sum(x) / C,
// rstd = 1 / sqrt(sum((x - mean)^2) / C + eps), y = (x - mean) * rstd * w + b.
//
// Backward: dx per row (packed, never scattered here) and deterministic dweight / dbias: every
// block sums its rows into one fp32 partial row (fixed order, no atomics) and a second small
// kernel reduces the partial rows in a fixed order into dweight / dbias.
//
// Two row paths, picked on the host per call:
//   cached: the row lives in registers (kPacks packs of kVec elements per lane; C <= 1024),
//           read once; 16-byte loads and stores.
//   looped: any C; the row is re-read from global memory (L1/L2) for each pass. 16-byte
//           accesses when the row and pointers allow it, scalar ones otherwise.
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "common.h"
#include "ops.h"

namespace dtop {
namespace {

constexpr int kWarp = 32;
constexpr int kFwdWarps = 4;         // rows in flight per forward block (one per warp)
constexpr int kBwdWarps = 4;         // warps per backward block on the cached path
constexpr int kMaxCachedElems = 32;  // elements per lane on the cached path (C <= 1024)
constexpr int64_t kMaxBlocks = 65536;
// __launch_bounds__ minimum blocks per SM: caps the registers at 64 (forward) and 128 (cached
// backward, whose dweight / dbias accumulators take 2 * 32 per lane); neither spills.
constexpr int kFwdMinBlocks = 8, kBwdMinBlocks = 4;

struct FwdParams {
  const void* x;
  const int32_t* indices;
  const int32_t* cu_seqlens;
  const void* weight;
  const void* bias;
  void* y;
  void* x_out;  // nullable: the raw (gathered) rows
  float* mean;
  float* rstd;
  int64_t batch, capacity, cols;
  int64_t x_stride, y_stride, x_out_stride;  // row strides, in elements
  int64_t x_rows;  // rows of x: a gathered index outside [0, x_rows) is never dereferenced
  float eps;
  bool gather;
};

struct BwdParams {
  const void* dy;
  const void* x;
  const int32_t* indices;
  const int32_t* cu_seqlens;
  const void* weight;
  const float* mean;
  const float* rstd;
  const void* dx_add;  // nullable: added to dx (the gradient of the stored raw rows)
  void* dx;
  float* partials;  // [2, num_blocks, cols]: dweight partial rows, then dbias partial rows
  int64_t batch, capacity, cols;
  int64_t dy_stride, x_stride, dx_stride, dx_add_stride;
  int64_t x_rows;
  bool gather;
};

// kVec elements of a row, converted to float. kVec * sizeof(T) may exceed 16 (an fp32 weight
// read alongside fp16 rows): then it is read in 16-byte pieces.
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[kVec]) {
  constexpr int kPiece = kVec * sizeof(T) > 16 ? 16 / static_cast<int>(sizeof(T)) : kVec;
#pragma unroll
  for (int i = 0; i < kVec; i += kPiece) {
    const Pack<T, kPiece> pk = *reinterpret_cast<const Pack<T, kPiece>*>(p + i);
#pragma unroll
    for (int k = 0; k < kPiece; ++k) v[i + k] = to_float(pk.v[k]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[kVec]) {
  Pack<T, kVec> pk;
#pragma unroll
  for (int k = 0; k < kVec; ++k) pk.v[k] = from_float<T>(v[k]);
  *reinterpret_cast<Pack<T, kVec>*>(p) = pk;
}

template <typename T, int kVec>
__device__ __forceinline__ void zero_row(T* row, int64_t packs, int lane) {
  for (int64_t j = lane; j < packs; j += kWarp) {
    reinterpret_cast<Pack<T, kVec>*>(row)[j] = Pack<T, kVec>{};
  }
}

// dst = src (+ add, in float), kVec elements at a time; add may be null.
template <typename T, int kVec>
__device__ __forceinline__ void copy_or_add_row(T* dst, const T* add, int64_t packs, int lane) {
  if (add == nullptr) {
    zero_row<T, kVec>(dst, packs, lane);
    return;
  }
  for (int64_t j = lane; j < packs; j += kWarp) {
    reinterpret_cast<Pack<T, kVec>*>(dst)[j] = reinterpret_cast<const Pack<T, kVec>*>(add)[j];
  }
}

// ---------------------------------------------------------------------------- forward
// One warp normalizes one row; kPacks == 0 selects the looped path.
template <typename T, typename W, int kVec, int kPacks>
__device__ __forceinline__ void fwd_row(const FwdParams& p, const T* x, T* y, T* xo, float& mean,
                                        float& rstd, int lane) {
  const int64_t packs = p.cols / kVec;
  const float cols = static_cast<float>(p.cols);
  const W* wp = static_cast<const W*>(p.weight);
  const W* bp = static_cast<const W*>(p.bias);
  if constexpr (kPacks > 0) {
    float v[kPacks][kVec];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t j = lane + i * kWarp;
      if (j < packs) {
        const Pack<T, kVec> raw = reinterpret_cast<const Pack<T, kVec>*>(x)[j];
        if (xo != nullptr) reinterpret_cast<Pack<T, kVec>*>(xo)[j] = raw;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          v[i][k] = to_float(raw.v[k]);
          sum += v[i][k];
        }
      }
    }
    mean = warp_sum(sum) / cols;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      if (lane + i * kWarp < packs) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          v[i][k] -= mean;
          sq += v[i][k] * v[i][k];
        }
      }
    }
    rstd = 1.f / sqrtf(warp_sum(sq) / cols + p.eps);
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t j = lane + i * kWarp;
      if (j < packs) {
        float w[kVec], b[kVec], out[kVec];
        load_vec<W, kVec>(wp + j * kVec, w);
        load_vec<W, kVec>(bp + j * kVec, b);
#pragma unroll
        for (int k = 0; k < kVec; ++k) out[k] = v[i][k] * rstd * w[k] + b[k];
        store_vec<T, kVec>(y + j * kVec, out);
      }
    }
  } else {
    float sum = 0.f;
    for (int64_t j = lane; j < packs; j += kWarp) {
      const Pack<T, kVec> raw = reinterpret_cast<const Pack<T, kVec>*>(x)[j];
      if (xo != nullptr) reinterpret_cast<Pack<T, kVec>*>(xo)[j] = raw;
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum += to_float(raw.v[k]);
    }
    mean = warp_sum(sum) / cols;
    float sq = 0.f;
    for (int64_t j = lane; j < packs; j += kWarp) {
      float v[kVec];
      load_vec<T, kVec>(x + j * kVec, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sq += (v[k] - mean) * (v[k] - mean);
    }
    rstd = 1.f / sqrtf(warp_sum(sq) / cols + p.eps);
    for (int64_t j = lane; j < packs; j += kWarp) {
      float v[kVec], w[kVec], b[kVec];
      load_vec<T, kVec>(x + j * kVec, v);
      load_vec<W, kVec>(wp + j * kVec, w);
      load_vec<W, kVec>(bp + j * kVec, b);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = (v[k] - mean) * rstd * w[k] + b[k];
      store_vec<T, kVec>(y + j * kVec, v);
    }
  }
}

template <typename T, typename W, int kVec, int kPacks>
__global__ void __launch_bounds__(kFwdWarps* kWarp, kFwdMinBlocks)
    layernorm_fwd_kernel(const FwdParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t total = valid_rows(p.cu_seqlens, p.batch, p.capacity);
  const int64_t packs = p.cols / kVec;
  for (int64_t row = int64_t(blockIdx.x) * kFwdWarps + threadIdx.x / kWarp; row < p.capacity;
       row += int64_t(gridDim.x) * kFwdWarps) {
    T* y = static_cast<T*>(p.y) + row * p.y_stride;
    T* xo = p.x_out == nullptr ? nullptr : static_cast<T*>(p.x_out) + row * p.x_out_stride;
    float mean = 0.f, rstd = 0.f;
    // a gathered index outside x (checks off, broken contract) is treated as a padding row
    const int64_t src = row < total && p.gather ? int64_t(p.indices[row]) : row;
    if (row < total && src >= 0 && src < p.x_rows) {
      const T* x = static_cast<const T*>(p.x) + src * p.x_stride;
      fwd_row<T, W, kVec, kPacks>(p, x, y, xo, mean, rstd, lane);
    } else {  // padding row
      zero_row<T, kVec>(y, packs, lane);
      if (xo != nullptr) zero_row<T, kVec>(xo, packs, lane);
    }
    if (lane == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// ---------------------------------------------------------------------------- backward
// xhat = (x - mean) * rstd, g = dy * w, c1 = mean(xhat * g), c2 = mean(g),
// dx = (g - (xhat * c1 + c2)) * rstd (+ dx_add); dweight += dy * xhat, dbias += dy.
//
// One warp per row. The row is read twice (the second read hits L1) so that the registers hold
// the dweight / dbias accumulators rather than the row. acc(i, j, k, dy, xhat) receives the
// contribution of element k of pack j = lane + 32 * i; kPacks == 0: any width (i not unrolled).
template <typename T, typename W, int kVec, int kPacks, typename Acc>
__device__ __forceinline__ void bwd_row(const BwdParams& p, int64_t row, int64_t total, int lane,
                                        Acc&& acc) {
  const int64_t packs = p.cols / kVec;
  const int64_t iters = kPacks > 0 ? kPacks : ceil_div_dev(packs, kWarp);
  T* dx = static_cast<T*>(p.dx) + row * p.dx_stride;
  const T* add =
      p.dx_add == nullptr ? nullptr : static_cast<const T*>(p.dx_add) + row * p.dx_add_stride;
  const int64_t src = row < total && p.gather ? int64_t(p.indices[row]) : row;
  if (row >= total || src < 0 || src >= p.x_rows) {  // padding row (or a broken index): dx_add
    copy_or_add_row<T, kVec>(dx, add, packs, lane);
    return;
  }
  const T* x = static_cast<const T*>(p.x) + src * p.x_stride;
  const T* dy = static_cast<const T*>(p.dy) + row * p.dy_stride;
  const W* wp = static_cast<const W*>(p.weight);
  const float mean = p.mean[row], rstd = p.rstd[row];
  const float cols = static_cast<float>(p.cols);
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int64_t i = 0; i < iters; ++i) {
    const int64_t j = lane + i * kWarp;
    if (j < packs) {
      float xv[kVec], dyv[kVec], w[kVec];
      load_vec<T, kVec>(x + j * kVec, xv);
      load_vec<T, kVec>(dy + j * kVec, dyv);
      load_vec<W, kVec>(wp + j * kVec, w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float g = dyv[k] * w[k];
        s1 += (xv[k] - mean) * rstd * g;
        s2 += g;
      }
    }
  }
  const float c1 = warp_sum(s1) / cols, c2 = warp_sum(s2) / cols;
#pragma unroll
  for (int64_t i = 0; i < iters; ++i) {
    const int64_t j = lane + i * kWarp;
    if (j < packs) {
      float xv[kVec], dyv[kVec], w[kVec], extra[kVec];
      load_vec<T, kVec>(x + j * kVec, xv);
      load_vec<T, kVec>(dy + j * kVec, dyv);
      load_vec<W, kVec>(wp + j * kVec, w);
      if (add != nullptr) load_vec<T, kVec>(add + j * kVec, extra);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float xhat = (xv[k] - mean) * rstd;
        xv[k] = (dyv[k] * w[k] - (xhat * c1 + c2)) * rstd;
        if (add != nullptr) xv[k] += extra[k];
        acc(i, j, k, dyv[k], xhat);
      }
      store_vec<T, kVec>(dx + j * kVec, xv);
    }
  }
}

// Cached path (C <= 1024): 4 warps per block, accumulators per lane in registers, summed over
// the block's warps in shared memory in warp order into the block's partial rows.
template <typename T, typename W, int kVec, int kPacks>
__global__ void __launch_bounds__(kBwdWarps* kWarp, kBwdMinBlocks)
    layernorm_bwd_cached_kernel(const BwdParams p) {
  __shared__ float block_sum[kBwdWarps][kWarp * kPacks * kVec];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t total = valid_rows(p.cu_seqlens, p.batch, p.capacity);
  float dw[kPacks][kVec] = {}, db[kPacks][kVec] = {};
  const auto acc = [&](int64_t i, int64_t, int k, float dy, float xhat) {
    dw[i][k] += dy * xhat;
    db[i][k] += dy;
  };
  for (int64_t row = int64_t(blockIdx.x) * kBwdWarps + warp; row < p.capacity;
       row += int64_t(gridDim.x) * kBwdWarps) {
    bwd_row<T, W, kVec, kPacks>(p, row, total, lane, acc);
  }
  // Element (i, k) of a lane is column (lane + 32 * i) * kVec + k.
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    float* out = p.partials + (int64_t(which) * gridDim.x + blockIdx.x) * p.cols;
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        block_sum[warp][(i * kWarp + lane) * kVec + k] = which == 0 ? dw[i][k] : db[i][k];
      }
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < p.cols; c += kBwdWarps * kWarp) {
      float s = block_sum[0][c];
#pragma unroll
      for (int w = 1; w < kBwdWarps; ++w) s += block_sum[w][c];
      out[c] = s;
    }
    __syncthreads();
  }
}

// Looped path (any C): one warp per block; the block's partial rows live in global memory and
// are updated row after row by the lane owning each column (no atomics).
template <typename T, typename W, int kVec>
__global__ void __launch_bounds__(kWarp) layernorm_bwd_looped_kernel(const BwdParams p) {
  const int lane = threadIdx.x;
  const int64_t total = valid_rows(p.cu_seqlens, p.batch, p.capacity);
  float* dw = p.partials + int64_t(blockIdx.x) * p.cols;
  float* db = p.partials + (int64_t(gridDim.x) + blockIdx.x) * p.cols;
  for (int64_t c = lane; c < p.cols; c += kWarp) dw[c] = db[c] = 0.f;
  __syncwarp();  // the lanes below own other columns than the ones they zeroed
  const auto acc = [&](int64_t, int64_t j, int k, float dy, float xhat) {
    dw[j * kVec + k] += dy * xhat;
    db[j * kVec + k] += dy;
  };
  for (int64_t row = blockIdx.x; row < p.capacity; row += gridDim.x) {
    bwd_row<T, W, kVec, 0>(p, row, total, lane, acc);
  }
}

// dweight[c] = sum_p partials[0, p, c], dbias[c] = sum_p partials[1, p, c], p in fixed order.
// Block (32 columns) x (8 partial-row groups); blockIdx.y picks dweight (0) or dbias (1).
constexpr int kReduceRows = 8;

template <typename W>
__global__ void __launch_bounds__(kWarp* kReduceRows)
    layernorm_reduce_kernel(const float* __restrict__ partials, W* __restrict__ dweight,
                            W* __restrict__ dbias, int64_t num_partials, int64_t cols) {
  __shared__ float sums[kReduceRows][kWarp + 1];
  const int tx = threadIdx.x % kWarp, ty = threadIdx.x / kWarp;
  const int64_t c = int64_t(blockIdx.x) * kWarp + tx;
  const float* src = partials + int64_t(blockIdx.y) * num_partials * cols;
  float s = 0.f;
  if (c < cols) {
    for (int64_t r = ty; r < num_partials; r += kReduceRows) s += src[r * cols + c];
  }
  sums[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < cols) {
    float t = sums[0][tx];
#pragma unroll
    for (int r = 1; r < kReduceRows; ++r) t += sums[r][tx];
    (blockIdx.y == 0 ? dweight : dbias)[c] = from_float<W>(t);
  }
}

// ---------------------------------------------------------------------------- host side
// Row path for one call: kVec = 16 / sizeof(T) when every row pointer and stride allows
// 16-byte accesses and C is a multiple of kVec, else scalar; cached when C fits in registers.
struct RowPath {
  bool vectorized;
  int packs_per_lane;  // 0: looped path
};

template <typename T>
RowPath row_path(int64_t cols, bool aligned) {
  constexpr int kVec = 16 / sizeof(T);
  if (!aligned || cols % kVec != 0) return RowPath{false, 0};
  const int64_t per_lane = ceil_div(cols / kVec, kWarp) * kVec;  // elements per lane
  for (int elems = 8; elems <= kMaxCachedElems; elems *= 2) {
    if (per_lane <= elems) return RowPath{true, elems / kVec};
  }
  return RowPath{true, 0};
}

bool rows_aligned(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides,
                  int64_t elem_size) {
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned_to(p, 16)) return false;
  }
  for (int64_t s : strides) {
    if ((s * elem_size) % 16 != 0) return false;
  }
  return true;
}

// Calls Launch<T, W, kVec, kPacks>::run(args...) for the call's row path and weight dtype
// (the rows' dtype or float32).
template <typename T, typename W, template <typename, typename, int, int> class Launch,
          typename... Args>
void dispatch_path(RowPath path, Args&&... args) {
  constexpr int kVec = 16 / sizeof(T);
  if (!path.vectorized) return Launch<T, W, 1, 0>::run(args...);
  switch (path.packs_per_lane * kVec) {
    case 8: return Launch<T, W, kVec, 8 / kVec>::run(args...);
    case 16: return Launch<T, W, kVec, 16 / kVec>::run(args...);
    case 32: return Launch<T, W, kVec, 32 / kVec>::run(args...);
    default: return Launch<T, W, kVec, 0>::run(args...);
  }
}

template <typename T, template <typename, typename, int, int> class Launch, typename... Args>
void dispatch_weight(DType wdt, RowPath path, Args&&... args) {
  if (wdt == DType::kFloat32) return dispatch_path<T, float, Launch>(path, args...);
  if constexpr (!std::is_same_v<T, float>) return dispatch_path<T, T, Launch>(path, args...);
}

template <typename T, typename W, int kVec, int kPacks>
struct FwdLaunch {
  static void run(const FwdParams& p, dim3 grid, cudaStream_t s) {
    layernorm_fwd_kernel<T, W, kVec, kPacks><<<grid, kFwdWarps * kWarp, 0, s>>>(p);
  }
};

template <typename T, typename W, int kVec, int kPacks>
struct BwdLaunch {
  static void run(const BwdParams& p, dim3 grid, cudaStream_t s) {
    if constexpr (kPacks > 0) {
      layernorm_bwd_cached_kernel<T, W, kVec, kPacks><<<grid, kBwdWarps * kWarp, 0, s>>>(p);
    } else {
      layernorm_bwd_looped_kernel<T, W, kVec><<<grid, kWarp, 0, s>>>(p);
    }
  }
};

void check_weight_dtype(const char* op, DType dt, DType wdt) {
  require(wdt == dt || wdt == DType::kFloat32, op,
          "weight and bias must have the rows' dtype or float32");
}

void check_sizes(const char* op, int64_t batch, int64_t capacity, int64_t cols) {
  require(batch >= 0, op, "batch must be >= 0, got " + std::to_string(batch));
  require(capacity >= 0, op, "capacity must be >= 0, got " + std::to_string(capacity));
  require(cols > 0, op, "num_cols must be > 0, got " + std::to_string(cols));
}

void check_stride(const char* op, const char* name, int64_t stride, int64_t cols) {
  require(stride >= cols, op,
          std::string(name) + " row stride " + std::to_string(stride) + " is < num_cols " +
              std::to_string(cols) + " (rows overlap)");
}

// Rows that are only read may overlap (stride 0: one row broadcast, as autograd passes the
// gradient of a sum).
void check_read_stride(const char* op, const char* name, int64_t stride) {
  require(stride >= 0, op, std::string(name) + " row stride " + std::to_string(stride) +
                               " is negative");
}

void check_ptr(const char* op, const char* name, const void* p) {
  require(p != nullptr, op, std::string(name) + " is a null pointer");
}

unsigned grid_rows(int64_t rows, int per_block) {
  const int64_t blocks = ceil_div(rows, per_block);
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

void layernorm_fwd(const void* x, const int32_t* indices, const int32_t* cu_seqlens,
                   const void* weight, const void* bias, void* y, void* x_out, float* mean,
                   float* rstd, int64_t batch, int64_t x_rows, int64_t capacity, int64_t num_cols,
                   int64_t x_stride, int64_t y_stride, int64_t x_out_stride, double eps,
                   bool gather, int dtype, int weight_dtype, void* stream) {
  const char* op = "layernorm_fwd";
  const DType dt = dtype_from_code(dtype), wdt = dtype_from_code(weight_dtype);
  check_weight_dtype(op, dt, wdt);
  check_sizes(op, batch, capacity, num_cols);
  require(eps >= 0.0, op, "eps must be >= 0");
  check_stride(op, "y", y_stride, num_cols);
  if (x_out != nullptr) check_stride(op, "x_out", x_out_stride, num_cols);
  check_read_stride(op, "x", x_stride);
  if (capacity == 0) return;
  for (auto [name, p] : {std::pair<const char*, const void*>{"x", x}, {"cu_seqlens", cu_seqlens},
                         {"weight", weight}, {"bias", bias}, {"y", y}, {"mean", mean},
                         {"rstd", rstd}}) {
    check_ptr(op, name, p);
  }
  if (gather) check_ptr(op, "indices", indices);
  const FwdParams p{x, indices, cu_seqlens, weight, bias, y, x_out, mean, rstd, batch, capacity,
                    num_cols, x_stride, y_stride, x_out_stride, x_rows,
                    static_cast<float>(eps), gather};
  const auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(grid_rows(capacity, kFwdWarps));
  DTOP_DISPATCH_DTYPE(dt, T, {
    const bool aligned =
        rows_aligned({x, y, x_out}, {x_stride, y_stride, x_out != nullptr ? x_out_stride : 0},
                     sizeof(T)) &&
        rows_aligned({weight, bias}, {}, 1);
    const RowPath path = row_path<T>(num_cols, aligned);
    dispatch_weight<T, FwdLaunch>(wdt, path, p, grid, s);
  });
  DTOP_CHECK_LAUNCH();
}

void layernorm_bwd(const void* dy, const void* x, const int32_t* indices,
                   const int32_t* cu_seqlens, const void* weight, const float* mean,
                   const float* rstd, const void* dx_add, void* dx, float* partials,
                   void* dweight, void* dbias, int64_t batch, int64_t x_rows, int64_t capacity,
                   int64_t num_cols, int64_t dy_stride, int64_t x_stride, int64_t dx_stride,
                   int64_t dx_add_stride, int64_t num_partials, bool gather, int dtype,
                   int weight_dtype, void* stream) {
  const char* op = "layernorm_bwd";
  const DType dt = dtype_from_code(dtype), wdt = dtype_from_code(weight_dtype);
  check_weight_dtype(op, dt, wdt);
  check_sizes(op, batch, capacity, num_cols);
  require(num_partials >= 1 && num_partials <= kMaxBlocks, op,
          "num_partials must be in [1, " + std::to_string(kMaxBlocks) + "], got " +
              std::to_string(num_partials));
  check_read_stride(op, "dy", dy_stride);
  check_read_stride(op, "x", x_stride);
  check_stride(op, "dx", dx_stride, num_cols);
  if (dx_add != nullptr) check_read_stride(op, "dx_add", dx_add_stride);
  for (auto [name, p] : {std::pair<const char*, const void*>{"partials", partials},
                         {"dweight", dweight}, {"dbias", dbias}}) {
    check_ptr(op, name, p);
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (capacity > 0) {
    for (auto [name, p] : {std::pair<const char*, const void*>{"dy", dy}, {"x", x},
                           {"cu_seqlens", cu_seqlens}, {"weight", weight}, {"mean", mean},
                           {"rstd", rstd}, {"dx", dx}}) {
      check_ptr(op, name, p);
    }
    if (gather) check_ptr(op, "indices", indices);
    const BwdParams p{dy, x, indices, cu_seqlens, weight, mean, rstd, dx_add, dx, partials,
                      batch, capacity, num_cols, dy_stride, x_stride, dx_stride, dx_add_stride,
                      x_rows, gather};
    const dim3 grid(static_cast<unsigned>(num_partials));
    DTOP_DISPATCH_DTYPE(dt, T, {
      const bool aligned =
          rows_aligned({dy, x, dx, dx_add},
                       {dy_stride, x_stride, dx_stride, dx_add != nullptr ? dx_add_stride : 0},
                       sizeof(T)) &&
          rows_aligned({weight}, {}, 1);
      const RowPath path = row_path<T>(num_cols, aligned);
      dispatch_weight<T, BwdLaunch>(wdt, path, p, grid, s);
    });
    DTOP_CHECK_LAUNCH();
  } else {  // no rows: the partial sums are zero
    DTOP_CUDA_CHECK(cudaMemsetAsync(partials, 0, sizeof(float) * 2 * num_partials * num_cols, s));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(num_cols, kWarp)), 2);
  DTOP_DISPATCH_DTYPE(wdt, W, {
    layernorm_reduce_kernel<W><<<grid, kWarp * kReduceRows, 0, s>>>(
        partials, static_cast<W*>(dweight), static_cast<W*>(dbias), num_partials, num_cols);
  });
  DTOP_CHECK_LAUNCH();
}

}  // namespace dtop
