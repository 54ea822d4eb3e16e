// The LARS maths, once, for the C++ (CPU) and CUDA builds: dtype conversion, the trust ratio and the
// per-element update. Every function is HVD_HD, so the CPU tests exercise the formula the GPU runs.
//
// Also here: the tensor-table layout that hvd_largebatch/lars/ops.py builds and both native modules
// read.
//
// Rounding: every multiply-add that a compiler could contract is written as an explicit fmaf, and
// division and square root are IEEE-rounded on both sides (the CUDA build does not use
// --use_fast_math: no flush-to-zero, no approximate division or square root), so the CPU and the
// GPU compute the same bits for the trust ratio and the update (weights, momentum) from the same
// sums, for every finite input, denormals included. The norm reductions add their terms in
// different orders on the two builds, so sums of squares may differ in the last bits.
//
// NaN: every NaN that the kernels store (a weight, a momentum value, a trust ratio, a sum) is the
// one canonical NaN of CUDA: 0x7fffffff in fp32, 0x7fff in fp16 and bf16, whatever the NaN's
// origin (the CPU's default NaN is 0xffc00000, and x86 propagates input payloads): see canonical().
#pragma once

#include <cstdint>
#include <cstring>
#include <math.h>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace hvdlb {

// ---------------------------------------------------------------------------------------------
// dtypes (codes shared with ops.py: DTYPE_CODES)
enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Half {  // IEEE binary16 bits
  uint16_t bits;
};
struct BFloat16 {  // upper half of an IEEE binary32
  uint16_t bits;
};

HVD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

HVD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// cond ? a : b as bit operations: the compiler keeps it branch-free (a ternary next to floating-
// point work can become a branch under -ftrapping-math and stop vectorization).
HVD_HD uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// True unless f is an infinity or a NaN (a bit test: immune to fast-math assumptions).
HVD_HD bool is_finite(float f) { return (float_bits(f) & 0x7f800000u) != 0x7f800000u; }

HVD_HD bool is_nan(float f) { return (float_bits(f) & 0x7fffffffu) > 0x7f800000u; }

// The canonical NaNs (what CUDA's arithmetic and conversions produce).
constexpr uint32_t kCanonicalNaN = 0x7fffffffu;
constexpr uint16_t kCanonicalNaN16 = 0x7fffu;  // fp16 and bf16

// f, with any NaN replaced by the canonical one (branch-free: loops over it vectorize).
HVD_HD float canonical(float f) {
  return bits_float(select_bits(is_nan(f), kCanonicalNaN, float_bits(f)));
}

// binary16 -> binary32, exact (normals, subnormals, signed zeros, infinities, NaNs).
HVD_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shifting exponent and mantissa into place and scaling by 2^112 rebiases the exponent and
  // turns binary16 subnormals into the right binary32 normals in one multiply.
  const float scaled = bits_float(em << 13) * bits_float(0x77800000u);  // * 2^112
  const uint32_t inf_nan = 0x7f800000u | ((em & 0x3ffu) << 13);
  const uint32_t mag = select_bits(em >= 0x7c00u, inf_nan, float_bits(scaled));
  return bits_float(sign | mag);
#endif
}

// binary32 -> binary16, round to nearest even; overflow gives infinity, NaN gives 0x7fff.
HVD_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  // All three cases are computed and one is selected, so that loops over it vectorize.
  const uint32_t all = float_bits(f);
  const uint32_t sign = (all >> 16) & 0x8000u;
  const uint32_t u = all & 0x7fffffffu;
  // |f| >= 65536 or inf: infinity (a NaN is handled last).
  const uint32_t big = 0x7c00u;
  // |f| < 2^-14 (binary16 subnormal or zero): adding 0.5 puts the result's bits at the bottom of
  // the mantissa and the FPU's round-to-nearest-even does the rounding.
  const uint32_t small = float_bits(bits_float(u) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent (0xc8000000 = (15 - 127) << 23 mod 2^32) and round to nearest even
  // on the 13 dropped bits; a carry out of the mantissa correctly gives the next binade or inf.
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t out = select_bits(u >= 0x47800000u, big, select_bits(u < 0x38800000u, small, normal));
  return static_cast<uint16_t>(select_bits(u > 0x7f800000u, kCanonicalNaN16, out | sign));
#endif
}

// bfloat16 -> binary32, exact.
HVD_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN gives 0x7fff.
HVD_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_bits(is_nan(f), kCanonicalNaN16, rounded));
#endif
}

HVD_HD float to_float(float x) { return x; }
HVD_HD float to_float(Half x) { return half_to_float(x.bits); }
HVD_HD float to_float(BFloat16 x) { return bf16_to_float(x.bits); }

template <class T>
HVD_HD T from_float(float x);
template <>
HVD_HD float from_float<float>(float x) {
  return canonical(x);
}
template <>
HVD_HD Half from_float<Half>(float x) {
  return Half{float_to_half(x)};
}
template <>
HVD_HD BFloat16 from_float<BFloat16>(float x) {
  return BFloat16{float_to_bf16(x)};
}

HVD_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

HVD_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}

// ---------------------------------------------------------------------------------------------
// Hyperparameters of one parameter group (ops.py: GROUP_DTYPE has the same layout, 64 bytes).
enum GroupFlags : int32_t {
  kLars = 1,                // adapt the step with the trust ratio (else ratio = 1: plain SGD)
  kNesterov = 2,            // torch-style Nesterov momentum
  kMomentumCorrection = 4,  // u <- m u + ratio d; w <- w - lr u   (else v <- m v + lr ratio d; w <- w - v)
  kCombinedDenominator = 8  // ratio denominator ||g + beta w|| + eps (else ||g|| + beta ||w|| + eps)
};

// The four scheduled values may instead live in memory of the tensors' device (a 0-dim fp32
// tensor each, e.g. the lr that a training loop updates in place every iteration): a non-zero
// *_at address is read by the kernels when they run, not when they are launched, so a launch (or a
// captured CUDA graph) stays valid while the schedule changes. eps and the flags are fixed.
struct LarsGroup {
  float lr;
  float momentum;
  float weight_decay;
  float trust_coefficient;
  float eps;
  int32_t flags;
  // fp16 loss scaling: the gradients hold S times the true gradient, S at this address (one value
  // for the step, on the tensors' device); the sums and the update use g / S. 0: not scaled.
  const float* grad_scale_at;
  const float* lr_at;  // 0: use the value above
  const float* momentum_at;
  const float* weight_decay_at;
  const float* trust_coefficient_at;
};
static_assert(sizeof(LarsGroup) == 64, "LarsGroup must match ops.GROUP_DTYPE");

// 1 / S for gradients scaled by a loss scale S (see grad_scale_at), else 1. With S a power of
// two (dynamic loss scaling's), multiplying by 1 / S is exact: the step is bitwise the one of the
// unscaled gradients, as long as neither overflows nor underflows.
HVD_HD float grad_unscale(const LarsGroup& g) {
  return g.grad_scale_at ? div_rn(1.0f, *g.grad_scale_at) : 1.0f;
}

// The group with its device-held values read (call where the kernel runs).
HVD_HD LarsGroup resolved(LarsGroup g) {
  if (g.lr_at) g.lr = *g.lr_at;
  if (g.momentum_at) g.momentum = *g.momentum_at;
  if (g.weight_decay_at) g.weight_decay = *g.weight_decay_at;
  if (g.trust_coefficient_at) g.trust_coefficient = *g.trust_coefficient_at;
  return g;
}

// The layer-wise trust ratio from the layer's sums (w_sq = ||w||^2, g_sq = ||g||^2, wg = <w, g>).
//   separate: eta ||w|| / (||g|| + beta ||w|| + eps)       (You et al. 2017)
//   combined: eta ||w|| / (||g + beta w|| + eps),  ||g + beta w||^2 = g_sq + 2 beta wg + beta^2 w_sq
// The ratio is 1 for groups without LARS, when ||w|| = 0 or ||g|| = 0, and (combined) when the
// denominator is 0. A non-finite sum that the ratio reads (w_sq and g_sq; wg too when combined)
// gives the canonical NaN, whatever the other sums: an infinite gradient must not turn into a
// ratio of 0 (separate) or a finite one (combined).
//
// g_sq and wg are the sums of the gradients as stored: with a loss scale S they are S^2 ||g||^2 and
// S <w, g>, and are unscaled here.
HVD_HD float lars_trust_ratio(float w_sq, float g_sq, float wg, const LarsGroup& grp) {
  if (!(grp.flags & kLars)) return 1.0f;
  const float unscale = grad_unscale(grp);
  g_sq = g_sq * unscale * unscale;
  wg = wg * unscale;
  const bool combined = (grp.flags & kCombinedDenominator) != 0;
  if (!is_finite(w_sq) || !is_finite(g_sq) || (combined && !is_finite(wg)))
    return bits_float(kCanonicalNaN);
  const float w_norm = sqrt_rn(w_sq);
  const float g_norm = sqrt_rn(g_sq);
  if (w_norm == 0.0f || g_norm == 0.0f) return 1.0f;
  const float beta = grp.weight_decay;
  float denom;
  if (combined) {
    const float d_sq = fmaf(beta, fmaf(beta, w_sq, 2.0f * wg), g_sq);
    // rounding can make d_sq slightly < 0; a NaN (inf - inf from huge finite sums) stays NaN
    denom = sqrt_rn(d_sq < 0.0f ? 0.0f : d_sq) + grp.eps;
    if (denom == 0.0f) return 1.0f;
  } else {
    denom = fmaf(beta, w_norm, g_norm) + grp.eps;
  }
  return canonical(div_rn(grp.trust_coefficient * w_norm, denom));
}

// Per-tensor constants of the element update.
struct LarsCoeffs {
  float unscale;    // 1 / S: the stored gradient times this is the true gradient
  float alpha;      // scale of d inside the momentum: ratio (corrected form) or lr * ratio (raw form)
  float out_scale;  // scale of the step applied to w: lr (corrected form) or 1 (raw form)
  float momentum;
  float weight_decay;
};

HVD_HD LarsCoeffs lars_coeffs(float ratio, const LarsGroup& grp) {
  LarsCoeffs c;
  const bool corrected = (grp.flags & kMomentumCorrection) != 0;
  c.unscale = grad_unscale(grp);
  c.alpha = corrected ? ratio : grp.lr * ratio;
  c.out_scale = corrected ? grp.lr : 1.0f;
  c.momentum = grp.momentum;
  c.weight_decay = grp.weight_decay;
  return c;
}

// One element of the update, all in fp32 (g: the true gradient, i.e. the stored one / S). With a
// momentum buffer (u: its value, updated in place):
//   d = g + beta w;  s = alpha d;  u <- m u + s;  step = nesterov ? s + m u : u;  w <- w - out_scale step
// Without one (momentum 0): step = s. A zero buffer makes the first step u = s, which is what
// torch.optim.SGD's first step does (it copies d into the new buffer). u leaves canonical (the
// returned weight is made canonical by from_float when it is stored).
template <bool HasBuffer, bool Nesterov>
HVD_HD float lars_element(float w, float g, float& u, const LarsCoeffs& c) {
  const float d = fmaf(c.weight_decay, w, g * c.unscale);
  const float s = c.alpha * d;
  float step = s;
  if (HasBuffer) {
    u = canonical(fmaf(c.momentum, u, s));
    step = Nesterov ? fmaf(c.momentum, u, s) : u;
  }
  return fmaf(-c.out_scale, step, w);
}

// ---------------------------------------------------------------------------------------------
// The tensor table (int64, built by lars/ops.py's TensorTable): n tensor rows, then nch chunk
// rows. Chunks (at most a few thousand elements of one tensor) are the unit of parallel work; their
// size is chosen by ops.py per device. Every tensor has at least one chunk (a zero-size tensor has one
// empty chunk), so every tensor gets its sums and its trust ratio written.
struct TensorRow {
  int64_t w;            // address of the weights (or of the tensor, for a plain sum of squares)
  int64_t g;            // address of the gradient, 0 when absent
  int64_t u;            // address of the fp32 momentum buffer, 0 when absent
  int64_t numel;
  int64_t w_dtype;      // DType
  int64_t g_dtype;      // DType
  int64_t group;        // index into the LarsGroup array of the call
  int64_t chunk_begin;  // index of the tensor's first chunk row
};
struct ChunkRow {
  int64_t tensor;  // tensor row index
  int64_t start;   // first element of the chunk inside the tensor
  int64_t length;  // elements in the chunk (0 only for the chunk of a zero-size tensor)
};
static_assert(sizeof(TensorRow) == 8 * sizeof(int64_t), "TensorRow must match ops.py");
static_assert(sizeof(ChunkRow) == 3 * sizeof(int64_t), "ChunkRow must match ops.py");

HVD_HD const TensorRow* tensor_rows(const int64_t* table) {
  return reinterpret_cast<const TensorRow*>(table);
}
HVD_HD const ChunkRow* chunk_rows(const int64_t* table, int64_t n) {
  return reinterpret_cast<const ChunkRow*>(table + 8 * n);
}
// One past the tensor's last chunk row.
HVD_HD int64_t chunk_end(const int64_t* table, int64_t n, int64_t nch, int64_t t) {
  return t + 1 < n ? tensor_rows(table)[t + 1].chunk_begin : nch;
}

// Norm-pass modes (bit set).
enum NormMode : int32_t {
  kNormW = 1,   // per-chunk sums of w^2 (into w_part)
  kNormG = 2,   // per-chunk sums of g^2
  kNormWG = 4,  // per-chunk sums of w g
  kSumW = 8     // finalize ||w||^2 from w_part without recomputing it (partials carried over)
};

}  // namespace hvdlb
