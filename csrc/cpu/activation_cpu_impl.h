// The GELU-tanh passes' body (see activation_cpu.h), compiled per instruction set:
// a .cpp defines FF_ISA, FF_ISA_NAME, FF_W, optionally FF_TARGET, and FF_KERNELS.
//
// With u = sqrt(2/pi) (x + 0.044715 x^3), e = exp(-2u) and s = 1 / (1 + e):
//   gelu(x)  = 0.5 x (1 + tanh(u)) = x s                      (1 + tanh(u) = 2s)
//   gelu'(x) = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  1 - s = e s
// since 1 - tanh(u)^2 = 4 s (1 - s). Neither form subtracts nearly equal numbers, where
// torch's 1 + tanh(u) (u << 0) and 1 - tanh(u)^2 (|u| large) lose every digit; the results
// agree with torch's within its own rounding and are closer to the exact values.
// Where 2u < -126 ln 2 (x < -9.5), e overflows fp32's exp2 range: s is 0 there (the true
// s < 1e-38), the same 0 (and NaN for x = -inf or an overflowing x^2 in the derivative) as
// torch's tanh of -1.
#include <cstring>
#include <type_traits>

#include "activation_cpu.h"
#include "vec.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastformer {
namespace cpu_act {
namespace FF_ISA {

using namespace cpu_vec::FF_ISA;

#ifdef FF_TARGET
#pragma GCC push_options
FF_TARGET_PRAGMA(FF_TARGET)
#endif

constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;

// -2 log2(e) sqrt(2/pi) and the same times 0.044715: z = -2u log2(e) = x (kZ1 + kZ3 x^2), three
// operations (x^2, one fma, one product) where u's own form takes five.
constexpr float kZ1 = -2.302208198144325f;
constexpr float kZ3 = -0.1029432395800235f;

// s = 1 / (1 + exp(-2u)) and e = exp(-2u) (e finite, s = 0 where it overflows).
static inline vf sigmoid_2u(vf x, vf* e_out) {
  const vf z = x * (kZ1 + kZ3 * (x * x));
#if FF_W == 16 && defined(__x86_64__)
  // vexp2's arithmetic with AVX-512's rounding and scaling instructions (vexp2_weight): the same
  // values, 11 instructions instead of 17. z is capped at 127 so e stays finite (s is 0 there).
  const vf e = vexp2_weight<7>(z > vsplat(127.f) ? vsplat(127.f) : z);
#else
  const vf e = vexp2(z);  // z clamped to 127 inside: finite
#endif
  const vf r = 1.f / (1.f + e);
  const vf s = z > vsplat(126.f) ? vf{} : r;
  if (e_out) *e_out = e;
  return s;
}

// x s; above x = 1 as x - x (1 - s) = x - x e s, whose only rounding that matters is the last
// subtraction's (x s rounds twice, s and the product: up to 1.2 ulp against torch's 0.85).
// The x (1 - s) term is left out where 1 - s is 0, so x = +inf gives +inf as in torch.
static inline vf fwd_vec(vf x) {
  vf e;
  const vf s = sigmoid_2u(x, &e);
  const vf es = e * s;  // 1 - s; 0 for x = +inf, where x * es would be NaN
  const vf tail = es > vf{} ? x * es : vf{};
  return x > vsplat(1.f) ? x - tail : x * s;
}

static inline vf bwd_vec(vf dy, vf x) {
  vf e;
  const vf s = sigmoid_2u(x, &e);
  const vf inner = kBeta * (1.f + (3.f * kKappa) * (x * x));
  return dy * (s + 2.f * x * s * (e * s) * inner);
}

template <bool BF16>
static inline vf load(const void* p, int64_t i) {
  if constexpr (BF16) return vload_bf16(static_cast<const uint16_t*>(p) + i);
  return vload(static_cast<const float*>(p) + i);
}

template <bool BF16>
static inline void store(void* p, int64_t i, vf v) {
  if constexpr (BF16) {
    vstore_bf16(static_cast<uint16_t*>(p) + i, v);
  } else {
    vstore(static_cast<float*>(p) + i, v);
  }
}

// The last n % W elements go through one full vector on a zero-padded copy: the same
// arithmetic as the body, never a read or write past n.
template <bool BF16>
struct Tail {
  typedef typename std::conditional<BF16, uint16_t, float>::type T;
  T buf[3][W];
  int64_t n;
  Tail(int64_t n_) : n(n_) { std::memset(buf, 0, sizeof(buf)); }
  void in(int which, const void* p, int64_t at) { std::memcpy(buf[which], static_cast<const T*>(p) + at, n * sizeof(T)); }
  void out(void* p, int64_t at) const { std::memcpy(static_cast<T*>(p) + at, buf[2], n * sizeof(T)); }
};

template <bool BF16>
static void forward_t(const void* x, void* y, int64_t n) {
  const int64_t nv = n / W * W;
  int64_t i = 0;
  for (; i + 2 * W <= nv; i += 2 * W) {  // two independent chains in flight
    const vf a = fwd_vec(load<BF16>(x, i)), b = fwd_vec(load<BF16>(x, i + W));
    store<BF16>(y, i, a);
    store<BF16>(y, i + W, b);
  }
  for (; i < nv; i += W) store<BF16>(y, i, fwd_vec(load<BF16>(x, i)));
  if (i < n) {
    Tail<BF16> t(n - i);
    t.in(0, x, i);
    store<BF16>(t.buf[2], 0, fwd_vec(load<BF16>(t.buf[0], 0)));
    t.out(y, i);
  }
}

template <bool BF16>
static void backward_t(const void* dy, const void* x, void* dx, int64_t n) {
  const int64_t nv = n / W * W;
  int64_t i = 0;
  for (; i + 2 * W <= nv; i += 2 * W) {
    const vf a = bwd_vec(load<BF16>(dy, i), load<BF16>(x, i));
    const vf b = bwd_vec(load<BF16>(dy, i + W), load<BF16>(x, i + W));
    store<BF16>(dx, i, a);
    store<BF16>(dx, i + W, b);
  }
  for (; i < nv; i += W) store<BF16>(dx, i, bwd_vec(load<BF16>(dy, i), load<BF16>(x, i)));
  if (i < n) {
    Tail<BF16> t(n - i);
    t.in(0, dy, i);
    t.in(1, x, i);
    store<BF16>(t.buf[2], 0, bwd_vec(load<BF16>(t.buf[0], 0), load<BF16>(t.buf[1], 0)));
    t.out(dx, i);
  }
}

static void gelu_tanh_fwd(const void* x, void* y, int64_t n, bool bf16) {
  if (bf16) {
    forward_t<true>(x, y, n);
  } else {
    forward_t<false>(x, y, n);
  }
}

static void gelu_tanh_bwd(const void* dy, const void* x, void* dx, int64_t n, bool bf16) {
  if (bf16) {
    backward_t<true>(dy, x, dx, n);
  } else {
    backward_t<false>(dy, x, dx, n);
  }
}

#ifdef FF_TARGET
#pragma GCC pop_options
#endif

}  // namespace FF_ISA

const Kernels FF_KERNELS = {FF_ISA_NAME, &FF_ISA::gelu_tanh_fwd, &FF_ISA::gelu_tanh_bwd};

}  // namespace cpu_act
}  // namespace fastformer

#pragma GCC diagnostic pop
