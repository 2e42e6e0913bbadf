// The element-wise work of a decoder layer in one pass each, fp32 or bf16, on CPU: RMSNorm (with
// the residual addition before it), the rotary embedding of q and k in place on the fused q/k/v
// product (with Qwen3's per-head RMSNorm before it), and SiLU(gate) x up. And, on AMX, the layer's
// bf16 matrix products (`product`, at the end: why they are here).
//
// The arithmetic is transformers': the norm's statistics in fp32, the normalised value rounded to
// the dtype before the weight multiplies it; every product and sum of the rotary embedding and of
// SiLU x up rounded to the dtype, as torch's separate operations round them. What differs is only
// the order of the norm's sum of squares (fixed here: it depends on the row alone, never on the
// rows around it, so a row keeps its bits in any batch) and SiLU's exp (a few ulp of fp32 from
// torch's). torch runs each of these as several passes over the activations with fp32 copies in
// between (measured: 19% of a bf16 forward at Skywork-Reward-V2-Qwen3-0.6B's shape).
//
// Compiled without floating-point contraction: a product rounded before a sum must not become a
// fused multiply-add (transformers' rotary embedding rounds both products in fp32 too).

#pragma GCC optimize("fp-contract=off")

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * 4)));

// bf16 <-> fp32 by bits: a bf16 is the top half of an fp32. Rounding to nearest, ties to even, as
// torch's conversion; a NaN stays a NaN. Vectors of W values; a row's tail goes through the same
// arithmetic on a zero-padded vector, so every element gets the same operations wherever it is.
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));

inline vf splat(float x) { return vf{} + x; }

template <typename T>
inline vf load(const T* p, int64_t n = W);
template <>
inline vf load<float>(const float* p, int64_t n) {
  vf v = {};
  if (n >= W)  // a constant size: one vector load (the tail's variable size is a library call)
    std::memcpy(&v, p, 4 * W);
  else
    std::memcpy(&v, p, 4 * n);
  return v;
}
typedef uint16_t vh __attribute__((vector_size(W * 2)));  // W bf16 values as bits

template <>
inline vf load<at::BFloat16>(const at::BFloat16* p, int64_t n) {
  vh half = {};
  if (n >= W)
    std::memcpy(&half, p, 2 * W);
  else
    std::memcpy(&half, p, 2 * n);
  return (vf)(__builtin_convertvector(half, vu) << 16);  // one widening move, not W scalar ones
}

inline vu bf16_bits(vf x) {  // the bf16 nearest to each lane, in the low half of the lane
  const vu bits = (vu)x;
  const vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu nan = (bits >> 16) | 0x40u;  // quiet, sign and payload's top kept
  return (vu)((bits & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

template <typename T>
inline void store(T* p, vf x, int64_t n = W);
template <>
inline void store<float>(float* p, vf x, int64_t n) {
  if (n >= W)
    std::memcpy(p, &x, 4 * W);
  else
    std::memcpy(p, &x, 4 * n);
}
template <>
inline void store<at::BFloat16>(at::BFloat16* p, vf x, int64_t n) {
  const vh half = __builtin_convertvector(bf16_bits(x), vh);  // one narrowing move
  if (n >= W)
    std::memcpy(p, &half, 2 * W);
  else
    std::memcpy(p, &half, 2 * n);
}

// Each lane rounded to T, kept as fp32 (what torch holds between two operations in T).
template <typename T>
inline vf round_to(vf x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else {
    return (vf)(bf16_bits(x) << 16);
  }
}

// sum of x[i]^2 (x as fp32) in a fixed order: W partial sums over the row, then those in lane order.
template <typename T>
inline float sum_of_squares(const T* x, int64_t n) {
  vf acc = {};
  for (int64_t i = 0; i < n; i += W) {
    const vf v = load(x + i, n - i);
    acc += v * v;
  }
  float total = 0.0f;
  for (int j = 0; j < W; ++j) total += acc[j];
  return total;
}

// transformers' RMSNorm of one row: weight * round(x * rsqrt(mean(x^2) + eps)).
template <typename T>
inline void norm_row(const T* x, const T* weight, float eps, T* out, int64_t n) {
  const vf r = splat(1.0f / std::sqrt(sum_of_squares(x, n) / float(n) + eps));
  for (int64_t i = 0; i < n; i += W)
    store(out + i, load(weight + i, n - i) * round_to<T>(load(x + i, n - i) * r), n - i);
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": expected [rows, features] with contiguous features");
}

template <typename F>
void by_rows(int64_t rows, int64_t cost_per_row, const F& f) {
  // rows are independent: each thread takes a range; a row's arithmetic never depends on it
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cost_per_row)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) f(r);
                   });
}

template <typename T>
void rms_norm_impl(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* xs = x.data_ptr<T>();
  const T* ds = delta ? delta->data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  T* os = out.data_ptr<T>();
  const int64_t xr = x.stride(0), dr = delta ? delta->stride(0) : 0, orr = out.stride(0);
  by_rows(rows, n, [&](int64_t r) {
    T* row = xs + r * xr;
    if (ds) {  // the residual addition, rounded to T as torch's add rounds it
      const T* d = ds + r * dr;
      for (int64_t i = 0; i < n; i += W) store(row + i, load(row + i, n - i) + load(d + i, n - i), n - i);
    }
    norm_row(row, w, float(eps), os + r * orr, n);
  });
}

// out = RMSNorm(x); with `delta`, first x += delta in place (the residual), then out = RMSNorm(x).
void rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps,
              at::Tensor out) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: out must match x, weight must be [features]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "rms_norm: one dtype for x, weight and out");
  const at::Tensor* d = nullptr;
  if (delta.has_value()) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(), "rms_norm: delta must match x");
    d = &*delta;
  }
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(x, d, weight, eps, out);
  else if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl<at::BFloat16>(x, d, weight, eps, out);
  else
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
}

template <typename T>
void rotary_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t dim,
                 const at::Tensor* q_weight, const at::Tensor* k_weight, float eps) {
  const int64_t rows = qkv.size(0), stride = qkv.stride(0), half = dim / 2;
  T* base = qkv.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  const int64_t cr = cos.stride(0), sr = sin.stride(0);
  const T* qw = q_weight ? q_weight->data_ptr<T>() : nullptr;
  const T* kw = k_weight ? k_weight->data_ptr<T>() : nullptr;
  const int64_t q_heads = heads;  // the first `heads` heads of a row are queries, the rest of `heads_qk` keys
  const int64_t heads_qk = qkv.size(1) / dim;
  by_rows(rows, heads_qk * dim, [&](int64_t r) {
    std::vector<float> x(dim + W);  // the head as fp32 (normed when asked), read before it is overwritten
    const T* cosr = c + r * cr;
    const T* sinr = s + r * sr;
    for (int64_t h = 0; h < heads_qk; ++h) {
      T* head = base + r * stride + h * dim;
      const T* w = h < q_heads ? qw : kw;
      if (w != nullptr) {  // Qwen3: RMSNorm over the head, rounded to T, before the rotation
        const vf inv = splat(1.0f / std::sqrt(sum_of_squares(head, dim) / float(dim) + eps));
        for (int64_t i = 0; i < dim; i += W)
          store(x.data() + i, round_to<T>(load(w + i, dim - i) * round_to<T>(load(head + i, dim - i) * inv)), dim - i);
      } else {
        for (int64_t i = 0; i < dim; i += W) store(x.data() + i, load(head + i, dim - i), dim - i);
      }
      // x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1): each product rounded, then the sum
      for (int64_t i = 0; i < half; i += W) {
        const int64_t n = half - i;
        const vf x1 = load(x.data() + i, n), x2 = load(x.data() + half + i, n);
        store(head + i, round_to<T>(x1 * load(cosr + i, n)) + round_to<T>(-x2 * load(sinr + i, n)), n);
        store(head + half + i,
              round_to<T>(x2 * load(cosr + half + i, n)) + round_to<T>(x1 * load(sinr + half + i, n)), n);
      }
    }
  });
}

// In place on qkv [T, (heads + kv_heads) * dim + ...] (q heads, then k heads; anything after, the
// values, untouched): per-head RMSNorm when the weights are given (q_weight for q heads, k_weight
// for k heads), then the rotary embedding with cos/sin [T, dim].
void rotary(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t kv_heads,
            int64_t dim, const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight,
            double eps) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.stride(1) == 1, "rotary: qkv must be [T, features]");
  TORCH_CHECK(dim % 2 == 0 && qkv.size(1) >= (heads + kv_heads) * dim, "rotary: bad head count or size");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(cos.size(0) == qkv.size(0) && sin.size(0) == qkv.size(0) && cos.size(1) == dim && sin.size(1) == dim,
              "rotary: cos and sin must be [T, dim]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "rotary: one dtype");
  TORCH_CHECK(q_weight.has_value() == k_weight.has_value(), "rotary: q and k norm weights together");
  if (q_weight.has_value())
    TORCH_CHECK(q_weight->numel() == dim && k_weight->numel() == dim && q_weight->is_contiguous() &&
                k_weight->is_contiguous() && q_weight->scalar_type() == qkv.scalar_type() &&
                k_weight->scalar_type() == qkv.scalar_type(), "rotary: norm weights must be [dim], same dtype");
  // a view of just the q and k heads: the row loop reads the head count from it
  at::Tensor qk = qkv.narrow(1, 0, (heads + kv_heads) * dim);
  const at::Tensor* qw = q_weight.has_value() ? &*q_weight : nullptr;
  const at::Tensor* kw = k_weight.has_value() ? &*k_weight : nullptr;
  if (qkv.scalar_type() == at::kFloat)
    rotary_impl<float>(qk, cos, sin, heads, dim, qw, kw, float(eps));
  else if (qkv.scalar_type() == at::kBFloat16)
    rotary_impl<at::BFloat16>(qk, cos, sin, heads, dim, qw, kw, float(eps));
  else
    TORCH_CHECK(false, "rotary: float32 or bfloat16 only");
}

#include "vexp.h"  // exp on every lane (shared with attention.cpp)

template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), n = out.size(1);
  const T* g = gate_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t gr = gate_up.stride(0), orr = out.stride(0);
  by_rows(rows, n, [&](int64_t r) {
    const T* gate = g + r * gr;
    const T* up = gate + n;
    T* row = o + r * orr;
    for (int64_t i = 0; i < n; i += W) {
      const vf x = load(gate + i, n - i);
      store(row + i, round_to<T>(x / (splat(1.0f) + vexp(-x))) * load(up + i, n - i), n - i);
    }
  });
}

// out [T, I] = SiLU(gate) x up, gate_up [T, 2I] (gate first): SiLU rounded to the dtype, then the product.
void silu_mul(const at::Tensor& gate_up, at::Tensor out) {
  check_rows(gate_up, "gate_up");
  check_rows(out, "out");
  TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * out.size(1) &&
              gate_up.scalar_type() == out.scalar_type(), "silu_mul: gate_up must be [T, 2I] and out [T, I], one dtype");
  if (out.scalar_type() == at::kFloat)
    silu_mul_impl<float>(gate_up, out);
  else if (out.scalar_type() == at::kBFloat16)
    silu_mul_impl<at::BFloat16>(gate_up, out);
  else
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16 only");
}

// ---- bf16 matrix products on AMX tiles, the same bits for a row in any batch -----------------------
//
// oneDNN's bf16 matmul chooses its blocking, and with it the order of the sums over K, from the number
// of rows: on an AMX Xeon a row of a 512 x 2816 product gave different bits in a call of 2,633 rows
// than in one of 3,000 (measured; its fp32 products and the AVX-512 BF16 ones of an EPYC kept their
// bits). So bf16 products on AMX go through oneDNN's batch-reduce kernel (torch's cpublas::brgemm)
// called on blocks of exactly PRODUCT_ROWS rows and PRODUCT_COLS columns, the last rows copied into
// a zero-padded block: one kernel shape for every call, and an AMX tile computes each row of its
// result from that row of A alone, over K in one fixed order. A fixed shape also means no kernel is
// generated per request length (oneDNN's primitives are per shape: a new row count cost 8 ms a call).

constexpr int64_t PRODUCT_ROWS = 32;
constexpr int64_t PRODUCT_COLS = 256;

bool products_on_tiles() { return at::native::cpublas::could_pack(at::kBFloat16); }

// weight [N, K] bf16 -> [ceil(N / PRODUCT_COLS), K, PRODUCT_COLS] in the kernel's VNNI layout (pairs
// along K), columns past N zero.
at::Tensor pack_product(const at::Tensor& weight) {
  TORCH_CHECK(products_on_tiles(), "pack_product: this CPU has no AMX bf16 tiles");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_product: a 2-d bf16 weight [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1), blocks = (n + PRODUCT_COLS - 1) / PRODUCT_COLS;
  TORCH_CHECK(k % 2 == 0, "pack_product: K must be even (bf16 pairs), got ", k);
  at::Tensor t = at::zeros({k, blocks * PRODUCT_COLS}, weight.options());
  t.narrow(1, 0, n).copy_(weight.t());
  // block j, pair p: [column][the pair's two values of K]
  return t.view({k / 2, 2, blocks, PRODUCT_COLS}).permute({2, 0, 3, 1}).contiguous().view({blocks, k, PRODUCT_COLS});
}

// out [T, N] = x [T, K] W^T (+ bias), W packed by pack_product; sums in fp32, rounded to bf16 once.
void product(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, at::Tensor out) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t rows = x.size(0), k = x.size(1), n = out.size(1), blocks = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
              packed.scalar_type() == at::kBFloat16, "product: bf16 tensors only");
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == k && packed.size(2) == PRODUCT_COLS &&
              blocks * PRODUCT_COLS >= n && (blocks - 1) * PRODUCT_COLS < n && out.size(0) == rows,
              "product: x [T, K], packed [ceil(N/", PRODUCT_COLS, "), K, ", PRODUCT_COLS, "], out [T, N]");
  const at::BFloat16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == at::kBFloat16,
                "product: bias must be [N] bf16");
    b = bias->data_ptr<at::BFloat16>();
  }
  const at::BFloat16* xs = x.data_ptr<at::BFloat16>();
  const at::BFloat16* ws = packed.data_ptr<at::BFloat16>();
  at::BFloat16* os = out.data_ptr<at::BFloat16>();
  const int64_t xr = x.stride(0), orr = out.stride(0), tiles = (rows + PRODUCT_ROWS - 1) / PRODUCT_ROWS;
  // items column block by column block: a thread's consecutive items reuse one block of W
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[PRODUCT_ROWS * PRODUCT_COLS];
    std::vector<at::BFloat16> tail;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / tiles, i = item % tiles, first = i * PRODUCT_ROWS;
      const int64_t m = std::min(PRODUCT_ROWS, rows - first), cols = std::min(PRODUCT_COLS, n - j * PRODUCT_COLS);
      const at::BFloat16* a = xs + first * xr;
      int64_t lda = xr;
      if (m < PRODUCT_ROWS) {  // the last rows, in a block of the same shape as every other
        tail.assign(PRODUCT_ROWS * k, at::BFloat16(0.0f));
        for (int64_t r = 0; r < m; ++r) std::memcpy(tail.data() + r * k, a + r * xr, 2 * k);
        a = tail.data();
        lda = k;
      }
      at::native::cpublas::brgemm(PRODUCT_ROWS, PRODUCT_COLS, k, lda, PRODUCT_COLS, PRODUCT_COLS, false, a,
                                  ws + j * k * PRODUCT_COLS, acc, true);
      for (int64_t r = 0; r < m; ++r) {
        at::BFloat16* row = os + (first + r) * orr + j * PRODUCT_COLS;
        const float* c = acc + r * PRODUCT_COLS;
        for (int64_t col = 0; col < cols; col += W) {
          vf v = load(c + col, cols - col);
          if (b) v += load(b + j * PRODUCT_COLS + col, cols - col);
          store(row + col, v, cols - col);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace

void register_layers(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (after x += delta when delta is given), transformers' arithmetic",
        py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"), py::arg("out"));
  m.def("rotary", &rotary, "Per-head RMSNorm (optional) and rotary embedding of q and k, in place",
        py::call_guard<py::gil_scoped_release>(),
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("heads"), py::arg("kv_heads"), py::arg("dim"),
        py::arg("q_weight"), py::arg("k_weight"), py::arg("eps"));
  m.def("products_on_tiles", &products_on_tiles, "bf16 products on AMX tiles run here (`product`)");
  m.def("pack_product", &pack_product, "A bf16 weight [N, K] packed for `product`", py::arg("weight"));
  m.def("product", &product, "out = x W^T (+ bias) in bf16 on AMX tiles, the same bits for a row in any batch",
        py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("out"));
  m.def("silu_mul", &silu_mul, "SiLU(gate) x up", py::call_guard<py::gil_scoped_release>(), py::arg("gate_up"), py::arg("out"));
}
