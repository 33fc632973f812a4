// Host entry points of the CUDA kernels. Plain C++ (no CUDA headers) so bindings.cpp stays a
// thin pybind11 file. Pointers are device pointers; `stream` is a cudaStream_t passed as void*.
// Invalid arguments throw std::invalid_argument; CUDA failures throw std::runtime_error.
#pragma once

#include <cstdint>
#include <vector>

namespace dtop {

// Packed ragged token layout shared by the ops:
//   indices    int32 [capacity]  flat row indices into the B * N rows of a dense x [B, N, C],
//                                image after image; entries [T, capacity) are padding.
//   cu_seqlens int32 [B + 1]     T = cu_seqlens[B] is read on the device (no host sync).
// `dtype` is 0 = float32, 1 = float16, 2 = bfloat16.

// An index outside [0, dense_rows = B * N) is never dereferenced (gather: the row is zero;
// scatter: nothing is written); valid indices are a contract the Python side can check.

// dst[i] = src[indices[i]] for i < T; dst[i] = 0 for T <= i < capacity.
// src: [B * N, num_cols], dst: [capacity, num_cols], both row-major and contiguous.
void gather_rows(const void* src, const int32_t* indices, const int32_t* cu_seqlens, void* dst,
                 int64_t batch, int64_t dense_rows, int64_t capacity, int64_t num_cols,
                 int dtype, void* stream);

// For i < T: dst[indices[i]] = src[i] (add = false) or dst[indices[i]] += src[i] (add = true,
// summed in float32). Rows i >= T are ignored. indices[0..T) must be distinct: each row is read,
// added to and written back without atomics, so two rows with one destination race (the public
// ops guarantee it: a TokenSet's valid indices strictly increase, TokenSet.validate checks it).
// src: [capacity, num_cols], dst: [B * N, num_cols], both row-major and contiguous.
void scatter_rows(const void* src, const int32_t* indices, const int32_t* cu_seqlens, void* dst,
                  int64_t batch, int64_t dense_rows, int64_t capacity, int64_t num_cols,
                  int dtype, bool add, void* stream);

// ---------------------------------------------------------------------------- layernorm
// Row path: rows i < T are normalized, rows T <= i < capacity are padding.
// `weight_dtype` (weight and bias) is `dtype` or 0 = float32. Row strides are in elements.

// y[i] = LayerNorm(x[r]) * weight + bias with r = indices[i] (gather) or i; mean[i], rstd[i] in
// float32 (rstd = 1 / sqrt(var + eps), biased var). x_out (nullable) receives the raw row x[r].
// Padding rows: y = x_out = 0, mean = rstd = 0.
// x: [x_rows, num_cols] (dense [B * N] rows with gather, else [capacity]); y, x_out:
// [capacity, ...]. A gathered index outside [0, x_rows) is never dereferenced (reads zeros).
void layernorm_fwd(const void* x, const int32_t* indices, const int32_t* cu_seqlens,
                   const void* weight, const void* bias, void* y, void* x_out, float* mean,
                   float* rstd, int64_t batch, int64_t x_rows, int64_t capacity, int64_t num_cols,
                   int64_t x_stride, int64_t y_stride, int64_t x_out_stride, double eps,
                   bool gather, int dtype, int weight_dtype, void* stream);

// Backward of layernorm_fwd. dx: [capacity, num_cols] packed (never scattered); padding rows get
// dx_add's row (or 0 when dx_add is null); valid rows get the LayerNorm gradient + dx_add's row.
// dweight / dbias [num_cols] (weight_dtype) are reduced from `partials`, a float32 workspace of
// 2 * num_partials * num_cols elements (one partial row per block; num_partials blocks run).
void layernorm_bwd(const void* dy, const void* x, const int32_t* indices,
                   const int32_t* cu_seqlens, const void* weight, const float* mean,
                   const float* rstd, const void* dx_add, void* dx, float* partials,
                   void* dweight, void* dbias, int64_t batch, int64_t x_rows, int64_t capacity,
                   int64_t num_cols, int64_t dy_stride, int64_t x_stride, int64_t dx_stride,
                   int64_t dx_add_stride, int64_t num_partials, bool gather, int dtype,
                   int weight_dtype, void* stream);

// ---------------------------------------------------------------------------- dtop_select
// Bytes of device workspace dtop_select needs for this capacity (256-byte aligned buffer).
// Queries CUB for the current device: call it with that device current.
int64_t select_workspace_bytes(int64_t capacity);

// The DToP exit rule on the token set (indices, cu_seqlens) and its compaction, no host sync.
// class_logits [B, K, 2] (strides class_stride_b, class_stride_k, 1; class_dtype);
// mask_logits [K, capacity] (row stride mask_stride, mask_dtype), column j = slot j.
// Per valid slot: conf / label = max / argmax_c sigmoid(l_present - l_none) * sigmoid(mask) in
// float32, scores below 2**-126 counted as 0 (lowest class on ties; a NaN score wins, so that
// slot is never a candidate; sigmoid(+-inf) = 1 / 0;
// mask_stride may be 0, one row shared by all classes); candidates have conf > threshold; a
// candidate exits when at least top_k candidates of its image and label beat it (higher conf,
// or equal conf at a lower slot). Outputs: next_indices [capacity] (kept slots in order, -1
// after), next_cu_seqlens [B + 1], exited [B * N] uint8 (1 where a token exits here, 0
// elsewhere). max_seqlen must bound every image's length (it sizes the grids); capacity
// < 2**31 - 1.
void dtop_select(const void* class_logits, const void* mask_logits, const int32_t* indices,
                 const int32_t* cu_seqlens, int32_t* next_indices, int32_t* next_cu_seqlens,
                 uint8_t* exited, void* workspace, int64_t workspace_bytes, int64_t batch,
                 int64_t seq_len, int64_t capacity, int64_t max_seqlen, int64_t num_classes,
                 int64_t class_stride_b, int64_t class_stride_k, int64_t mask_stride,
                 double threshold, int64_t top_k, int class_dtype, int mask_dtype,
                 void* stream);

// ---------------------------------------------------------------------------- attention
// Varlen attention over packed images, float16 / bfloat16 only (dtype 1 or 2), head dim
// 32, 64, 80, 96 or 128. q [cap_q, H, D], k / v [cap_k, H, D] with token / head strides in
// elements (multiples of 8, 16-byte aligned bases, last stride 1); image b owns query rows
// cu_seqlens_q[b]..cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b]..cu_seqlens_k[b + 1].
// lse / delta are float32 [H, cap_q] (contiguous). Rows of padding (past T) are never written.

// The head dims the attention kernels are compiled for (ascending).
std::vector<int> attention_head_dims();

// out = softmax(q k^T * scale) v per image and head (zero for an image without keys);
// lse = log2 of the softmax denominator of the scores times scale * log2(e) (base 2; -inf
// without keys).
void attention_fwd(const void* q, const void* k, const void* v, void* out, float* lse,
                   const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t batch,
                   int64_t heads, int64_t head_dim, int64_t capacity_q, int64_t capacity_k,
                   int64_t max_seqlen_q, int64_t q_stride_t, int64_t q_stride_h,
                   int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                   int64_t v_stride_h, int64_t out_stride_t, int64_t out_stride_h, double scale,
                   int dtype, void* stream);

// The non-finite rule, applied to attention_fwd's out in place (v's head dim equal to q's): every
// row of image b and head h becomes NaN when a key or value row of that image and head holds a
// NaN or Inf, and so does each query row that holds one; images without keys keep their rows.
// batch <= 65535 (the grid's x), heads <= 65535.
void attention_nonfinite_rows(const void* q, const void* k, const void* v, void* out,
                              const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                              int64_t batch, int64_t heads, int64_t head_dim, int64_t capacity_q,
                              int64_t capacity_k, int64_t q_stride_t, int64_t q_stride_h,
                              int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                              int64_t v_stride_h, int64_t out_stride_t, int64_t out_stride_h,
                              int dtype, void* stream);

// Gradients of attention_fwd given dout and the forward's out and lse. Writes delta
// (= rowsum(dout * out), float32 [H, cap_q], 0 on padding rows) as a workspace, then dk / dv
// (one kernel, looping over query tiles) and dq (one kernel, looping over key tiles). Rows of
// dq / dk / dv past T, and all rows when an image has no queries / keys, are left untouched
// (dk / dv of an image without queries, and dq of one without keys, are written as zero).
// When capacity_q or capacity_k is 0 the call writes nothing at all: the caller owns the
// (zero) contents of dq / dk / dv then (the Python launcher allocates them zeroed).
// max_seqlen_q / max_seqlen_k must bound every image's length (they size the grids).
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
                   int dtype, void* stream);

// Head-averaged pre-softmax logits for a uniform query layout (num_q = Kq queries per image,
// image b's queries are rows b * Kq .. b * Kq + Kq - 1 of q): for key rows j of image b,
// logits[c, j] = sum_h q[b * Kq + c, h] . k[j, h] * scale / H, fp32 accumulation, stored in
// dtype. logits: [Kq, logits_stride] row-major; columns of padding keys are left untouched.
void attention_head_mean_logits(const void* q, const void* k, void* logits,
                                const int32_t* cu_seqlens_k, int64_t batch, int64_t heads,
                                int64_t head_dim, int64_t num_q, int64_t capacity_k,
                                int64_t max_seqlen_k, int64_t q_stride_t, int64_t q_stride_h,
                                int64_t k_stride_t, int64_t k_stride_h, int64_t logits_stride,
                                double scale, int dtype, void* stream);

// ---------------------------------------------------------------------------- linear
// Packed linear layer on tensor cores, float16 / bfloat16 only (dtype 1 or 2); out_features and
// in_features multiples of 8; row strides in elements, multiples of 8, 16-byte aligned bases.
// Rows i < T = cu_seqlens[batch] are tokens; row tiles past T run no product.

// For i < T: z = x_row(i) @ weight^T + bias (fp32 accumulation), pre[i] = z (when pre is not
// null), y_row(i) = act(z) + residual[i] (act 0 = identity, 1 = exact GELU; bias / residual
// nullable). x_row(i) = x[x_index[i]] when x_index is not null (the gather), else x[i];
// y_row(i) = y[y_index[i]] when y_index is not null (the scatter; other rows of y untouched),
// else y[i]. For T <= i < capacity: y[i] = 0 (unless scattering) and pre[i] = 0. An x_index /
// y_index entry outside [0, dense_rows) is never dereferenced: the row reads as zeros and is not
// written (a broken contract: the Python side can check it, see DTOP_CHECK).
// weight: [out_features, in_features]; bias: [out_features]; residual, pre: [capacity, out].
void linear_fwd(const void* x, const int32_t* x_index, const void* weight, const void* bias,
                const void* residual, void* pre, void* y, const int32_t* y_index,
                const int32_t* cu_seqlens, int64_t batch, int64_t capacity, int64_t out_features,
                int64_t in_features, int64_t x_stride, int64_t weight_stride,
                int64_t residual_stride, int64_t pre_stride, int64_t y_stride, int64_t dense_rows,
                int act, int dtype, void* stream);

// Input gradient of linear_fwd: dx[i] = dz[i] @ weight for i < T, dx[i] = 0 for
// T <= i < capacity. dz: [capacity, out_features]; dx: [capacity, in_features].
void linear_bwd_input(const void* dz, const void* weight, void* dx, const int32_t* cu_seqlens,
                      int64_t batch, int64_t capacity, int64_t out_features,
                      int64_t in_features, int64_t dz_stride, int64_t weight_stride,
                      int64_t dx_stride, int dtype, void* stream);

}  // namespace dtop
