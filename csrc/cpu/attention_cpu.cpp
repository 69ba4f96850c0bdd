// Torch-facing side of the CPU fused attention ("cpu" backend): argument
// checks at the boundary, operand packing, the thread pool, and the choice of
// kernel variant for this processor. The kernels themselves are in
// attention_cpu_impl.h (one body compiled per instruction set).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_cpu.h"
#include "cpu_features.h"

namespace fastformer {
namespace cpu_attn {
namespace {

// The variant for cpu_isa() (FASTFORMER_CPU_ISA=generic|avx2|avx512|avx512_bf16 forces one).
const Kernels& kernels() {
#if defined(__x86_64__)
  static const Kernels& chosen =
      table_for_cpu_isa(kernels_generic, kernels_avx2, kernels_avx512, kernels_avx512bf16);
  return chosen;
#else
  return kernels_generic;
#endif
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::max<int64_t>(1, std::atoll(v)) : fallback;
}

// Block sizes (bench/NOTES.md has the sweeps; FASTFORMER_CPU_ATTN_BQ/BK override).
// BQ = 96 is a multiple of both micro-kernel heights (6 for AVX2, 12 for
// AVX-512), so no row remainder; BK is rounded to the panel width.
// BQ is kept even: the bf16 kernels pair query rows.
// The forward takes key tiles of 256 (fewer online-softmax steps per row, longer
// P.V accumulations: bf16 forward 4-12% faster than with 128, fp32 unchanged); the
// backward keeps 128 (its fp32 kernel slowed with wider tiles).
int64_t block_q() { return (env_int("FASTFORMER_CPU_ATTN_BQ", 96) + 1) / 2 * 2; }
int64_t block_k(int nr, int64_t fallback) {
  const int64_t bk = env_int("FASTFORMER_CPU_ATTN_BK", fallback);
  return (bk + nr - 1) / nr * nr;
}
constexpr int64_t kForwardBK = 256, kBackwardBK = 128;

// FASTFORMER_CPU_ATTN_PACK_B=1 packs every B operand (the layout before in-place reads; for A/B
// timing); unset or 0 reads them in place. (Not env_int: it clamps every set value to >= 1.)
bool pack_b_always() {
  static const bool v = [] {
    const char* e = std::getenv("FASTFORMER_CPU_ATTN_PACK_B");
    return e != nullptr && std::atoll(e) != 0;
  }();
  return v;
}

// Run items 0..n-1 on torch's thread pool, handing them out dynamically (causal
// items differ in cost), with one scratch buffer per thread.
template <typename F>
void run_items(int64_t n, int64_t scratch_floats, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::unique_ptr<float[]> scratch(new float[scratch_floats]);
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= n) break;
      fn(i, scratch.get());
    }
  });
}

// The work before a kernel's parallel region (operand packing, Delta) in one parallel region
// of its own: steps are queued per head, then run() hands (step, head) units to the pool. One
// wake-up of the pool instead of one per operand, and every step split over threads: at L = 256
// the five backward packs and Delta ran on the calling thread alone (each under the old
// per-operand grain of 2^18 elements) while the other thread spun, ~14 % of the call.
class Prep {
 public:
  // Queue fn(head) for heads 0..heads-1, each touching about `elems` elements.
  void per_head(int64_t heads, int64_t elems, std::function<void(int64_t)> fn) {
    if (heads > 0) steps_.push_back({heads, std::max<int64_t>(1, elems), std::move(fn)});
  }

  // Panels of the per-head matrix X (R x C) where X = x[b, h] or its transpose
  // (attention_cpu.h), in float32, for every (b, h): (B*H, head_stride), filled by run().
  at::Tensor panels(const at::Tensor& x, bool transpose, int nr) {
    const int64_t H = x.size(1);
    const int64_t R = transpose ? x.size(3) : x.size(2), C = transpose ? x.size(2) : x.size(3);
    const int64_t rs = transpose ? x.stride(3) : x.stride(2), cs = transpose ? x.stride(2) : x.stride(3);
    const int64_t panels = (C + nr - 1) / nr, head = panels * R * nr;
    at::Tensor out = at::empty({x.size(0) * H, head}, x.options().dtype(at::kFloat));
    float* dst = out.data_ptr<float>();
    const int64_t sb = x.stride(0), sh = x.stride(1);
    const auto pack_t = kernels().pack_panel_t;
    const bool transposed_rows = rs == 1 && cs != 1 && nr == kernels().nr;  // K^T, V^T from contiguous rows
    auto pack = [=](auto* base, int64_t bh) {
      const auto* src = base + (bh / H) * sb + (bh % H) * sh;
      float* d = dst + bh * head;
      for (int64_t p = 0; p < panels; ++p, d += R * nr) {
        const int64_t c0 = p * nr;
        if constexpr (std::is_same_v<std::decay_t<decltype(*src)>, float>) {
          if (transposed_rows && c0 + nr <= C) {  // W x W blocks transposed in registers
            pack_t(src + c0 * cs, cs, R, d);
            continue;
          }
        }
        if (c0 + nr <= C && cs == 1) {  // V, K: each panel row is nr contiguous values (vectorised copy)
          for (int64_t r = 0; r < R; ++r)
            for (int64_t t = 0; t < nr; ++t) d[r * nr + t] = static_cast<float>(src[r * rs + c0 + t]);
        } else if (c0 + nr <= C && rs == 1) {  // K^T: panel column t is key c0 + t's contiguous row
          for (int64_t t = 0; t < nr; ++t) {
            const auto* row = src + (c0 + t) * cs;
            for (int64_t r = 0; r < R; ++r) d[r * nr + t] = static_cast<float>(row[r]);
          }
        } else {  // a partial last panel or other strides: element by element, zero padding
          for (int64_t r = 0; r < R; ++r)
            for (int64_t t = 0; t < nr; ++t) {
              const int64_t col = c0 + t;
              d[r * nr + t] = col < C ? static_cast<float>(src[r * rs + col * cs]) : 0.f;
            }
        }
      }
    };
    if (x.scalar_type() == at::kFloat) {
      const float* base = x.data_ptr<float>();
      per_head(x.size(0) * H, R * C, [=](int64_t bh) { pack(base, bh); });
    } else {
      const at::BFloat16* base = x.data_ptr<at::BFloat16>();
      per_head(x.size(0) * H, R * C, [=](int64_t bh) { pack(base, bh); });
    }
    return out;
  }

  // Pair panels (attention_cpu.h) of the per-head bf16 matrix X (R x C), X = x[b, h] or its
  // transpose, reduced over R, for every (b, h): (B*H, head_stride) int16, filled by run().
  at::Tensor pair_panels(const at::Tensor& x, bool transpose, int nr) {
    TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kBFloat16);
    const int64_t H = x.size(1);
    const int64_t R = transpose ? x.size(3) : x.size(2), C = transpose ? x.size(2) : x.size(3);
    const int64_t rs = transpose ? x.stride(3) : x.stride(2), cs = transpose ? x.stride(2) : x.stride(3);
    const int64_t panels = (C + nr - 1) / nr, rp = (R + 1) / 2, head = panels * rp * nr * 2;
    at::Tensor out = at::empty({x.size(0) * H, head}, x.options().dtype(at::kShort));
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
    const uint16_t* base = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const int64_t sb = x.stride(0), sh = x.stride(1);
    per_head(x.size(0) * H, R * C, [=](int64_t bh) {
      const uint16_t* src = base + (bh / H) * sb + (bh % H) * sh;
      uint16_t* d = dst + bh * head;
      for (int64_t p = 0; p < panels; ++p, d += rp * nr * 2) {
        const int64_t c0 = p * nr;
        const bool full = c0 + nr <= C && R % 2 == 0;
        if (full && cs == 1) {  // V, K: interleave two contiguous rows (vectorised)
          for (int64_t r2 = 0; r2 < rp; ++r2) {
            const uint16_t* a = src + 2 * r2 * rs + c0;
            const uint16_t* b = a + rs;
            uint16_t* o = d + r2 * nr * 2;
            for (int64_t t = 0; t < nr; ++t) {
              o[2 * t] = a[t];
              o[2 * t + 1] = b[t];
            }
          }
        } else if (full && rs == 1) {  // K^T: the pair (r, r + 1) of key c0 + t is one 32-bit word of its row
          for (int64_t t = 0; t < nr; ++t) {
            const uint16_t* row = src + (c0 + t) * cs;
            for (int64_t r2 = 0; r2 < rp; ++r2) std::memcpy(d + r2 * nr * 2 + 2 * t, row + 2 * r2, 4);
          }
        } else {  // a partial panel, odd R or other strides: element by element, zero padding
          for (int64_t r2 = 0; r2 < rp; ++r2)
            for (int64_t t = 0; t < nr; ++t) {
              const int64_t col = c0 + t, r = 2 * r2;
              const bool in = col < C;
              d[r2 * nr * 2 + 2 * t] = in ? src[r * rs + col * cs] : 0;
              d[r2 * nr * 2 + 2 * t + 1] = in && r + 1 < R ? src[(r + 1) * rs + col * cs] : 0;
            }
        }
      }
    });
    return out;
  }

  // x[b, h] (or its transpose) as the fp32 micro-kernel's B operand (attention_cpu.h). A float32
  // x whose rows are contiguous and a multiple of nr wide (d = 64, 128, ...) is read in place:
  // the micro-kernel loads each B row as nr contiguous floats wherever it lies, so packing it
  // only copied (the row copies were ~5 % of an fp32 forward+backward at L = 256). The rest
  // (transposes, bf16, odd widths) is packed by run(); `keep` holds the packed tensor.
  PanelsB operand_b(const at::Tensor& x, bool transpose, int nr, at::Tensor& keep) {
    PanelsB o;
    if (!transpose && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.size(3) % nr == 0 && !pack_b_always()) {
      o.data = x.data_ptr<float>();
      o.sb = x.stride(0);
      o.sh = x.stride(1);
      o.rs = x.stride(2);
      o.ps = nr;
      return o;
    }
    keep = panels(x, transpose, nr);
    const int64_t R = transpose ? x.size(3) : x.size(2);
    o.data = keep.data_ptr<float>();
    o.sh = keep.size(1);
    o.sb = x.size(1) * o.sh;
    o.rs = nr;
    o.ps = R * nr;
    return o;
  }

  // Runs every queued step. Small totals stay on the calling thread: a parallel region costs a
  // wake-up of every pool thread (and on a busy machine a descheduled one stalls the region).
  void run() {
    int64_t units = 0, elems = 0;
    for (const Step& st : steps_) {
      units += st.heads;
      elems += st.heads * st.elems;
    }
    if (units == 0) return;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems / units));
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      int64_t base = 0;
      for (const Step& st : steps_) {
        const int64_t lo = std::max(begin, base), hi = std::min(end, base + st.heads);
        for (int64_t u = lo; u < hi; ++u) st.fn(u - base);
        base += st.heads;
      }
    });
    steps_.clear();
  }

 private:
  static constexpr int64_t kGrainElems = int64_t{1} << 16;  // elements per thread at least
  struct Step {
    int64_t heads, elems;
    std::function<void(int64_t)> fn;
  };
  std::vector<Step> steps_;
};

// x (B, H, L, E) bf16 where the bf16 kernels can read it in place as pairs along E
// (unit stride, E even, 4-byte aligned rows), else a zero-padded contiguous copy.
at::Tensor pairs_operand(const at::Tensor& x) {
  bool ok = x.stride(3) == 1 && x.size(3) % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (x.size(d) == 1 || x.stride(d) % 2 == 0);
  if (ok) return x;
  at::Tensor y = at::zeros({x.size(0), x.size(1), x.size(2), (x.size(3) + 1) / 2 * 2}, x.options());
  y.narrow(3, 0, x.size(3)).copy_(x);
  return y;
}

PairsView pairs_view(const at::Tensor& x) {  // of a pairs_operand (size-1 dims never indexed past 0)
  return {reinterpret_cast<const uint32_t*>(x.data_ptr()), x.stride(0) / 2, x.stride(1) / 2, x.stride(2) / 2};
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

Strided4 strided(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat);
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

DropoutSpec dropout_spec(double p, int64_t seed, int64_t offset) {
  DropoutSpec d;
  d.on = p > 0.0;
  d.seed = (uint64_t)seed;
  d.offset = (uint64_t)offset;
  const double thr = std::ldexp(p, 32);
  d.threshold = thr >= 4294967295.0 ? 4294967295u : (uint32_t)std::llround(thr);
  d.keep_scale = p >= 1.0 ? 0.f : (float)(1.0 / (1.0 - p));
  return d;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.device().is_cpu(), "attention_cpu: ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.dim() == 4, "attention_cpu: ", name, " must be 4-D (B, H, L, E), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
                "attention_cpu: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "attention_cpu: ", name, " has dtype ", t.scalar_type(),
                " but q has ", q.scalar_type());
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention_cpu: batch sizes differ: q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) == v.size(1) && (k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0),
              "attention_cpu: q heads must be a multiple of k/v heads: q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "attention_cpu: k head dim ", k.size(3), " != q head dim ", q.size(3));
  TORCH_CHECK(k.size(2) == v.size(2), "attention_cpu: k and v lengths differ: ", k.size(2), " vs ", v.size(2));
}

void check_output(const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(),
              "attention_cpu: ", name, " must be a contiguous CPU ", dtype, " tensor of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

// (stride, size) of t's dims with size > 1, by increasing stride.
std::vector<std::pair<int64_t, int64_t>> dims_by_stride(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  return dims;
}

// No two elements of t share memory: with its dims sorted by stride, each stride at least spans
// the dims below it (sufficient, and true of every view of a contiguous tensor that drops or
// permutes dims: a transposed (B, L, H, E) tensor, one slice of a (B, L, 3, H, E) one).
bool non_overlapping(const at::Tensor& t) {
  int64_t span = 1;
  for (const auto& [stride, size] : dims_by_stride(t)) {
    if (stride < span) return false;
    span = stride * size;
  }
  return true;
}

// An output written row by row (out; dq, dk, dv): rows with unit element stride, any strides
// between them as long as no two elements overlap.
void check_rows_output(const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape &&
                  (t.size(3) <= 1 || t.stride(3) == 1) && non_overlapping(t),
              "attention_cpu: ", name, " must be a CPU ", dtype, " tensor of shape ", shape,
              " with unit stride along its last dim and no overlapping elements, got ", t.scalar_type(), " ",
              t.sizes(), " strides ", t.strides());
}

template <typename T>
Rows<T> rows(const at::Tensor& t) {
  Rows<T> r;
  r.data = reinterpret_cast<T*>(t.data_ptr());
  r.sb = t.stride(0);
  r.sh = t.stride(1);
  r.sl = t.stride(2);
  return r;
}

// The kernels write their outputs (out and lse; dq, their dQ accumulator, dk and dv) while still
// reading the inputs in place (Q, V, K, dO as GEMM operands), so an output sharing memory with
// an input would be read after it was overwritten.
void check_no_alias(const char* out_names, std::initializer_list<const at::Tensor*> outs, const char* in_names,
                    std::initializer_list<const at::Tensor*> ins) {
  for (const at::Tensor* o : outs)
    for (const at::Tensor* i : ins)
      TORCH_CHECK(!o->is_alias_of(*i), "attention_cpu: ", out_names, " must not share memory with ", in_names);
}

// Whether a and b (each without self-overlap: non_overlapping) share no element. Different
// storages, empty tensors or disjoint address spans are disjoint. Sharing one span, they must
// have one shape and one set of strides (else refused: no layout of ours needs more), and then
// they are blocks of `block` contiguous elements at the points of one lattice (the remaining dims,
// sorted by stride, each stride spanning the dims below: its smallest nonzero difference is at
// least t1, the smallest stride); offset by d, they are disjoint when block <= d <= t1 - block:
// dq, dk and dv as the three slices of one (B, L, 3, H, E) gradient (block H·E, t1 3·H·E).
bool disjoint(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return true;
  auto span = [](const at::Tensor& t) {
    int64_t hi = t.storage_offset() + 1;
    for (int64_t d = 0; d < t.dim(); ++d) hi += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(t.storage_offset(), hi);
  };
  const auto [alo, ahi] = span(a);
  const auto [blo, bhi] = span(b);
  if (ahi <= blo || bhi <= alo) return true;
  if (a.sizes() != b.sizes() || a.strides() != b.strides() || a.scalar_type() != b.scalar_type()) return false;
  const auto dims = dims_by_stride(a);
  int64_t block = 1;
  size_t i = 0;
  for (; i < dims.size() && dims[i].first == block; ++i) block *= dims[i].second;
  const int64_t d = std::abs(a.storage_offset() - b.storage_offset());
  if (i == dims.size()) return d >= block;
  return d >= block && d + block <= dims[i].first;
}

// Outputs must not share elements with each other either: each would overwrite the other's.
void check_outputs_disjoint(const char* names, std::initializer_list<const at::Tensor*> outs) {
  for (auto a = outs.begin(); a != outs.end(); ++a)
    for (auto b = a + 1; b != outs.end(); ++b)
      TORCH_CHECK(disjoint(**a, **b), "attention_cpu: ", names, " must not share elements with each other");
}

// Window / ALiBi / soft-cap (FlashAttention's conventions: -1 = unlimited side, causal = right 0).
struct VariantArgs {
  int64_t window_left = -1, window_right = -1;
  c10::optional<at::Tensor> alibi_slopes;
  double softcap = 0.0;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, double dropout_p, int64_t seed, int64_t offset,
                     bool is_causal, bool bottom_right, double scale, int nr, const VariantArgs& var,
                     int64_t bk) {
  Problem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Hkv = k.size(1);
  p.L = q.size(2);
  p.S = k.size(2);
  p.E = q.size(3);
  p.Ev = v.size(3);
  p.scale = (float)scale;
  p.diag_offset = bottom_right ? p.S - p.L : 0;
  TORCH_CHECK(var.window_left >= -1 && var.window_right >= -1, "attention_cpu: window sides must be >= -1, got (",
              var.window_left, ", ", var.window_right, ")");
  p.limit_right = is_causal || var.window_right >= 0;
  p.window_right = is_causal ? 0 : std::max<int64_t>(var.window_right, 0);
  p.limit_left = var.window_left >= 0;
  p.window_left = std::max<int64_t>(var.window_left, 0);
  TORCH_CHECK(std::isfinite(var.softcap) && var.softcap >= 0.0, "attention_cpu: softcap must be finite and >= 0, got ",
              var.softcap);
  p.softcap = var.softcap > 0.0;
  p.softcap_in = p.softcap ? (float)(scale / var.softcap) : 0.f;
  p.softcap_out = (float)(var.softcap * 1.4426950408889634);
  if (var.alibi_slopes.has_value() && var.alibi_slopes->defined()) {
    const at::Tensor& sl = *var.alibi_slopes;
    TORCH_CHECK(sl.device().is_cpu() && sl.scalar_type() == at::kFloat && sl.dim() == 2 && sl.size(0) == p.B &&
                    sl.size(1) == p.Hq,
                "attention_cpu: alibi_slopes must be a float32 CPU (view of shape) (B, Hq) = (", p.B, ", ", p.Hq,
                "), got ", sl.scalar_type(), " ", sl.sizes());
    p.slopes.data = sl.data_ptr<float>();
    p.slopes.sb = sl.stride(0);
    p.slopes.sh = sl.stride(1);
  }
  p.BQ = block_q();
  p.BK = block_k(nr, bk);
  p.Epad = (p.E + nr - 1) / nr * nr;
  p.Evpad = (p.Ev + nr - 1) / nr * nr;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "attention_cpu: dropout_p must be in [0, 1], got ", dropout_p);
  p.dropout = dropout_spec(dropout_p, seed, offset);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "attention_cpu: mask must be a CPU tensor");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.Hq && m.size(2) == p.L && m.size(3) == p.S,
                "attention_cpu: mask must be (a view) of shape (B, Hq, L, S) = (", p.B, ", ", p.Hq, ", ", p.L, ", ",
                p.S, "), got ", m.sizes());
    // As torch: bool, float32 (added in float32 whatever q's dtype) or q's dtype.
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat || m.scalar_type() == q.scalar_type(),
                "attention_cpu: mask must be bool, float32 or q's dtype (", q.scalar_type(), "), got ",
                m.scalar_type());
    p.mask.data = m.data_ptr();
    p.mask.kind = m.scalar_type() == at::kBool ? kMaskBool : m.scalar_type() == at::kFloat ? kMaskF32 : kMaskBF16;
    p.mask.sb = m.stride(0);
    p.mask.sh = m.stride(1);
    p.mask.sl = m.stride(2);
    p.mask.ss = m.stride(3);
  }
  return p;
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// Write into `out` directly when it is float32, else through a float32 buffer.
at::Tensor float_target(const at::Tensor& out) {
  return out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
             double dropout_p, int64_t seed, int64_t offset, bool is_causal, bool bottom_right, double scale,
             at::Tensor& out, at::Tensor& lse, int64_t window_left, int64_t window_right,
             const c10::optional<at::Tensor>& alibi_slopes, double softcap) {
  check_qkv(q, k, v);
  const Kernels& K = kernels();
  Problem p = make_problem(q, k, v, mask, dropout_p, seed, offset, is_causal, bottom_right, scale, K.nr,
                           {window_left, window_right, alibi_slopes, softcap}, kForwardBK);
  check_rows_output("out", out, {p.B, p.Hq, p.L, p.Ev}, q.scalar_type());
  check_output("lse", lse, {p.B, p.Hq, p.L}, at::kFloat);
  check_no_alias("out and lse", {&out, &lse}, "q, k, v, attn_mask or alibi_slopes",
                 {&q, &k, &v, mask ? &*mask : &q, alibi_slopes ? &*alibi_slopes : &q});
  check_outputs_disjoint("out and lse", {&out, &lse});
  if (p.B * p.Hq * p.L == 0) return;
  if (q.scalar_type() == at::kBFloat16 && K.bf16_forward_item != nullptr) {
    at::Tensor qb = pairs_operand(q);
    Prep prep;
    at::Tensor kt = prep.pair_panels(k, /*transpose=*/true, K.nr), vp = prep.pair_panels(v, false, K.nr);
    prep.run();
    Bf16ForwardArgs a;
    a.p = p;
    a.q = pairs_view(qb);
    a.kt_panels = bits(kt);
    a.kt_head_stride = kt.size(1);
    a.v_panels = bits(vp);
    a.v_head_stride = vp.size(1);
    a.out = rows<uint16_t>(out);
    a.lse = lse.data_ptr<float>();
    run_items(forward_items(p), K.bf16_forward_scratch(p), [&](int64_t i, float* s) { K.bf16_forward_item(a, i, s); });
    return;
  }
  at::Tensor qf = as_float(q);
  Prep prep;
  at::Tensor kt, vp;  // packed operands, alive until the kernels are done
  ForwardArgs a;
  a.kt = prep.operand_b(k, /*transpose=*/true, K.nr, kt);
  a.v = prep.operand_b(v, /*transpose=*/false, K.nr, vp);
  prep.run();
  at::Tensor out_f = float_target(out);
  a.p = p;
  a.q = strided(qf);
  a.out = rows<float>(out_f);
  a.lse = lse.data_ptr<float>();
  run_items(forward_items(p), K.forward_scratch(p), [&](int64_t i, float* s) { K.forward_item(a, i, s); });
  if (!out_f.is_same(out)) out.copy_(out_f);
}

// The backward's split of key tiles into chunks: enough independent items to keep
// every thread busy, each chunk with its own dQ partial sum (reduced after).
int64_t backward_chunks(const Problem& p) {
  const int64_t threads = at::get_num_threads(), ntiles = (p.S + p.BK - 1) / p.BK, heads = p.B * p.Hkv;
  return heads >= 2 * threads ? 1 : std::min(ntiles, (2 * threads + heads - 1) / heads);
}

// dQ's partial sums, (chunks, B, Hq, L, Epad) float32, each zeroed by the items that own it
// (in parallel, into their own cache). With one chunk and no column padding they are dq itself,
// in its own layout: no zero-fill of a separate buffer and no copy after (~2 % of an L = 256
// backward). `buffer` is then dq, else the separate buffer.
DqPartials dq_partials(const Problem& p, int64_t chunks, at::Tensor& dq, at::Tensor& buffer) {
  DqPartials d;
  if (chunks == 1 && p.Epad == p.E && dq.scalar_type() == at::kFloat) {
    buffer = dq;
    d.rows = rows<float>(dq);
    return d;
  }
  buffer = at::empty({chunks, p.B, p.Hq, p.L, p.Epad}, dq.options().dtype(at::kFloat));
  d.rows = rows<float>(buffer[0]);
  d.chunk_stride = buffer.stride(0);
  return d;
}

void finish_backward(const Problem& p, int64_t chunks, const at::Tensor& dq_part, at::Tensor& dq,
                     const at::Tensor& dk_f, at::Tensor& dk, const at::Tensor& dv_f, at::Tensor& dv) {
  if (!dq_part.is_same(dq)) dq.copy_((chunks == 1 ? dq_part[0] : dq_part.sum(0)).narrow(-1, 0, p.E));
  if (!dk_f.is_same(dk)) dk.copy_(dk_f);
  if (!dv_f.is_same(dv)) dv.copy_(dv_f);
}

// bf16 inputs on a processor with bf16 dot products (kernels_avx512bf16).
void backward_bf16(const Kernels& K, const Problem& p, const at::Tensor& dout, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  at::Tensor qb = pairs_operand(q), dob = pairs_operand(dout), ob = pairs_operand(out);
  const PairsView qv = pairs_view(qb), dov = pairs_view(dob), ov = pairs_view(ob);
  // Delta = rowsum(dO * O) by the micro-kernel's own dot product (see bf16_row_dots).
  at::Tensor delta = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  float* dl = delta.data_ptr<float>();
  const int64_t EvP = (p.Ev + 1) / 2;
  Prep prep;
  prep.per_head(p.B * p.Hq, p.L * p.Ev, [&](int64_t bh) {
    const int64_t b = bh / p.Hq, h = bh % p.Hq;
    K.bf16_row_dots(p.L, EvP, dov.row(b, h, 0), dov.sl, ov.row(b, h, 0), ov.sl, dl + bh * p.L);
  });
  at::Tensor kt = prep.pair_panels(k, true, K.nr), vt = prep.pair_panels(v, true, K.nr);
  at::Tensor kp = prep.pair_panels(k, false, K.nr), qp = prep.pair_panels(q, false, K.nr);
  at::Tensor dop = prep.pair_panels(dout, false, K.nr);
  prep.run();
  const int64_t chunks = backward_chunks(p);
  at::Tensor dq_part;
  const DqPartials dq_rows = dq_partials(p, chunks, dq, dq_part);
  at::Tensor dk_f = float_target(dk), dv_f = float_target(dv);
  Bf16BackwardArgs a;
  a.p = p;
  a.q = qv;
  a.dout = dov;
  a.kt_panels = bits(kt);
  a.vt_panels = bits(vt);
  a.k_panels = bits(kp);
  a.kt_head_stride = kt.size(1);
  a.vt_head_stride = vt.size(1);
  a.k_head_stride = kp.size(1);
  a.q_panels = bits(qp);
  a.do_panels = bits(dop);
  a.q_head_stride = qp.size(1);
  a.do_head_stride = dop.size(1);
  a.lse = lse.data_ptr<float>();
  a.delta = dl;
  a.dq = dq_rows;
  a.dk = rows<float>(dk_f);
  a.dv = rows<float>(dv_f);
  a.chunks = chunks;
  run_items(backward_items(p, chunks), K.bf16_backward_scratch(p),
            [&](int64_t i, float* s) { K.bf16_backward_item(a, i, s); });
  finish_backward(p, chunks, dq_part, dq, dk_f, dk, dv_f, dv);
}

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& mask, double dropout_p,
              int64_t seed, int64_t offset, bool is_causal, bool bottom_right, double scale, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, int64_t window_left, int64_t window_right,
              const c10::optional<at::Tensor>& alibi_slopes, double softcap) {
  check_qkv(q, k, v);
  const Kernels& K = kernels();
  Problem p = make_problem(q, k, v, mask, dropout_p, seed, offset, is_causal, bottom_right, scale, K.nr,
                           {window_left, window_right, alibi_slopes, softcap}, kBackwardBK);
  TORCH_CHECK(dout.dim() == 4 && dout.sizes() == at::IntArrayRef({p.B, p.Hq, p.L, p.Ev}) &&
                  dout.scalar_type() == q.scalar_type(),
              "attention_cpu: dout must be ", q.scalar_type(), " of shape (B, Hq, L, Ev), got ", dout.scalar_type(),
              " ", dout.sizes());
  TORCH_CHECK(out.sizes() == dout.sizes(), "attention_cpu: out must have dout's shape, got ", out.sizes());
  check_output("lse", lse, {p.B, p.Hq, p.L}, at::kFloat);
  check_rows_output("dq", dq, q.sizes(), q.scalar_type());
  check_rows_output("dk", dk, k.sizes(), k.scalar_type());
  check_rows_output("dv", dv, v.sizes(), v.scalar_type());
  check_no_alias("dq, dk and dv", {&dq, &dk, &dv}, "dout, q, k, v, out, lse, attn_mask or alibi_slopes",
                 {&dout, &q, &k, &v, &out, &lse, mask ? &*mask : &q, alibi_slopes ? &*alibi_slopes : &q});
  check_outputs_disjoint("dq, dk and dv", {&dq, &dk, &dv});
  if (p.B * p.Hq * p.L == 0 || p.S == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  if (q.scalar_type() == at::kBFloat16 && K.bf16_backward_item != nullptr) {
    backward_bf16(K, p, dout, q, k, v, out, lse, dq, dk, dv);
    return;
  }
  at::Tensor qf = as_float(q), dof = as_float(dout);
  // Delta = rowsum(dO * O), (B, Hq, L), by the kernels' own dot product (see row_dots), read
  // in place through the row strides (dO arrives transposed from a (B, L, H, Ev) layout in
  // training: a contiguous copy of it cost a pass over dO).
  at::Tensor dof_r = dof.stride(3) == 1 ? dof : dof.contiguous();
  at::Tensor out_r = as_float(out);
  if (out_r.stride(3) != 1) out_r = out_r.contiguous();
  at::Tensor delta = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  const Strided4 do_rows = strided(dof_r), o_rows = strided(out_r);
  float* dl = delta.data_ptr<float>();
  Prep prep;
  prep.per_head(p.B * p.Hq, p.L * p.Ev, [&](int64_t bh) {
    const int64_t b = bh / p.Hq, h = bh % p.Hq;
    K.row_dots(p.L, p.Ev, do_rows.row(b, h, 0), do_rows.sl, o_rows.row(b, h, 0), o_rows.sl, dl + bh * p.L);
  });
  // Q and dO as B operands come from their float32 versions (read in place where they can be).
  at::Tensor kt, vt, kp, qp, dop;  // packed operands, alive until the kernels are done
  BackwardArgs a;
  a.kt = prep.operand_b(k, true, K.nr, kt);
  a.vt = prep.operand_b(v, true, K.nr, vt);
  a.k = prep.operand_b(k, false, K.nr, kp);
  a.qb = prep.operand_b(qf, false, K.nr, qp);
  a.dob = prep.operand_b(dof, false, K.nr, dop);
  prep.run();
  const int64_t chunks = backward_chunks(p);
  at::Tensor dq_part;
  const DqPartials dq_rows = dq_partials(p, chunks, dq, dq_part);
  at::Tensor dk_f = float_target(dk), dv_f = float_target(dv);
  a.p = p;
  a.q = strided(qf);
  a.dout = strided(dof);
  a.lse = lse.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = dq_rows;
  a.dk = rows<float>(dk_f);
  a.dv = rows<float>(dv_f);
  a.chunks = chunks;
  run_items(backward_items(p, chunks), K.backward_scratch(p), [&](int64_t i, float* s) { K.backward_item(a, i, s); });
  finish_backward(p, chunks, dq_part, dq, dk_f, dk, dv_f, dv);
}

// The keep-mask (True = kept) the kernels apply for (seed, offset): a debug helper
// so tests can check dropout against the float64 reference with the same mask.
at::Tensor dropout_keep_mask(int64_t B, int64_t H, int64_t L, int64_t S, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(B >= 0 && H >= 0 && L >= 0 && S >= 0, "attention_cpu_dropout_keep_mask: negative size");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "attention_cpu_dropout_keep_mask: p must be in [0, 1], got ", p);
  const DropoutSpec d = dropout_spec(p, seed, offset);
  at::Tensor keep = at::empty({B, H, L, S}, at::kBool);
  bool* k = keep.data_ptr<bool>();
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < S; ++j)
        k[r * S + j] = p < 1.0 && dropout_hash(d, r / L, r % L, j, L, S) >= d.threshold;
  });
  return keep;
}

}  // namespace
}  // namespace cpu_attn

void register_cpu_attention(pybind11::module& m) {
  using namespace pybind11::literals;
  m.def("attention_cpu_forward", &cpu_attn::forward,
        "Fused attention forward on CPU tensors: writes out (B, Hq, L, Ev) and lse (B, Hq, L) float32",
        "q"_a, "k"_a, "v"_a, "mask"_a, "dropout_p"_a, "seed"_a, "offset"_a, "is_causal"_a, "bottom_right"_a,
        "scale"_a, "out"_a, "lse"_a, "window_left"_a = -1, "window_right"_a = -1, "alibi_slopes"_a = pybind11::none(),
        "softcap"_a = 0.0);
  m.def("attention_cpu_backward", &cpu_attn::backward,
        "Fused attention backward on CPU tensors: writes dq, dk, dv", "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a,
        "lse"_a, "mask"_a, "dropout_p"_a, "seed"_a, "offset"_a, "is_causal"_a, "bottom_right"_a, "scale"_a, "dq"_a,
        "dk"_a, "dv"_a, "window_left"_a = -1, "window_right"_a = -1, "alibi_slopes"_a = pybind11::none(),
        "softcap"_a = 0.0);
  m.def("attention_cpu_dropout_keep_mask", &cpu_attn::dropout_keep_mask,
        "The CPU attention kernels' dropout keep-mask (B, H, L, S) for (seed, offset)", "B"_a, "H"_a, "L"_a, "S"_a,
        "p"_a, "seed"_a, "offset"_a);
  m.def("attention_cpu_isa", [] { return std::string(cpu_attn::kernels().name); },
        "The instruction-set variant the CPU attention kernels run with here");
}

}  // namespace fastformer
