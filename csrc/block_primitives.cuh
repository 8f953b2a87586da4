// Warp and block building blocks of the advantage kernels: shuffles of small structs, a
// block-wide merge of Moments, and a block-wide exclusive *suffix* scan (right to left), the
// direction of the reverse GAE recurrence. Every function here must be reached by all
// threads of the block (they contain __syncthreads).
#pragma once

#include <cuda_runtime.h>

#include "moments.h"

namespace dvpo::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// The first valid value of a segment: the "next valid value" carried right to left.
template <typename acc_t>
struct NextValue {
  acc_t v;
  int has;
};

// The affine map x -> a + m * x: A at a segment's first valid token as a function of the A
// that follows the segment (each valid token applies A <- delta + gamma*lam*A).
template <typename acc_t>
struct Affine {
  acc_t m;
  acc_t a;
};

// Combine ops take (left segment, right segment) and return the combined segment.
struct FirstValid {
  template <typename V>
  __device__ __forceinline__ V operator()(const V& left, const V& right) const {
    return left.has ? left : right;
  }
};

struct Compose {
  template <typename A>
  __device__ __forceinline__ A operator()(const A& left, const A& right) const {
    return {left.m * right.m, left.a + left.m * right.a};
  }
};

template <typename T>
__device__ __forceinline__ T shfl_down(T x, int d) {
  return __shfl_down_sync(kFullMask, x, d);
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int d) {
  return __shfl_xor_sync(kFullMask, x, d);
}

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shfl_down(const Moments<acc_t>& x, int d) {
  return {__shfl_down_sync(kFullMask, static_cast<long long>(x.n), d), __shfl_down_sync(kFullMask, x.mean, d),
          __shfl_down_sync(kFullMask, x.m2, d)};
}

template <typename acc_t>
__device__ __forceinline__ NextValue<acc_t> shfl_down(const NextValue<acc_t>& x, int d) {
  return {__shfl_down_sync(kFullMask, x.v, d), __shfl_down_sync(kFullMask, x.has, d)};
}

template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> shfl_down(const Affine<acc_t>& x, int d) {
  return {__shfl_down_sync(kFullMask, x.m, d), __shfl_down_sync(kFullMask, x.a, d)};
}

// Sum over the warp; every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += shfl_xor(x, d);
  return x;
}

// Merge of every thread's Moments; all threads get the result. sm: NT/32 slots.
template <int NT, typename acc_t>
__device__ __forceinline__ Moments<acc_t> block_merge(Moments<acc_t> m, Moments<acc_t>* sm) {
  constexpr int kWarps = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = merge(m, shfl_down(m, d));  // lane 0 ends with the warp's merge
  __syncthreads();  // the previous reader of sm is done
  if (lane == 0) sm[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 1; j < kWarps; ++j) m = merge(m, sm[j]);
    sm[0] = m;
  }
  __syncthreads();
  return sm[0];
}

// Exclusive suffix scan over the threads of a block: thread i gets
// op(x[i+1], op(x[i+2], ... op(x[NT-1], carry))), i.e. everything to its right followed by
// the carry from the part of the row already processed. `total` gets op(x[0], ..., carry).
// op must be associative. sm: 2 * NT/32 slots.
template <int NT, typename T, typename Op>
__device__ __forceinline__ T block_suffix_scan(T x, const T& carry, Op op, T* sm, T& total) {
  constexpr int kWarps = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inclusive = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T y = shfl_down(inclusive, d);
    if (lane + d < 32) inclusive = op(inclusive, y);
  }
  const T after = shfl_down(inclusive, 1);  // lanes to my right within the warp (unused by lane 31)
  __syncthreads();
  if (lane == 0) sm[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x < kWarps) {  // what follows warp w: warps w+1.., then the carry
    T acc = carry;
    for (int j = kWarps - 1; j > static_cast<int>(threadIdx.x); --j) acc = op(sm[j], acc);
    sm[kWarps + threadIdx.x] = acc;
  }
  __syncthreads();
  const T right = sm[kWarps + warp];
  total = op(sm[0], sm[kWarps]);
  return lane == 31 ? right : op(after, right);
}

}  // namespace dvpo::cuda
