// The DToP exit rule and the compaction to the next token set (see ops.h), the CUDA twin of
// dtop_kernels/triton/select.py. Everything stays on the stream; T is never read on the host.
//
//   1. score:    conf / label per valid slot (fp32): present[c] = sigmoid(l_present - l_none),
//                s = present[c] * sigmoid(mask_logit[c, slot]), max over c, lowest c on ties
//                (a NaN score wins, as in torch.max: such a slot is never a candidate);
//                scores below 2**-126 count as 0 (subnormal exponentials differ between
//                hardware and libraries; the reference and the Triton kernel flush the same).
//   2. rank:     for a candidate (conf > threshold), the number of candidates of its image and
//                label that beat it (higher conf, or equal conf at a lower slot); it exits when
//                that number is >= top_k. keep[slot] = 1 for valid slots that do not exit.
//   3. scan:     pos = exclusive prefix sum of keep over capacity + 1 entries (CUB), so
//                pos[capacity] is the number of kept tokens.
//   4. finalize: next_indices[pos[s]] = indices[s] for kept slots, -1 past the kept count;
//                next_cu_seqlens[b] = pos[cu_seqlens[b]]; exited[indices[s]] = 1 for valid slots
//                that exit (the [B, N] mask is cleared first).
// The rank pass is O(n^2) comparisons per image (shared-memory tiles, stopping once every
// candidate of the block has top_k better ones); deterministic, and small next to one layer.
#include <cub/device/device_scan.cuh>

#include <utility>

#include "common.h"
#include "ops.h"

namespace dtop {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxClasses = 12288;  // present[] of one image in 48 KB of shared memory
constexpr int64_t kAlign = 256;         // workspace sub-buffers start on 256-byte boundaries
constexpr float kTiny = 1.17549435e-38f;  // 2**-126: smaller scores count as 0

int64_t align_up(int64_t n) { return ceil_div(n, kAlign) * kAlign; }

// Workspace layout: conf float[cap] | label int32[cap] | keep int32[cap + 1] |
// pos int32[cap + 1] | CUB temporary storage.
struct Workspace {
  float* conf;
  int32_t* label;
  int32_t* keep;
  int32_t* pos;
  void* scan_tmp;
  size_t scan_bytes;
};

size_t scan_temp_bytes(int64_t capacity) {
  size_t bytes = 0;
  const int32_t* none_in = nullptr;
  int32_t* none_out = nullptr;
  DTOP_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, none_in, none_out,
                                                static_cast<int>(capacity + 1)));
  return bytes;
}

int64_t fixed_bytes(int64_t capacity) {
  return 2 * align_up(4 * capacity) + 2 * align_up(4 * (capacity + 1));
}

Workspace carve(void* base, int64_t capacity, size_t scan_bytes) {
  char* p = static_cast<char*>(base);
  Workspace w{};
  w.conf = reinterpret_cast<float*>(p);
  p += align_up(4 * capacity);
  w.label = reinterpret_cast<int32_t*>(p);
  p += align_up(4 * capacity);
  w.keep = reinterpret_cast<int32_t*>(p);
  p += align_up(4 * (capacity + 1));
  w.pos = reinterpret_cast<int32_t*>(p);
  p += align_up(4 * (capacity + 1));
  w.scan_tmp = p;
  w.scan_bytes = scan_bytes;
  return w;
}

template <typename T>
__device__ __forceinline__ float load_as_float(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ float load_any(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case 1: return load_as_float<__half>(p, i);
    case 2: return load_as_float<__nv_bfloat16>(p, i);
    default: return load_as_float<float>(p, i);
  }
}

// Without overflow for large |x| (the naive 1 / (1 + expf(-x)) overflows expf below -88.7);
// sigmoid(+inf) = 1, sigmoid(-inf) = 0, NaN stays NaN.
__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// Grid (cdiv(max_seqlen, 256), B). class_logits [B, K, 2] (last stride 1, any dtype code),
// mask_logits [K, capacity] with row stride mask_stride, last stride 1.
template <typename M>
__global__ void __launch_bounds__(kThreads)
    select_score_kernel(const void* __restrict__ class_logits, int class_dtype,
                        int64_t class_stride_b, int64_t class_stride_k,
                        const M* __restrict__ mask_logits, int64_t mask_stride,
                        const int32_t* __restrict__ cu_seqlens, int64_t capacity,
                        int64_t num_classes, float* __restrict__ conf,
                        int32_t* __restrict__ label) {
  extern __shared__ float present[];  // [num_classes]
  const int64_t b = blockIdx.y;
  const Segment seg = image_segment(cu_seqlens, b, capacity);
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (int64_t(blockIdx.x) * kThreads >= seg.len) return;  // the whole block is past the image
  for (int64_t c = threadIdx.x; c < num_classes; c += kThreads) {
    const int64_t at = b * class_stride_b + c * class_stride_k;
    // softmax over [present, no object] = sigmoid of the difference
    present[c] = sigmoid(load_any(class_logits, at, class_dtype) -
                         load_any(class_logits, at + 1, class_dtype));
  }
  __syncthreads();
  if (i >= seg.len) return;
  const int64_t slot = seg.start + i;
  float best = -1.f;
  int32_t best_c = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    float s = present[c] * sigmoid(to_float(mask_logits[c * mask_stride + slot]));
    if (s < kTiny) s = 0.f;  // NaN stays NaN
    if (s > best || s != s) {  // strict: the lowest class wins ties
      best = s;
      best_c = static_cast<int32_t>(c);
      if (s != s) break;  // NaN wins (as torch.max): the slot is never a candidate
    }
  }
  conf[slot] = best;
  label[slot] = best_c;
}

// Grid (cdiv(max_seqlen, 256), B). keep[slot] = 1 unless the slot is a candidate with at least
// top_k better candidates of its image and label. keep is zero beforehand (padding stays 0).
__global__ void __launch_bounds__(kThreads)
    select_rank_kernel(const float* __restrict__ conf, const int32_t* __restrict__ label,
                       const int32_t* __restrict__ cu_seqlens, int64_t capacity, float threshold,
                       int64_t top_k, int32_t* __restrict__ keep) {
  __shared__ float tile_conf[kThreads];
  __shared__ int32_t tile_label[kThreads];  // -1: not a candidate
  const Segment seg = image_segment(cu_seqlens, blockIdx.y, capacity);
  if (int64_t(blockIdx.x) * kThreads >= seg.len) return;  // uniform over the block
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const bool valid = i < seg.len;
  const float my_conf = valid ? conf[seg.start + i] : 0.f;
  const bool cand = valid && my_conf > threshold;
  const int32_t my_label = cand ? label[seg.start + i] : -2;
  int64_t better = 0;
  for (int64_t j0 = 0; j0 < seg.len; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    float cj = 0.f;
    int32_t lj = -1;
    if (j < seg.len) {
      cj = conf[seg.start + j];
      if (cj > threshold) lj = label[seg.start + j];
    }
    tile_conf[threadIdx.x] = cj;
    tile_label[threadIdx.x] = lj;
    __syncthreads();
    if (cand && better < top_k) {
      const int n = static_cast<int>(seg.len - j0 < kThreads ? seg.len - j0 : kThreads);
      for (int t = 0; t < n; ++t) {
        const float c = tile_conf[t];
        better += tile_label[t] == my_label && (c > my_conf || (c == my_conf && j0 + t < i));
      }
    }
    // Stop once no thread of the block can still change its answer.
    if (__syncthreads_and(!cand || better >= top_k)) break;
  }
  if (valid) keep[seg.start + i] = !(cand && better >= top_k);
}

// One thread per slot s in [0, max(capacity, batch + 1)).
__global__ void __launch_bounds__(kThreads)
    select_finalize_kernel(const int32_t* __restrict__ indices,
                           const int32_t* __restrict__ cu_seqlens, const int32_t* __restrict__ keep,
                           const int32_t* __restrict__ pos, int64_t batch, int64_t capacity,
                           int64_t dense_rows, int32_t* __restrict__ next_indices,
                           int32_t* __restrict__ next_cu_seqlens, uint8_t* __restrict__ exited) {
  const int64_t s = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (s < capacity) {
    const int64_t total = valid_rows(cu_seqlens, batch, capacity);
    const int64_t kept = pos[capacity];
    if (s < total) {
      const int32_t row = indices[s];
      if (keep[s]) {
        next_indices[pos[s]] = row;
      } else if (row >= 0 && row < dense_rows) {
        exited[row] = 1;
      }
    }
    if (s >= kept) next_indices[s] = -1;
  }
  if (s <= batch) {
    int64_t c = cu_seqlens[s];
    c = c < 0 ? 0 : (c > capacity ? capacity : c);
    next_cu_seqlens[s] = pos[c];
  }
}

}  // namespace

int64_t select_workspace_bytes(int64_t capacity) {
  require(capacity >= 0, "select_workspace_bytes",
          "capacity must be >= 0, got " + std::to_string(capacity));
  require(capacity < (int64_t(1) << 31) - 1, "select_workspace_bytes",
          "capacity must fit in int32");
  return fixed_bytes(capacity) + align_up(static_cast<int64_t>(scan_temp_bytes(capacity)));
}

void dtop_select(const void* class_logits, const void* mask_logits, const int32_t* indices,
                 const int32_t* cu_seqlens, int32_t* next_indices, int32_t* next_cu_seqlens,
                 uint8_t* exited, void* workspace, int64_t workspace_bytes, int64_t batch,
                 int64_t seq_len, int64_t capacity, int64_t max_seqlen, int64_t num_classes,
                 int64_t class_stride_b, int64_t class_stride_k, int64_t mask_stride,
                 double threshold, int64_t top_k, int class_dtype, int mask_dtype,
                 void* stream) {
  const char* op = "dtop_select";
  dtype_from_code(class_dtype);
  const DType mdt = dtype_from_code(mask_dtype);
  require(batch >= 0 && batch < 65536, op,
          "batch must be in [0, 65535], got " + std::to_string(batch));
  require(seq_len > 0, op, "seq_len must be > 0");
  require(capacity >= 0 && capacity <= batch * seq_len, op,
          "capacity must be in [0, B * N], got " + std::to_string(capacity));
  require(max_seqlen >= 0 && max_seqlen <= seq_len, op, "max_seqlen must be in [0, N]");
  require(num_classes >= 1 && num_classes <= kMaxClasses, op,
          "num_classes must be in [1, " + std::to_string(kMaxClasses) + "], got " +
              std::to_string(num_classes));
  require(capacity < (int64_t(1) << 31) - 1, op, "capacity must be < 2**31 - 1");
  require(num_classes == 1 || mask_stride >= 0, op, "mask_logits row stride must be >= 0");
  require(top_k >= 0, op, "top_k must be >= 0");
  require(threshold == threshold, op, "threshold is NaN");
  if (max_seqlen > capacity) max_seqlen = capacity;  // a larger bound is valid
  for (auto [name, p] :
       {std::pair<const char*, const void*>{"cu_seqlens", cu_seqlens},
        {"next_cu_seqlens", next_cu_seqlens}, {"exited", exited}}) {
    require(p != nullptr, op, std::string(name) + " is a null pointer");
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (capacity == 0) {  // nothing active: nothing exits and the next set is empty too
    DTOP_CUDA_CHECK(cudaMemsetAsync(exited, 0, static_cast<size_t>(batch * seq_len), s));
    DTOP_CUDA_CHECK(cudaMemsetAsync(next_cu_seqlens, 0, sizeof(int32_t) * (batch + 1), s));
    return;
  }
  for (auto [name, p] : {std::pair<const char*, const void*>{"class_logits", class_logits},
                         {"mask_logits", mask_logits}, {"indices", indices},
                         {"next_indices", next_indices}, {"workspace", workspace}}) {
    require(p != nullptr, op, std::string(name) + " is a null pointer");
  }
  const size_t scan_bytes = scan_temp_bytes(capacity);
  const int64_t needed = fixed_bytes(capacity) + static_cast<int64_t>(scan_bytes);
  require(workspace_bytes >= needed, op,
          "workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
              std::to_string(needed) + " (select_workspace_bytes(capacity))");
  require(aligned_to(workspace, kAlign), op, "workspace must be 256-byte aligned");
  const Workspace w = carve(workspace, capacity, scan_bytes);

  DTOP_CUDA_CHECK(cudaMemsetAsync(exited, 0, static_cast<size_t>(batch * seq_len), s));
  DTOP_CUDA_CHECK(cudaMemsetAsync(w.keep, 0, sizeof(int32_t) * (capacity + 1), s));
  if (batch > 0 && max_seqlen > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(max_seqlen, kThreads)),
                    static_cast<unsigned>(batch));
    const size_t smem = sizeof(float) * num_classes;
    DTOP_DISPATCH_DTYPE(mdt, M, {
      select_score_kernel<M><<<grid, kThreads, smem, s>>>(
          class_logits, class_dtype, class_stride_b, class_stride_k,
          static_cast<const M*>(mask_logits), mask_stride, cu_seqlens, capacity, num_classes,
          w.conf, w.label);
    });
    DTOP_CHECK_LAUNCH();
    select_rank_kernel<<<grid, kThreads, 0, s>>>(w.conf, w.label, cu_seqlens, capacity,
                                                 static_cast<float>(threshold), top_k, w.keep);
    DTOP_CHECK_LAUNCH();
  }
  size_t tmp_bytes = w.scan_bytes;
  DTOP_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(w.scan_tmp, tmp_bytes, w.keep, w.pos,
                                                static_cast<int>(capacity + 1), s));
  const int64_t threads = capacity > batch + 1 ? capacity : batch + 1;
  select_finalize_kernel<<<static_cast<unsigned>(ceil_div(threads, kThreads)), kThreads, 0, s>>>(
      indices, cu_seqlens, w.keep, w.pos, batch, capacity, batch * seq_len, next_indices,
      next_cu_seqlens, exited);
  DTOP_CHECK_LAUNCH();
}

}  // namespace dtop
