// The CUDA implementations of the dtop:: ops in the op library: the kernels of csrc/ (their host
// entry points, csrc/ops.h) behind PyTorch's stable ABI. What the Python launchers
// (dtop_kernels/cuda/*.py) do for the pybind11 module, done here in C++: argument checks,
// output allocation, the current stream; no host synchronization (the token count T stays on
// the device, as in every kernel of csrc/).
//
// Built into the op library when the CUDA kernels are built against a CUDA build of PyTorch.
// The CUDA emulator (tests/cuda_emulator) compiles this file with DTOP_OPS_EMULATED: the same
// code then registers the ops under a namespace of the build (dtop_emu_memcheck, dtop_emu_race)
// for CPU tensors, runs the kernels on the emulator, and the tests compare them with the CPU
// implementations.

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#ifndef DTOP_OPS_EMULATED
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#endif

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "schemas.h"
#include "stable_util.h"

namespace {

using namespace dtop_oplib;  // NOLINT: Tensor, ScalarType, Sizes, contig, new_empty, ...
namespace so = torch::stable;

#ifdef DTOP_OPS_EMULATED
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

// The stream and device of a call: the current stream of the tensor's device, that device made
// current for the launch (the emulator: no stream, CPU tensors).
struct Launch {
  std::unique_ptr<so::accelerator::DeviceGuard> guard;
  void* stream = nullptr;
  explicit Launch(const Tensor& t) {
    if (kEmulated) return;
#ifndef DTOP_OPS_EMULATED
    const int32_t index = t.get_device_index();
    guard = std::make_unique<so::accelerator::DeviceGuard>(index);
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(index, &stream));
#endif
  }
};

void check_device(const Tensor& t, const char* op, const char* name) {
  if (kEmulated) {
    DTOP_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor (emulated CUDA)");
  } else {
    DTOP_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here");
  }
}

// The kernels' dtype codes: 0 float32, 1 float16, 2 bfloat16.
int dtype_code(ScalarType t, const char* op, const char* name, bool half_only = false) {
  if (t == ScalarType::Half) return 1;
  if (t == ScalarType::BFloat16) return 2;
  DTOP_CHECK(!half_only && t == ScalarType::Float, op, ": ", name, " must be ",
             half_only ? "float16 or bfloat16 (tensor cores)" : "float32, float16 or bfloat16",
             " on CUDA");
  return 0;
}

// Contiguous with a 16-byte aligned base (the 16-byte loads of the tensor-core kernels).
Tensor aligned(const Tensor& t) {
  Tensor c = contig(t);
  if (reinterpret_cast<std::uintptr_t>(c.const_data_ptr()) % 16 != 0) c = so::clone(c);
  return c;
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// The token set's shapes (nothing is read from the device).
struct Tokens {
  Tensor indices, cu;
  int64_t batch, capacity, seq_len;
  int64_t rows() const { return batch * seq_len; }
};

Tokens token_set(const Tensor& indices, const Tensor& cu_seqlens, int64_t seq_len,
                 const char* op) {
  check_device(indices, op, "indices");
  check_device(cu_seqlens, op, "cu_seqlens");
  check_token_set(indices, cu_seqlens, seq_len, op);
  return {contig(indices), contig(cu_seqlens), cu_seqlens.size(0) - 1, indices.size(0), seq_len};
}

// ------------------------------------------------------------------ gather / scatter
Tensor gather_cuda(Tensor x2d, Tensor indices, Tensor cu_seqlens, int64_t seq_len) {
  const char* op = "gather";
  check_device(x2d, op, "x2d");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(x2d.dim() == 2 && x2d.size(0) == tk.rows(), op, ": x2d must be [B * N, C] = [",
             tk.rows(), ", C]");
  const int code = dtype_code(x2d.scalar_type(), op, "x2d");
  Tensor x = contig(x2d);
  const int64_t c = x.size(1);
  Tensor out = new_empty(x, {tk.capacity, c}, x.scalar_type());
  if (out.numel() == 0) return out;
  if (x.numel() == 0) return so::zero_(out);  // no rows: everything is padding
  Launch launch(x);
  dtop::gather_rows(x.const_data_ptr(), ptr<const int32_t>(tk.indices), ptr<const int32_t>(tk.cu),
                    out.data_ptr(), tk.batch, tk.rows(), tk.capacity, c, code, launch.stream);
  return out;
}

Tensor scatter_cuda(Tensor packed, Tensor indices, Tensor cu_seqlens, std::optional<Tensor> base,
                    int64_t seq_len, bool add) {
  const char* op = "scatter";
  check_device(packed, op, "packed");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(packed.dim() == 2 && packed.size(0) == tk.capacity, op,
             ": packed must be [capacity, C] with capacity = ", tk.capacity);
  const int64_t c = packed.size(1);
  const int code = dtype_code(packed.scalar_type(), op, "packed");
  Tensor out;
  if (base.has_value()) {
    check_device(*base, op, "base");
    DTOP_CHECK(base->dim() == 2 && base->size(0) == tk.rows() && base->size(1) == c &&
               base->scalar_type() == packed.scalar_type(), op, ": base must be [B * N, C] = [",
               tk.rows(), ", ", c, "] in packed's dtype");
    out = so::contiguous(so::clone(*base));
  } else {
    out = new_zeros(packed, {tk.rows(), c}, packed.scalar_type());
  }
  if (packed.numel() == 0 || out.numel() == 0) return out;
  Tensor p = contig(packed);
  Launch launch(p);
  dtop::scatter_rows(p.const_data_ptr(), ptr<const int32_t>(tk.indices),
                     ptr<const int32_t>(tk.cu), out.data_ptr(), tk.batch, tk.rows(),
                     tk.capacity, c, code, add, launch.stream);
  return out;
}

// ------------------------------------------------------------------ LayerNorm
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_cuda(Tensor x2d, Tensor weight,
                                                           Tensor bias, Tensor indices,
                                                           Tensor cu_seqlens, int64_t seq_len,
                                                           double eps, bool gather_rows) {
  const char* op = "layer_norm";
  check_device(x2d, op, "x2d");
  check_device(weight, op, "weight");
  check_device(bias, op, "bias");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(x2d.dim() == 2, op, ": x2d must be 2-D");
  const int64_t c = x2d.size(1), cap = tk.capacity;
  DTOP_CHECK(x2d.size(0) == (gather_rows ? tk.rows() : cap), op, ": x2d must have ",
             gather_rows ? "B * N" : "capacity", " rows");
  DTOP_CHECK(weight.dim() == 1 && weight.size(0) == c && bias.dim() == 1 && bias.size(0) == c,
             op, ": weight and bias must be [C] = [", c, "]");
  const ScalarType dt = x2d.scalar_type();
  const int code = dtype_code(dt, op, "x2d");
  DTOP_CHECK((weight.scalar_type() == dt || weight.scalar_type() == ScalarType::Float) &&
             bias.scalar_type() == weight.scalar_type(), op, ": weight and bias must share "
             "x2d's dtype or float32");
  DTOP_CHECK(eps >= 0.0, op, ": eps must be >= 0");
  Tensor x = contig(x2d), w = contig(weight), b = contig(bias);
  Tensor y = new_empty(x, {cap, c}, dt);
  Tensor xp = gather_rows ? new_empty(x, {cap, c}, dt) : new_empty(x, {0}, dt);
  Tensor mean = new_empty(x, {cap}, ScalarType::Float);
  Tensor rstd = new_empty(x, {cap}, ScalarType::Float);
  if (cap == 0 || c == 0) return {y, xp, mean, rstd};
  Launch launch(x);
  dtop::layernorm_fwd(x.const_data_ptr(), ptr<const int32_t>(tk.indices),
                      ptr<const int32_t>(tk.cu), w.const_data_ptr(), b.const_data_ptr(),
                      y.data_ptr(), gather_rows ? xp.data_ptr() : nullptr, ptr<float>(mean),
                      ptr<float>(rstd), tk.batch, x.size(0), cap, c, c, c, c, eps, gather_rows,
                      code, dtype_code(w.scalar_type(), op, "weight"), launch.stream);
  return {y, xp, mean, rstd};
}

// ------------------------------------------------------------------ packed linear
std::tuple<Tensor, Tensor> packed_linear_cuda(Tensor x2d, Tensor weight, std::optional<Tensor> bias,
                                              std::optional<Tensor> residual,
                                              std::optional<Tensor> base, Tensor indices,
                                              Tensor cu_seqlens, int64_t seq_len, int64_t act,
                                              bool gather_rows, bool save_pre) {
  const char* op = "packed_linear";
  check_device(x2d, op, "x2d");
  check_device(weight, op, "weight");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(act == 0 || act == 1, op, ": act must be 0 (none) or 1 (exact GELU); got ", act);
  DTOP_CHECK(x2d.dim() == 2 && weight.dim() == 2 && weight.size(1) == x2d.size(1), op,
             ": x2d [rows, K] and weight [N_out, K] disagree");
  const int64_t cap = tk.capacity, k = x2d.size(1), n = weight.size(0);
  DTOP_CHECK(x2d.size(0) == (gather_rows ? tk.rows() : cap), op, ": x2d must have ",
             gather_rows ? "B * N" : "capacity", " rows");
  const ScalarType dt = x2d.scalar_type();
  const int code = dtype_code(dt, op, "x2d", /*half_only=*/true);
  DTOP_CHECK(weight.scalar_type() == dt, op, ": weight must be x2d's dtype");
  DTOP_CHECK(n % 8 == 0 && k % 8 == 0, op, ": the CUDA linear kernel needs in and out features "
             "that are multiples of 8; got ", k, " -> ", n);
  Tensor x = aligned(x2d), w = aligned(weight), b, r;
  if (bias.has_value()) {
    check_device(*bias, op, "bias");
    DTOP_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == dt, op,
               ": bias must be [N_out] in x2d's dtype");
    b = aligned(*bias);
  }
  if (residual.has_value()) {
    check_device(*residual, op, "residual");
    DTOP_CHECK(residual->dim() == 2 && residual->size(0) == cap && residual->size(1) == n &&
               residual->scalar_type() == dt, op, ": residual must be [capacity, N_out] in "
               "x2d's dtype");
    r = aligned(*residual);
  }
  Tensor y;
  if (base.has_value()) {
    check_device(*base, op, "base");
    DTOP_CHECK(base->dim() == 2 && base->size(0) == tk.rows() && base->size(1) == n &&
               base->scalar_type() == dt, op, ": base must be [B * N, N_out] in x2d's dtype");
    y = aligned(so::clone(*base));
  } else {
    y = new_empty(x, {cap, n}, dt);
  }
  Tensor pre = save_pre ? new_empty(x, {cap, n}, dt) : new_empty(x, {0}, dt);
  if (cap == 0 || n == 0) return {y, pre};
  const int32_t* idx = ptr<const int32_t>(tk.indices);
  Launch launch(x);
  dtop::linear_fwd(x.const_data_ptr(), gather_rows ? idx : nullptr, w.const_data_ptr(),
                   bias.has_value() ? b.const_data_ptr() : nullptr,
                   residual.has_value() ? r.const_data_ptr() : nullptr,
                   save_pre ? pre.data_ptr() : nullptr, y.data_ptr(),
                   base.has_value() ? idx : nullptr, ptr<const int32_t>(tk.cu), tk.batch, cap, n,
                   k, k, k, n, n, n, tk.rows(), static_cast<int>(act), code, launch.stream);
  return {y, pre};
}

// ------------------------------------------------------------------ the DToP exit rule
std::tuple<Tensor, Tensor, Tensor> select_cuda(Tensor class_logits, Tensor mask_logits,
                                               Tensor indices, Tensor cu_seqlens,
                                               int64_t seq_len, int64_t max_seqlen,
                                               double threshold, int64_t top_k) {
  const char* op = "select";
  check_device(class_logits, op, "class_logits");
  check_device(mask_logits, op, "mask_logits");
  Tokens tk = token_set(indices, cu_seqlens, seq_len, op);
  DTOP_CHECK(class_logits.dim() == 3 && class_logits.size(0) == tk.batch &&
             class_logits.size(2) == 2, op, ": class_logits must be [B, K, 2] with B = ",
             tk.batch);
  const int64_t kc = class_logits.size(1), cap = tk.capacity;
  DTOP_CHECK(mask_logits.dim() == 2 && mask_logits.size(0) == kc && mask_logits.size(1) == cap,
             op, ": mask_logits must be [K, capacity] = [", kc, ", ", cap, "]");
  DTOP_CHECK(kc >= 1 && kc <= 12288, op, ": the number of classes must be in [1, 12288]");
  DTOP_CHECK(tk.batch <= 65535, op, ": batch size must be <= 65535 (split the batch)");
  DTOP_CHECK(top_k >= 0 && max_seqlen >= 0 && max_seqlen <= seq_len, op,
             ": top_k must be >= 0 and max_seqlen in [0, seq_len]");
  DTOP_CHECK(!std::isnan(threshold), op, ": threshold is NaN");
  Tensor cl = contig(class_logits), ml = contig(mask_logits);
  Tensor next = new_empty(tk.indices, {cap}, ScalarType::Int);
  Tensor next_cu = new_empty(tk.indices, {tk.batch + 1}, ScalarType::Int);
  Tensor exited = new_empty(tk.indices, {tk.batch, seq_len}, ScalarType::Bool);
  if (tk.batch == 0) return {so::clone(tk.indices), so::clone(tk.cu), exited};
  Launch launch(cl);
  const int64_t bytes = dtop::select_workspace_bytes(cap);
  Tensor raw = new_empty(cl, {bytes + 255}, ScalarType::Byte);  // aligned to 256 bytes below
  const auto base = reinterpret_cast<std::uintptr_t>(raw.data_ptr());
  void* workspace = reinterpret_cast<void*>((base + 255) / 256 * 256);
  dtop::dtop_select(cl.const_data_ptr(), ml.const_data_ptr(), ptr<const int32_t>(tk.indices),
                    ptr<const int32_t>(tk.cu), ptr<int32_t>(next), ptr<int32_t>(next_cu),
                    ptr<uint8_t>(exited), workspace, bytes, tk.batch, seq_len, cap, max_seqlen,
                    kc, cl.stride(0), cl.stride(1), ml.stride(0), threshold, top_k,
                    dtype_code(cl.scalar_type(), op, "class_logits"),
                    dtype_code(ml.scalar_type(), op, "mask_logits"), launch.stream);
  return {next, next_cu, exited};
}

// ------------------------------------------------------------------ attention
std::tuple<Tensor, Tensor, Tensor> varlen_attention_cuda(Tensor q, Tensor k, Tensor v,
                                                         Tensor cu_seqlens_q,
                                                         Tensor cu_seqlens_k,
                                                         int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double scale,
                                                         bool return_logits) {
  const char* op = "varlen_attention";
  check_device(q, op, "q");
  check_device(k, op, "k");
  check_device(v, op, "v");
  check_device(cu_seqlens_q, op, "cu_seqlens_q");
  check_device(cu_seqlens_k, op, "cu_seqlens_k");
  DTOP_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op,
             ": q, k, v must be [tokens, heads, head_dim]");
  DTOP_CHECK(k.size(1) == q.size(1) && k.size(2) == q.size(2) && v.size(0) == k.size(0) &&
             v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": the CUDA kernels need "
             "q [Tq, H, D], k and v [Tk, H, D] (one head dim)");
  const ScalarType dt = q.scalar_type();
  const int code = dtype_code(dt, op, "q", /*half_only=*/true);
  DTOP_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k, v must share a dtype");
  check_offsets(cu_seqlens_q, op, "cu_seqlens_q");
  check_offsets(cu_seqlens_k, op, "cu_seqlens_k");
  DTOP_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op, ": cu_seqlens_q and "
             "cu_seqlens_k must have B + 1 entries each");
  const int64_t tq = q.size(0), tk = k.size(0), h = q.size(1), d = q.size(2);
  const int64_t b = cu_seqlens_k.size(0) - 1;
  bool supported = false;
  for (int hd : dtop::attention_head_dims()) supported |= hd == d;
  DTOP_CHECK(supported, op, ": head dim ", d, " is not one the CUDA kernels are built for "
             "(32, 64, 80, 96, 128)");
  DTOP_CHECK(h >= 1 && h <= 65535 && b <= 65535, op, ": heads and batch must be <= 65535");
  DTOP_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q/k must be >= 0");
  DTOP_CHECK(!return_logits || tq == b * max_seqlen_q, op, ": the head-mean logits need "
             "max_seqlen_q queries for each image (Tq = B * max_seqlen_q)");
  Tensor qa = aligned(q), ka = aligned(k), va = aligned(v);
  Tensor cq = contig(cu_seqlens_q), ck = contig(cu_seqlens_k);
  Tensor out = new_zeros(qa, {tq, h, d}, dt);
  Tensor logits = return_logits ? new_zeros(qa, {max_seqlen_q, tk}, dt) : new_empty(qa, {0}, dt);
  Tensor lse_out = new_empty(qa, {0}, ScalarType::Float);  // the op returns none (as on CPU)
  if (b == 0 || tq == 0) return {out, lse_out, logits};
  Launch launch(qa);
  const int64_t st = h * d;  // token stride of the contiguous q, k, v, out; head stride d
  if (max_seqlen_q > 0) {
    Tensor lse = new_empty(qa, {h, tq}, ScalarType::Float);  // the forward's workspace
    dtop::attention_fwd(qa.const_data_ptr(), ka.const_data_ptr(), va.const_data_ptr(),
                        out.data_ptr(), ptr<float>(lse), ptr<const int32_t>(cq),
                        ptr<const int32_t>(ck), b, h, d, tq, tk, max_seqlen_q, st, d, st, d, st,
                        d, st, d, scale, code, launch.stream);
    dtop::attention_nonfinite_rows(qa.const_data_ptr(), ka.const_data_ptr(), va.const_data_ptr(),
                                   out.data_ptr(), ptr<const int32_t>(cq),
                                   ptr<const int32_t>(ck), b, h, d, tq, tk, st, d, st, d, st, d,
                                   st, d, code, launch.stream);
  }
  if (return_logits && max_seqlen_q > 0 && tk > 0 && max_seqlen_k > 0)
    dtop::attention_head_mean_logits(qa.const_data_ptr(), ka.const_data_ptr(), logits.data_ptr(),
                                     ptr<const int32_t>(ck), b, h, d, max_seqlen_q, tk,
                                     max_seqlen_k, st, d, st, d, tk, scale, code, launch.stream);
  return {out, lse_out, logits};
}

}  // namespace

// The emulator's builds define the ops anew in a namespace of their own (DTOP_OPS_EMULATED names
// it: one per build, so both load into one process) and register them for CPU tensors.
#define DTOP_DEFINE(ns, m) STABLE_TORCH_LIBRARY(ns, m)
#define DTOP_IMPL(ns, key, m) STABLE_TORCH_LIBRARY_IMPL(ns, key, m)
#ifdef DTOP_OPS_EMULATED
DTOP_DEFINE(DTOP_OPS_EMULATED, m) { dtop_oplib::define_schemas(m); }
DTOP_IMPL(DTOP_OPS_EMULATED, CPU, m) {
#else
DTOP_IMPL(dtop, CUDA, m) {
#endif
  m.impl("gather", TORCH_BOX(&gather_cuda));
  m.impl("scatter", TORCH_BOX(&scatter_cuda));
  m.impl("layer_norm", TORCH_BOX(&layer_norm_cuda));
  m.impl("packed_linear", TORCH_BOX(&packed_linear_cuda));
  m.impl("select", TORCH_BOX(&select_cuda));
  m.impl("varlen_attention", TORCH_BOX(&varlen_attention_cuda));
}
