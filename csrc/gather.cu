// gather_rows / scatter_rows: move token rows between a dense [B * N, C] tensor and the packed
// [capacity, C] buffer of the ragged token layout (see ops.h). One warp per row; each lane moves
// 16 bytes at a time when the row size and both base pointers allow it, narrower words otherwise.
// An index outside [0, dense_rows) (a broken contract with the checks off) is never dereferenced:
// the gathered row is zero, the scattered row is dropped.
#include "common.h"
#include "ops.h"

namespace dtop {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;  // one row per warp
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int64_t kMaxBlocks = 65536;  // beyond this, warps loop over rows (grid stride)

__device__ __forceinline__ int64_t first_row() {
  return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
}

__device__ __forceinline__ int64_t row_stride() { return int64_t(gridDim.x) * kWarpsPerBlock; }

// Dense row of packed row `row`, or -1 when indices[row] lies outside [0, dense_rows).
__device__ __forceinline__ int64_t dense_row(const int32_t* indices, int64_t row,
                                             int64_t dense_rows) {
  const int64_t r = indices[row];
  return r >= 0 && r < dense_rows ? r : -1;
}

// Word: the unit one lane copies (uint4 = 16 bytes ... uint8_t); row_words = row bytes / sizeof.
template <typename Word>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const Word* __restrict__ src, const int32_t* __restrict__ indices,
                       const int32_t* __restrict__ cu_seqlens, Word* __restrict__ dst,
                       int64_t batch, int64_t dense_rows, int64_t capacity, int64_t row_words) {
  const int64_t valid = valid_rows(cu_seqlens, batch, capacity);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = first_row(); row < capacity; row += row_stride()) {
    Word* out = dst + row * row_words;
    const int64_t from = row < valid ? dense_row(indices, row, dense_rows) : -1;
    if (from >= 0) {
      const Word* in = src + from * row_words;
#pragma unroll 4
      for (int64_t j = lane; j < row_words; j += kWarpSize) out[j] = in[j];
    } else {  // padding rows of the packed buffer (and broken indices) are zero
      for (int64_t j = lane; j < row_words; j += kWarpSize) out[j] = Word{};
    }
  }
}

template <typename Word>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const Word* __restrict__ src, const int32_t* __restrict__ indices,
                        const int32_t* __restrict__ cu_seqlens, Word* __restrict__ dst,
                        int64_t batch, int64_t dense_rows, int64_t capacity, int64_t row_words) {
  const int64_t valid = valid_rows(cu_seqlens, batch, capacity);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = first_row(); row < valid; row += row_stride()) {
    const int64_t to = dense_row(indices, row, dense_rows);
    if (to < 0) continue;
    const Word* in = src + row * row_words;
    Word* out = dst + to * row_words;
#pragma unroll 4
    for (int64_t j = lane; j < row_words; j += kWarpSize) out[j] = in[j];
  }
}

// dst[indices[i]] += src[i], summed in float32 and rounded once. Indices are unique: no atomics.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(const Pack<T, kVec>* __restrict__ src,
                            const int32_t* __restrict__ indices,
                            const int32_t* __restrict__ cu_seqlens, Pack<T, kVec>* __restrict__ dst,
                            int64_t batch, int64_t dense_rows, int64_t capacity,
                            int64_t row_packs) {
  const int64_t valid = valid_rows(cu_seqlens, batch, capacity);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = first_row(); row < valid; row += row_stride()) {
    const int64_t to = dense_row(indices, row, dense_rows);
    if (to < 0) continue;
    const Pack<T, kVec>* in = src + row * row_packs;
    Pack<T, kVec>* out = dst + to * row_packs;
#pragma unroll 2
    for (int64_t j = lane; j < row_packs; j += kWarpSize) {
      Pack<T, kVec> acc = out[j];
      const Pack<T, kVec> inc = in[j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc.v[k] = from_float<T>(to_float(acc.v[k]) + to_float(inc.v[k]));
      }
      out[j] = acc;
    }
  }
}

// ---------------------------------------------------------------------------- host side
struct RowArgs {
  const void* src;
  const int32_t* indices;
  const int32_t* cu_seqlens;
  void* dst;
  int64_t batch;
  int64_t dense_rows;
  int64_t capacity;
  int64_t row_bytes;
  cudaStream_t stream;
};

enum class Direction { kGather, kScatter };

dim3 grid_for(int64_t capacity) {
  const int64_t blocks = ceil_div(capacity, kWarpsPerBlock);
  return dim3(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

// Widest word (16, 8, 4, 2 or 1 bytes) dividing the row size and both base addresses.
int word_bytes(const void* a, const void* b, int64_t row_bytes) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  int width = 16;
  while (width > 1 && (row_bytes % width != 0 || addr % width != 0)) width /= 2;
  return width;
}

template <typename Word>
void launch_copy(Direction dir, const RowArgs& a) {
  const auto* src = static_cast<const Word*>(a.src);
  auto* dst = static_cast<Word*>(a.dst);
  const int64_t row_words = a.row_bytes / static_cast<int64_t>(sizeof(Word));
  if (dir == Direction::kGather) {
    gather_rows_kernel<Word><<<grid_for(a.capacity), kThreads, 0, a.stream>>>(
        src, a.indices, a.cu_seqlens, dst, a.batch, a.dense_rows, a.capacity, row_words);
  } else {
    scatter_rows_kernel<Word><<<grid_for(a.capacity), kThreads, 0, a.stream>>>(
        src, a.indices, a.cu_seqlens, dst, a.batch, a.dense_rows, a.capacity, row_words);
  }
  DTOP_CHECK_LAUNCH();
}

// Copies are bit moves: the dtype only sets the row size.
void launch_copy_widest(Direction dir, const RowArgs& a) {
  switch (word_bytes(a.src, a.dst, a.row_bytes)) {
    case 16: return launch_copy<uint4>(dir, a);
    case 8: return launch_copy<uint2>(dir, a);
    case 4: return launch_copy<uint32_t>(dir, a);
    case 2: return launch_copy<uint16_t>(dir, a);
    default: return launch_copy<uint8_t>(dir, a);
  }
}

template <typename T>
void launch_scatter_add(const RowArgs& a) {
  constexpr int kVec = 16 / sizeof(T);
  if (word_bytes(a.src, a.dst, a.row_bytes) == 16) {
    scatter_add_rows_kernel<T, kVec><<<grid_for(a.capacity), kThreads, 0, a.stream>>>(
        static_cast<const Pack<T, kVec>*>(a.src), a.indices, a.cu_seqlens,
        static_cast<Pack<T, kVec>*>(a.dst), a.batch, a.dense_rows, a.capacity,
        a.row_bytes / 16);
  } else {
    scatter_add_rows_kernel<T, 1><<<grid_for(a.capacity), kThreads, 0, a.stream>>>(
        static_cast<const Pack<T, 1>*>(a.src), a.indices, a.cu_seqlens,
        static_cast<Pack<T, 1>*>(a.dst), a.batch, a.dense_rows, a.capacity,
        a.row_bytes / static_cast<int64_t>(sizeof(T)));
  }
  DTOP_CHECK_LAUNCH();
}

RowArgs checked_args(const char* op, const void* src, const int32_t* indices,
                     const int32_t* cu_seqlens, void* dst, int64_t batch,
                     int64_t dense_rows, int64_t capacity, int64_t num_cols, DType dtype,
                     void* stream) {
  const auto fail = [op](const std::string& msg) {
    throw std::invalid_argument(std::string(op) + ": " + msg);
  };
  if (batch < 0) fail("batch must be >= 0, got " + std::to_string(batch));
  if (dense_rows < 0) fail("dense_rows must be >= 0, got " + std::to_string(dense_rows));
  if (capacity < 0) fail("capacity must be >= 0, got " + std::to_string(capacity));
  if (num_cols <= 0) fail("num_cols must be > 0, got " + std::to_string(num_cols));
  if (capacity > 0) {
    if (src == nullptr) fail("src is a null pointer");
    if (indices == nullptr) fail("indices is a null pointer");
    if (cu_seqlens == nullptr) fail("cu_seqlens is a null pointer");
    if (dst == nullptr) fail("dst is a null pointer");
  }
  return RowArgs{src,      indices,  cu_seqlens, dst, batch, dense_rows,
                 capacity, num_cols * dtype_size(dtype), static_cast<cudaStream_t>(stream)};
}

}  // namespace

void gather_rows(const void* src, const int32_t* indices, const int32_t* cu_seqlens, void* dst,
                 int64_t batch, int64_t dense_rows, int64_t capacity, int64_t num_cols,
                 int dtype, void* stream) {
  const RowArgs args = checked_args("gather_rows", src, indices, cu_seqlens, dst, batch,
                                    dense_rows, capacity, num_cols, dtype_from_code(dtype),
                                    stream);
  if (capacity == 0) return;
  launch_copy_widest(Direction::kGather, args);
}

void scatter_rows(const void* src, const int32_t* indices, const int32_t* cu_seqlens, void* dst,
                  int64_t batch, int64_t dense_rows, int64_t capacity, int64_t num_cols,
                  int dtype, bool add, void* stream) {
  const DType dt = dtype_from_code(dtype);
  const RowArgs args = checked_args("scatter_rows", src, indices, cu_seqlens, dst, batch,
                                    dense_rows, capacity, num_cols, dt, stream);
  if (capacity == 0) return;
  if (!add) {
    launch_copy_widest(Direction::kScatter, args);
    return;
  }
  DTOP_DISPATCH_DTYPE(dt, T, launch_scatter_add<T>(args));
}

}  // namespace dtop
