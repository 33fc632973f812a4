// The dtop op library: the schemas of the `dtop::` ops that an exported (AOTInductor) graph
// holds, and their CPU implementations, written against PyTorch's stable ABI only
// (STABLE_TORCH_LIBRARY, torch::stable::Tensor, the aoti_torch_* C shim). The library links
// against nothing of PyTorch's C++ API, so one build loads into every PyTorch that keeps this
// stable ABI (2.10 and later), from Python (`torch.ops.load_library`) or from C++
// (AOTIModelPackageLoader) alike.
//
// The CPU implementations are deliberately plain: loops, and PyTorch's own operators through the
// dispatcher where they are the fast way (aten::matmul for the linear layer and the head-mean
// logits, aten::scaled_dot_product_attention per image as the reference does), computed in
// float32 (float64 for float64 inputs) and rounded once to the input dtype. Their semantics are those of the package's
// PyTorch reference (dtop_kernels/reference), which the tests compare them against:
//   - a token set is (indices int32 [capacity], cu_seqlens int32 [B + 1], seq_len N); slots
//     i < T = min(cu_seqlens[B], capacity) are tokens, the rest padding (zero in every output);
//   - an index outside [0, B * N) reads zeros and writes nowhere.
// The shapes of every output follow from the input shapes (capacity is fixed), so a dynamic batch
// dimension exports.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include "schemas.h"
#include "stable_util.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace dtop_oplib;  // NOLINT: Tensor, ScalarType, Sizes, contig, new_empty, ...
namespace so = torch::stable;

constexpr float kTiny = 1.1754943508222875e-38f;  // 2**-126: smaller scores count as 0

bool is_float_type(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

// float32, or float64 for float64 inputs: the type every implementation computes in.
ScalarType acc_type(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// A contiguous copy (or view) of `t` in dtype `dt`.
Tensor as_type(const Tensor& t, ScalarType dt) {
  Tensor r = t.scalar_type() == dt ? t : so::to(t, dt);
  return r.is_contiguous() ? r : so::contiguous(r);
}

Tensor call1(const char* op, const char* overload, const Tensor& a) {
  std::array<StableIValue, 1> stack{torch::stable::detail::from(a)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

void check_cpu(const Tensor& t, const char* op, const char* name) {
  DTOP_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor here (this is the CPU "
             "implementation; CUDA tensors need the library's CUDA kernels)");
}

// The token set's host view: offsets and indices read once (CPU tensors: no sync).
struct Tokens {
  std::vector<int32_t> cu;       // [B + 1]
  const int32_t* indices;        // [capacity]
  int64_t capacity, batch, seq_len, total;  // total: T = min(cu[B], capacity)
  Tensor keep_indices;           // owns `indices`
  int64_t rows() const { return batch * seq_len; }
  // start / end slot of image b, clamped to the capacity
  int64_t begin(int64_t b) const { return std::min<int64_t>(std::max(cu[b], 0), capacity); }
  int64_t end(int64_t b) const { return std::min<int64_t>(std::max(cu[b + 1], 0), capacity); }
  bool in_range(int64_t r) const { return r >= 0 && r < rows(); }
};

// The offsets on the host (CPU tensors: reading them costs nothing).
std::vector<int32_t> read_offsets(const Tensor& cu_seqlens) {
  Tensor cu = contig(cu_seqlens);
  const int32_t* c = static_cast<const int32_t*>(cu.const_data_ptr());
  return std::vector<int32_t>(c, c + cu.size(0));
}

Tokens token_set(const Tensor& indices, const Tensor& cu_seqlens, int64_t seq_len,
                 const char* op) {
  check_cpu(indices, op, "indices");
  check_cpu(cu_seqlens, op, "cu_seqlens");
  check_token_set(indices, cu_seqlens, seq_len, op);
  Tokens t;
  t.keep_indices = contig(indices);
  t.indices = static_cast<const int32_t*>(t.keep_indices.const_data_ptr());
  t.capacity = indices.size(0);
  t.batch = cu_seqlens.size(0) - 1;
  t.seq_len = seq_len;
  t.cu = read_offsets(cu_seqlens);
  t.total = std::min<int64_t>(std::max(t.cu.back(), 0), t.capacity);
  return t;
}

// ------------------------------------------------------------------ gather / scatter
Tensor gather_cpu(Tensor x2d, Tensor indices, Tensor cu_seqlens, int64_t seq_len) {
  const char* op = "gather";
  check_cpu(x2d, op, "x2d");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(x2d.dim() == 2 && x2d.size(0) == tk.rows(), op, ": x2d must be [B * N, C] = [",
             tk.rows(), ", C]; got ", x2d.dim(), "-D with ", x2d.size(0), " rows");
  Tensor x = contig(x2d);
  const int64_t c = x.size(1);
  const size_t row_bytes = static_cast<size_t>(c) * x.element_size();
  Tensor out = new_zeros(x, Sizes({tk.capacity, c}), x.scalar_type());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  for (int64_t i = 0; i < tk.total; ++i) {
    const int64_t r = tk.indices[i];
    if (tk.in_range(r) && row_bytes) std::memcpy(dst + i * row_bytes, src + r * row_bytes, row_bytes);
  }
  return out;
}

template <typename T>
void add_rows(T* out, const T* packed, const Tokens& tk, int64_t c) {
  for (int64_t i = 0; i < tk.total; ++i) {
    const int64_t r = tk.indices[i];
    if (!tk.in_range(r)) continue;
    for (int64_t j = 0; j < c; ++j) out[r * c + j] += packed[i * c + j];
  }
}

Tensor scatter_cpu(Tensor packed, Tensor indices, Tensor cu_seqlens, std::optional<Tensor> base,
               int64_t seq_len, bool add) {
  const char* op = "scatter";
  check_cpu(packed, op, "packed");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(packed.dim() == 2 && packed.size(0) == tk.capacity, op,
             ": packed must be [capacity, C] with capacity = ", tk.capacity);
  const int64_t c = packed.size(1);
  const ScalarType dt = packed.scalar_type();
  if (base.has_value()) {
    check_cpu(*base, op, "base");
    DTOP_CHECK(base->dim() == 2 && base->size(0) == tk.rows() && base->size(1) == c &&
               base->scalar_type() == dt, op, ": base must be [B * N, C] = [", tk.rows(), ", ",
               c, "] in packed's dtype");
  }
  if (add) {  // summed in the accumulation type, rounded once
    const ScalarType acc = acc_type(dt);
    Tensor out = base.has_value() ? as_type(*base, acc)
                                  : new_zeros(packed, Sizes({tk.rows(), c}), acc);
    if (base.has_value() && out.const_data_ptr() == base->const_data_ptr())
      out = so::clone(out);  // as_type returned base itself: the output is a new tensor
    Tensor p = as_type(packed, acc);
    if (acc == ScalarType::Double)
      add_rows(static_cast<double*>(out.mutable_data_ptr()),
               static_cast<const double*>(p.const_data_ptr()), tk, c);
    else
      add_rows(static_cast<float*>(out.mutable_data_ptr()),
               static_cast<const float*>(p.const_data_ptr()), tk, c);
    return out.scalar_type() == dt ? out : so::to(out, dt);
  }
  Tensor out = base.has_value() ? so::contiguous(so::clone(*base))
                                : new_zeros(packed, Sizes({tk.rows(), c}), dt);
  Tensor p = contig(packed);
  const size_t row_bytes = static_cast<size_t>(c) * p.element_size();
  const char* src = static_cast<const char*>(p.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  for (int64_t i = 0; i < tk.total; ++i) {
    const int64_t r = tk.indices[i];
    if (tk.in_range(r) && row_bytes) std::memcpy(dst + r * row_bytes, src + i * row_bytes, row_bytes);
  }
  return out;
}

// ------------------------------------------------------------------ LayerNorm
template <typename A>
void layer_norm_rows(const A* x, const A* w, const A* b, A* y, A* mean, A* rstd, int64_t rows,
                     int64_t c, double eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const A* xi = x + i * c;
    A m = 0;
    for (int64_t j = 0; j < c; ++j) m += xi[j];
    m /= static_cast<A>(c);
    A v = 0;
    for (int64_t j = 0; j < c; ++j) v += (xi[j] - m) * (xi[j] - m);
    v /= static_cast<A>(c);
    const A r = static_cast<A>(1) / std::sqrt(v + static_cast<A>(eps));
    for (int64_t j = 0; j < c; ++j) y[i * c + j] = (xi[j] - m) * r * w[j] + b[j];
    mean[i] = m;
    rstd[i] = r;
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_cpu(Tensor x2d, Tensor weight, Tensor bias,
                                                      Tensor indices, Tensor cu_seqlens,
                                                      int64_t seq_len, double eps,
                                                      bool gather_rows) {
  const char* op = "layer_norm";
  check_cpu(x2d, op, "x2d");
  check_cpu(weight, op, "weight");
  check_cpu(bias, op, "bias");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(x2d.dim() == 2, op, ": x2d must be 2-D");
  const int64_t c = x2d.size(1);
  DTOP_CHECK(weight.dim() == 1 && weight.size(0) == c && bias.dim() == 1 && bias.size(0) == c,
             op, ": weight and bias must be [C] = [", c, "]");
  DTOP_CHECK(x2d.size(0) == (gather_rows ? tk.rows() : tk.capacity), op, ": x2d must have ",
             gather_rows ? "B * N" : "capacity", " rows");
  const ScalarType dt = x2d.scalar_type(), acc = acc_type(dt);
  Tensor rows = gather_rows ? gather_cpu(x2d, indices, cu_seqlens, seq_len) : contig(x2d);
  // only the T token rows are normalized; the padding rows stay zero
  Tensor xf = as_type(rows, acc), wf = as_type(weight, acc), bf = as_type(bias, acc);
  Tensor y = new_zeros(xf, Sizes({tk.capacity, c}), acc);
  Tensor mean = new_zeros(xf, Sizes({tk.capacity}), acc);
  Tensor rstd = new_zeros(xf, Sizes({tk.capacity}), acc);
  if (acc == ScalarType::Double)
    layer_norm_rows(static_cast<const double*>(xf.const_data_ptr()),
                    static_cast<const double*>(wf.const_data_ptr()),
                    static_cast<const double*>(bf.const_data_ptr()),
                    static_cast<double*>(y.mutable_data_ptr()),
                    static_cast<double*>(mean.mutable_data_ptr()),
                    static_cast<double*>(rstd.mutable_data_ptr()), tk.total, c, eps);
  else
    layer_norm_rows(static_cast<const float*>(xf.const_data_ptr()),
                    static_cast<const float*>(wf.const_data_ptr()),
                    static_cast<const float*>(bf.const_data_ptr()),
                    static_cast<float*>(y.mutable_data_ptr()),
                    static_cast<float*>(mean.mutable_data_ptr()),
                    static_cast<float*>(rstd.mutable_data_ptr()), tk.total, c, eps);
  Tensor xp = gather_rows ? rows : new_empty(x2d, Sizes({0}), dt);
  return {y.scalar_type() == dt ? y : so::to(y, dt), xp, mean, rstd};
}

// ------------------------------------------------------------------ attention
template <typename A>
bool finite_row(const A* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

// aten::scaled_dot_product_attention(q, k, v, scale=scale) through the dispatcher.
Tensor sdpa(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  using torch::stable::detail::from;
  std::array<StableIValue, 8> stack{from(q), from(k), from(v), from(std::optional<Tensor>()),
                                    from(0.0), from(false), from(std::optional<double>(scale)),
                                    from(false)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::scaled_dot_product_attention", "",
                                                      stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// out [cap_q, H, Dv] (acc, zeroed), logits [max_q, cap_k] (acc, zeroed) or null.
template <typename A>
void attention_image(const Tensor& qf, const Tensor& kf, const Tensor& vf, A* out, A* logits,
                     int64_t q0, int64_t q1, int64_t k0, int64_t k1, int64_t max_q,
                     int64_t cap_k, double scale) {
  const int64_t h = qf.size(1), d = qf.size(2), dv = vf.size(2);
  const int64_t nq = q1 - q0, nk = k1 - k0;
  if (nq <= 0 || nk <= 0) return;  // an image without keys gives zero rows
  Tensor qa = qf, ka = kf, va = vf;
  Tensor qi = so::transpose(so::narrow(qa, 0, q0, nq), 0, 1);          // [H, nq, D]
  Tensor kt = so::transpose(so::transpose(so::narrow(ka, 0, k0, nk), 0, 1), 1, 2);  // [H, D, nk]
  Tensor vi = so::transpose(so::narrow(va, 0, k0, nk), 0, 1);          // [H, nk, Dv]
  const A sc = static_cast<A>(scale);
  if (logits) {  // head-mean pre-softmax logits of the first max_q queries
    Tensor s = contig(so::matmul(qi, kt));  // [H, nq, nk]
    const A* sp = static_cast<const A*>(s.const_data_ptr());
    for (int64_t r = 0; r < std::min(nq, max_q); ++r)
      for (int64_t j = 0; j < nk; ++j) {
        A acc = 0;
        for (int64_t hh = 0; hh < h; ++hh) acc += sp[(hh * nq + r) * nk + j];
        logits[r * cap_k + k0 + j] = acc / static_cast<A>(h) * sc;
      }
  }
  // softmax(q k^T * scale) v: PyTorch's fused CPU attention (4-D inputs), as the reference
  Tensor o = contig(sdpa(so::unsqueeze(qi, 0), so::unsqueeze(so::transpose(kt, 1, 2), 0),
                         so::unsqueeze(vi, 0), scale));  // [1, H, nq, Dv]
  const A* op = static_cast<const A*>(o.const_data_ptr());
  // the non-finite rule (as every backend): a non-finite query row, or a non-finite key or value
  // row of the image (per head), makes the output row NaN
  const A* qp = static_cast<const A*>(qf.const_data_ptr());
  const A* kp = static_cast<const A*>(kf.const_data_ptr());
  const A* vp = static_cast<const A*>(vf.const_data_ptr());
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (int64_t hh = 0; hh < h; ++hh) {
    bool kv_bad = false;
    for (int64_t j = k0; j < k1 && !kv_bad; ++j)
      kv_bad = !finite_row(kp + (j * h + hh) * d, d) || !finite_row(vp + (j * h + hh) * dv, dv);
    for (int64_t r = 0; r < nq; ++r) {
      const bool bad = kv_bad || !finite_row(qp + ((q0 + r) * h + hh) * d, d);
      A* dst = out + ((q0 + r) * h + hh) * dv;
      const A* src = op + (hh * nq + r) * dv;
      for (int64_t e = 0; e < dv; ++e) dst[e] = bad ? nan : src[e];
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_cpu(Tensor q, Tensor k, Tensor v,
                                                    Tensor cu_seqlens_q, Tensor cu_seqlens_k,
                                                    int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                    double scale, bool return_logits) {
  const char* op = "varlen_attention";
  check_cpu(q, op, "q");
  check_cpu(k, op, "k");
  check_cpu(v, op, "v");
  DTOP_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op,
             ": q, k, v must be [tokens, heads, head_dim]");
  DTOP_CHECK(k.size(1) == q.size(1) && v.size(1) == q.size(1) && k.size(2) == q.size(2) &&
             v.size(0) == k.size(0), op, ": q [Tq, H, D], k [Tk, H, D] and v [Tk, H, Dv] "
             "disagree");
  const ScalarType dt = q.scalar_type(), acc = acc_type(dt);
  DTOP_CHECK(is_float_type(dt) && k.scalar_type() == dt && v.scalar_type() == dt, op,
             ": q, k, v must share one floating-point dtype");
  check_cpu(cu_seqlens_q, op, "cu_seqlens_q");
  check_cpu(cu_seqlens_k, op, "cu_seqlens_k");
  check_offsets(cu_seqlens_q, op, "cu_seqlens_q");
  check_offsets(cu_seqlens_k, op, "cu_seqlens_k");
  const std::vector<int32_t> cuq = read_offsets(cu_seqlens_q), cuk = read_offsets(cu_seqlens_k);
  DTOP_CHECK(cuq.size() == cuk.size(), op, ": cu_seqlens_q and cu_seqlens_k must have B + 1 "
             "entries each");
  DTOP_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q/k must be >= 0");
  const int64_t cap_q = q.size(0), cap_k = k.size(0), h = q.size(1), dv = v.size(2);
  Tensor qf = as_type(q, acc), kf = as_type(k, acc), vf = as_type(v, acc);
  Tensor out = new_zeros(qf, Sizes({cap_q, h, dv}), acc);
  Tensor logits = return_logits ? new_zeros(qf, Sizes({max_seqlen_q, cap_k}), acc)
                                : new_empty(q, Sizes({0}), dt);
  for (size_t b = 0; b + 1 < cuq.size(); ++b) {
    const int64_t q0 = std::min<int64_t>(std::max(cuq[b], 0), cap_q);
    const int64_t q1 = std::min<int64_t>(std::max(cuq[b + 1], 0), cap_q);
    const int64_t k0 = std::min<int64_t>(std::max(cuk[b], 0), cap_k);
    const int64_t k1 = std::min<int64_t>(std::max(cuk[b + 1], 0), cap_k);
    if (acc == ScalarType::Double)
      attention_image<double>(qf, kf, vf, static_cast<double*>(out.mutable_data_ptr()),
                              return_logits ? static_cast<double*>(logits.mutable_data_ptr())
                                            : nullptr,
                              q0, q1, k0, k1, max_seqlen_q, cap_k, scale);
    else
      attention_image<float>(qf, kf, vf, static_cast<float*>(out.mutable_data_ptr()),
                             return_logits ? static_cast<float*>(logits.mutable_data_ptr())
                                           : nullptr,
                             q0, q1, k0, k1, max_seqlen_q, cap_k, scale);
  }
  if (return_logits && dt != acc) logits = so::to(logits, dt);
  Tensor lse = new_empty(q, Sizes({0}), ScalarType::Float);
  return {dt == acc ? out : so::to(out, dt), lse, logits};
}

// ------------------------------------------------------------------ packed linear
std::tuple<Tensor, Tensor> packed_linear_cpu(Tensor x2d, Tensor weight, std::optional<Tensor> bias,
                                         std::optional<Tensor> residual,
                                         std::optional<Tensor> base, Tensor indices,
                                         Tensor cu_seqlens, int64_t seq_len, int64_t act,
                                         bool gather_rows, bool save_pre) {
  const char* op = "packed_linear";
  check_cpu(x2d, op, "x2d");
  check_cpu(weight, op, "weight");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(act == 0 || act == 1, op, ": act must be 0 (none) or 1 (exact GELU); got ", act);
  DTOP_CHECK(x2d.dim() == 2 && weight.dim() == 2 && weight.size(1) == x2d.size(1), op,
             ": x2d [rows, K] and weight [N_out, K] disagree");
  DTOP_CHECK(x2d.size(0) == (gather_rows ? tk.rows() : tk.capacity), op, ": x2d must have ",
             gather_rows ? "B * N" : "capacity", " rows");
  const ScalarType dt = x2d.scalar_type(), acc = acc_type(dt);
  const int64_t n = weight.size(0), cap = tk.capacity;
  Tensor rows = gather_rows ? gather_cpu(x2d, indices, cu_seqlens, seq_len) : x2d;
  // the product on the T token rows only: the padding rows (the pruned tokens) cost nothing
  Tensor z = contig(so::matmul(as_type(so::narrow(rows, 0, 0, tk.total), acc),
                               so::transpose(as_type(weight, acc), 0, 1)));
  auto run = [&](auto* zp) {
    using A = std::remove_pointer_t<decltype(zp)>;
    const A* bp = nullptr;
    Tensor bf, rf;
    if (bias.has_value()) {
      DTOP_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N_out]");
      bf = as_type(*bias, acc);
      bp = static_cast<const A*>(bf.const_data_ptr());
    }
    const A* rp = nullptr;
    if (residual.has_value()) {
      DTOP_CHECK(residual->dim() == 2 && residual->size(0) == cap && residual->size(1) == n, op,
                 ": residual must be [capacity, N_out]");
      rf = as_type(*residual, acc);
      rp = static_cast<const A*>(rf.const_data_ptr());
    }
    Tensor pre = save_pre ? new_zeros(z, Sizes({cap, n}), acc) : new_empty(x2d, Sizes({0}), dt);
    A* pp = save_pre ? static_cast<A*>(pre.mutable_data_ptr()) : nullptr;
    Tensor y = new_zeros(z, Sizes({cap, n}), acc);
    A* yp = static_cast<A*>(y.mutable_data_ptr());
    for (int64_t i = 0; i < tk.total; ++i)
      for (int64_t j = 0; j < n; ++j) {
        A v = zp[i * n + j] + (bp ? bp[j] : A(0));
        if (pp) pp[i * n + j] = v;
        if (act == 1) v = A(0.5) * v * (A(1) + std::erf(v * A(0.7071067811865476)));
        yp[i * n + j] = v + (rp ? rp[i * n + j] : A(0));
      }
    if (save_pre && dt != acc) pre = so::to(pre, dt);
    if (dt != acc) y = so::to(y, dt);
    if (base.has_value()) {
      DTOP_CHECK(base->dim() == 2 && base->size(0) == tk.rows() && base->size(1) == n, op,
                 ": base must be [B * N, N_out]");
      y = scatter_cpu(y, indices, cu_seqlens, *base, seq_len, false);
    }
    return std::tuple<Tensor, Tensor>{y, pre};
  };
  if (acc == ScalarType::Double) return run(static_cast<double*>(z.mutable_data_ptr()));
  return run(static_cast<float*>(z.mutable_data_ptr()));
}

// ------------------------------------------------------------------ the DToP exit rule
std::tuple<Tensor, Tensor, Tensor> select_cpu(Tensor class_logits, Tensor mask_logits,
                                          Tensor indices, Tensor cu_seqlens, int64_t seq_len,
                                          int64_t max_seqlen, double threshold, int64_t top_k) {
  const char* op = "select";
  check_cpu(class_logits, op, "class_logits");
  check_cpu(mask_logits, op, "mask_logits");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(class_logits.dim() == 3 && class_logits.size(0) == tk.batch &&
             class_logits.size(2) == 2, op, ": class_logits must be [B, K, 2] with B = ",
             tk.batch);
  const int64_t kc = class_logits.size(1), cap = tk.capacity;
  DTOP_CHECK(mask_logits.dim() == 2 && mask_logits.size(0) == kc && mask_logits.size(1) == cap,
             op, ": mask_logits must be [K, capacity] = [", kc, ", ", cap, "]");
  DTOP_CHECK(top_k >= 0 && max_seqlen >= 0, op, ": top_k and max_seqlen must be >= 0");
  // sigmoid through aten (bit for bit the reference's); products and comparisons in float32
  Tensor cl = as_type(class_logits, ScalarType::Float);
  const float* clp = static_cast<const float*>(cl.const_data_ptr());
  Tensor diff = new_empty(cl, Sizes({tk.batch, kc}), ScalarType::Float);
  float* dp = static_cast<float*>(diff.mutable_data_ptr());
  for (int64_t i = 0; i < tk.batch * kc; ++i) dp[i] = clp[2 * i] - clp[2 * i + 1];
  Tensor present = contig(call1("aten::sigmoid", "", diff));
  Tensor ms = contig(call1("aten::sigmoid", "", as_type(mask_logits, ScalarType::Float)));
  const float* pp = static_cast<const float*>(present.const_data_ptr());
  const float* mp = static_cast<const float*>(ms.const_data_ptr());

  std::vector<float> conf(cap, 0.f);
  std::vector<int64_t> label(cap, 0), image(cap, tk.batch);
  for (int64_t b = 0; b < tk.batch; ++b)
    for (int64_t i = tk.begin(b); i < std::max(tk.begin(b), tk.end(b)); ++i) image[i] = b;
  for (int64_t i = 0; i < tk.total; ++i) {
    const int64_t b = image[i];
    if (b >= tk.batch) continue;
    // max over classes as torch.max: the first NaN wins, else the lowest class on ties
    float best = 0.f;
    int64_t arg = 0;
    for (int64_t c = 0; c < kc; ++c) {
      float s = pp[b * kc + c] * mp[c * cap + i];
      if (s < kTiny) s = 0.f;  // NaN stays NaN
      if (c == 0 || std::isnan(s) || s > best) {
        best = s;
        arg = c;
      }
      if (std::isnan(best)) break;
    }
    conf[i] = best;
    label[i] = arg;
  }
  // per (image, label): candidates (conf > threshold) ranked by conf, then slot; past top_k exit
  std::vector<std::vector<int64_t>> groups(static_cast<size_t>(tk.batch * kc));
  for (int64_t i = 0; i < tk.total; ++i)
    if (image[i] < tk.batch && conf[i] > static_cast<float>(threshold))
      groups[image[i] * kc + label[i]].push_back(i);
  std::vector<uint8_t> exits(cap, 0);
  for (auto& g : groups) {
    if (static_cast<int64_t>(g.size()) <= top_k) continue;
    std::stable_sort(g.begin(), g.end(), [&](int64_t a, int64_t b) { return conf[a] > conf[b]; });
    for (size_t r = static_cast<size_t>(top_k); r < g.size(); ++r) exits[g[r]] = 1;
  }
  Tensor next = new_empty(indices, Sizes({cap}), ScalarType::Int);
  Tensor next_cu = new_zeros(indices, Sizes({tk.batch + 1}), ScalarType::Int);
  Tensor exited = new_zeros(indices, Sizes({tk.batch, tk.seq_len}), ScalarType::Bool);
  int32_t* np = static_cast<int32_t*>(next.mutable_data_ptr());
  int32_t* cp = static_cast<int32_t*>(next_cu.mutable_data_ptr());
  bool* ep = static_cast<bool*>(exited.mutable_data_ptr());
  int64_t kept = 0;
  for (int64_t b = 0; b < tk.batch; ++b) {
    for (int64_t i = tk.begin(b); i < tk.end(b) && i < tk.total; ++i) {
      if (exits[i]) {
        if (tk.in_range(tk.indices[i])) ep[tk.indices[i]] = true;
      } else {
        np[kept++] = tk.indices[i];
      }
    }
    cp[b + 1] = static_cast<int32_t>(kept);
  }
  for (int64_t i = kept; i < cap; ++i) np[i] = -1;
  return {next, next_cu, exited};
}

}  // namespace

// One schema per op (csrc/oplib/schemas.h). The Python package registers each op's fake (meta)
// implementation on these names; see dtop_kernels/ops/native.py.
STABLE_TORCH_LIBRARY(dtop, m) { dtop_oplib::define_schemas(m); }

STABLE_TORCH_LIBRARY_IMPL(dtop, CPU, m) {
  m.impl("gather", TORCH_BOX(&gather_cpu));
  m.impl("scatter", TORCH_BOX(&scatter_cpu));
  m.impl("layer_norm", TORCH_BOX(&layer_norm_cpu));
  m.impl("varlen_attention", TORCH_BOX(&varlen_attention_cpu));
  m.impl("packed_linear", TORCH_BOX(&packed_linear_cpu));
  m.impl("select", TORCH_BOX(&select_cpu));
}

// The library's identity, read by dtop_kernels.ops_library_info() and by a deployment's check
// that a package and a library match (C linkage: the only symbols the library exports).
extern "C" __attribute__((visibility("default"))) const char* dtop_ops_library_version() {
  return DTOP_OPS_VERSION;
}
