// Count, mean and sum of squared deviations (M2) of a set of values, merged with Chan's
// formula. Partial moments of tiles, rows or chunks combine in any grouping without the
// cancellation of a sum-of-squares formula, which keeps fp32 variances accurate at T=131k.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DVPO_HD __host__ __device__ __forceinline__
#else
#define DVPO_HD inline
#endif

namespace dvpo {

template <typename acc_t>
struct Moments {
  int64_t n;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
DVPO_HD Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const acc_t fb = acc_t(b.n) / acc_t(n);
  const acc_t d = b.mean - a.mean;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * acc_t(a.n) * fb};
}

// Welford update with one value.
template <typename acc_t>
DVPO_HD void push(Moments<acc_t>& m, acc_t x) {
  m.n += 1;
  const acc_t d = x - m.mean;
  m.mean += d / acc_t(m.n);
  m.m2 += d * (x - m.mean);
}

// 1 / sqrt(unbiased variance + eps); the variance denominator is max(count - 1, 1).
template <typename acc_t>
DVPO_HD acc_t inv_std(const Moments<acc_t>& m, acc_t eps) {
  const acc_t denom = acc_t(m.n > 1 ? m.n - 1 : 1);
#if defined(__CUDA_ARCH__)
  return acc_t(1) / sqrt(m.m2 / denom + eps);
#else
  return acc_t(1) / std::sqrt(m.m2 / denom + eps);
#endif
}

}  // namespace dvpo
