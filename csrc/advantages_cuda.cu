// CUDA kernels of the advantage ops. dvpo_advantages runs in three launches (four with
// value_norm="batch"), with no host synchronisation:
//   1. project_kernel: one block per (row, 64-token tile). A warp per token reads its hidden
//      row with 16-byte loads (a memory-bound GEMV, fp32 accumulation), masked tokens are not
//      read; the block writes the raw values and the tile's Moments (count, mean, M2).
//   (batch) finalize_kernel: one block merges every tile's Moments into {mean, 1/std}.
//   2. gae_scan_kernel: one block per row. Merges the row's tile Moments (value_norm="seq"),
//      normalises the values, forms the KL/score rewards and runs the reverse scan over
//      chunks of NT*8 tokens from the end of the row: per chunk, a block suffix scan finds
//      each token's next valid value, a second one composes the affine steps
//      A <- delta + gamma*lam*A (masked tokens are identities), and the carries (next value,
//      next A) flow to the chunk on the left. The next chunk is loaded while this one scans.
//      The block also writes the Moments of its row's advantages.
//   3. whiten_kernel: merges those per-row Moments and whitens the advantages in place.
// All offsets are int64; statistics merge with Chan's formula (moments.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "block_primitives.cuh"
#include "dvpo_kernels.h"
#include "moments.h"

namespace dvpo::cuda {
namespace {

constexpr int kProjThreads = 256;
constexpr int kProjTokens = 64;  // tokens per projection block: the tile of the per-tile Moments
constexpr int kScanItems = 8;    // tokens per thread per scan chunk
constexpr int kStatThreads = 256;
constexpr int kFinalizeThreads = 1024;
constexpr int64_t kMaxBlocksPerRow = 1024;  // whitening blocks per row (each merges the row's partials)

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// ---- 1. projection ------------------------------------------------------------------------

template <typename in_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kProjThreads)
    project_kernel(const in_t* __restrict__ hidden, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                   const bool* __restrict__ mask, acc_t* __restrict__ out, Moments<acc_t>* __restrict__ parts,
                   int64_t len, int64_t hdim, int64_t tiles_per_row) {
  __shared__ acc_t tile_val[kProjTokens];
  __shared__ bool tile_ok[kProjTokens];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t t0 = (blockIdx.x % tiles_per_row) * kProjTokens;
  const acc_t b = bias != nullptr ? *bias : acc_t(0);
  const int64_t nvec = hdim / VEC;  // VEC > 1 only when VEC divides hdim
  const Vec<acc_t, VEC>* wv = reinterpret_cast<const Vec<acc_t, VEC>*>(weight);

  for (int k = warp; k < kProjTokens; k += kProjThreads / 32) {
    const int64_t t = t0 + k;
    bool ok = false;
    acc_t val = 0;
    if (t < len) {
      const int64_t idx = row * len + t;
      ok = mask == nullptr || mask[idx];
      if (ok) {  // warp-uniform: masked tokens cost no hidden-state traffic
        const Vec<in_t, VEC>* hv = reinterpret_cast<const Vec<in_t, VEC>*>(hidden + idx * hdim);
        acc_t s = 0;
#pragma unroll 4
        for (int64_t i = lane; i < nvec; i += 32) {
          const Vec<in_t, VEC> x = hv[i];
          const Vec<acc_t, VEC> w = wv[i];
#pragma unroll
          for (int e = 0; e < VEC; ++e) s += static_cast<acc_t>(x.v[e]) * w.v[e];
        }
        val = warp_sum(s) + b;
      }
      if (lane == 0) out[idx] = val;
    }
    if (lane == 0) {
      tile_val[k] = val;
      tile_ok[k] = ok;
    }
  }
  if (parts == nullptr) return;
  __syncthreads();
  if (warp == 0) {  // exact two-pass moments of the tile's valid values
    acc_t s = 0;
    int c = 0;
    for (int k = lane; k < kProjTokens; k += 32) {
      if (tile_ok[k]) {
        s += tile_val[k];
        ++c;
      }
    }
    s = warp_sum(s);
    c = warp_sum(c);
    const acc_t mean = c > 0 ? s / acc_t(c) : acc_t(0);
    acc_t m2 = 0;
    for (int k = lane; k < kProjTokens; k += 32) {
      if (tile_ok[k]) {
        const acc_t d = tile_val[k] - mean;
        m2 += d * d;
      }
    }
    m2 = warp_sum(m2);
    if (lane == 0) parts[blockIdx.x] = Moments<acc_t>{c, mean, m2};
  }
}

template <typename in_t, typename acc_t>
void launch_project(const in_t* hidden, const acc_t* weight, const acc_t* bias, const bool* mask, acc_t* out,
                    Moments<acc_t>* parts, int64_t rows, int64_t len, int64_t hdim, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(in_t);
  const int64_t tiles = (len + kProjTokens - 1) / kProjTokens;
  TORCH_CHECK(rows * tiles <= std::numeric_limits<int32_t>::max(), "too many tokens for one launch");
  const auto aligned = [](const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  const bool vec = hdim % kVec == 0 && aligned(hidden, 16) && aligned(weight, sizeof(acc_t) * kVec);
  const dim3 grid(static_cast<unsigned>(rows * tiles));
  if (vec) {
    project_kernel<in_t, acc_t, kVec>
        <<<grid, kProjThreads, 0, stream>>>(hidden, weight, bias, mask, out, parts, len, hdim, tiles);
  } else {
    project_kernel<in_t, acc_t, 1>
        <<<grid, kProjThreads, 0, stream>>>(hidden, weight, bias, mask, out, parts, len, hdim, tiles);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- statistics and whitening -------------------------------------------------------------

// {mean, 1/std} of the merge of n Moments (value_norm="batch").
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const Moments<acc_t>* __restrict__ parts, int64_t n, acc_t eps, acc_t* __restrict__ stats) {
  __shared__ Moments<acc_t> sm[kFinalizeThreads / 32];
  Moments<acc_t> m{0, 0, 0};
  for (int64_t k = threadIdx.x; k < n; k += kFinalizeThreads) m = merge(m, parts[k]);
  m = block_merge<kFinalizeThreads>(m, sm);
  if (threadIdx.x == 0) {
    stats[0] = m.mean;
    stats[1] = inv_std(m, eps);
  }
}

// Moments of the valid entries of each row of x [rows, len]; blocks_per_row blocks per row.
template <typename acc_t>
__global__ void __launch_bounds__(kStatThreads)
    moments_kernel(const acc_t* __restrict__ x, const bool* __restrict__ mask, int64_t len, int64_t blocks_per_row,
                   Moments<acc_t>* __restrict__ parts) {
  __shared__ Moments<acc_t> sm[kStatThreads / 32];
  const int64_t row = blockIdx.x / blocks_per_row, k = blockIdx.x % blocks_per_row;
  const int64_t base = row * len;
  Moments<acc_t> m{0, 0, 0};
  for (int64_t i = k * kStatThreads + threadIdx.x; i < len; i += blocks_per_row * kStatThreads) {
    if (mask[base + i]) push(m, x[base + i]);
  }
  m = block_merge<kStatThreads>(m, sm);
  if (threadIdx.x == 0) parts[blockIdx.x] = m;
}

// out = (x - mean) / sqrt(var + eps) (+ mean unless shift_mean) on valid entries, else 0, with
// mean/var from the merge of the row's parts_per_row Moments. x and out may alias.
template <typename acc_t>
__global__ void __launch_bounds__(kStatThreads)
    whiten_kernel(const acc_t* x, const bool* __restrict__ mask, acc_t* out, const Moments<acc_t>* __restrict__ parts,
                  int64_t parts_per_row, int64_t len, int64_t blocks_per_row, acc_t eps, bool shift_mean) {
  __shared__ Moments<acc_t> sm[kStatThreads / 32];
  const int64_t row = blockIdx.x / blocks_per_row, k = blockIdx.x % blocks_per_row;
  Moments<acc_t> m{0, 0, 0};
  for (int64_t j = threadIdx.x; j < parts_per_row; j += kStatThreads) m = merge(m, parts[row * parts_per_row + j]);
  m = block_merge<kStatThreads>(m, sm);
  const acc_t mean = m.mean, rstd = inv_std(m, eps), back = shift_mean ? acc_t(0) : mean;
  const int64_t base = row * len;
  for (int64_t i = k * kStatThreads + threadIdx.x; i < len; i += blocks_per_row * kStatThreads) {
    const int64_t p = base + i;
    out[p] = mask[p] ? (x[p] - mean) * rstd + back : acc_t(0);
  }
}

int64_t blocks_per_row(int64_t rows, int64_t len) {
  const int64_t want = (len + kStatThreads * 8 - 1) / (kStatThreads * 8);
  return std::max<int64_t>(1, std::min({want, kMaxBlocksPerRow, std::max<int64_t>(1, 4 * kMaxBlocksPerRow / rows)}));
}

template <typename acc_t>
void launch_whiten(const acc_t* x, const bool* mask, acc_t* out, const Moments<acc_t>* parts, int64_t parts_per_row,
                   int64_t rows, int64_t len, int64_t bpr, double eps, bool shift_mean, cudaStream_t stream) {
  TORCH_CHECK(rows * bpr <= std::numeric_limits<int32_t>::max(), "too many rows for one launch");
  whiten_kernel<acc_t><<<static_cast<unsigned>(rows * bpr), kStatThreads, 0, stream>>>(
      x, mask, out, parts, parts_per_row, len, bpr, static_cast<acc_t>(eps), shift_mean);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- 2. the reverse scan ------------------------------------------------------------------

template <typename acc_t>
struct ScanArgs {
  const acc_t* values;  // [B, T]; raw values of dvpo_advantages, or the values of gae
  acc_t* values_out;    // normalised values (may alias values), or nullptr
  const bool* mask;
  const acc_t* rewards;  // explicit rewards (gae), or nullptr
  const acc_t* old_lp;   // KL reward -kl_coef * (old - ref): both or neither
  const acc_t* ref_lp;
  acc_t neg_kl;
  const acc_t* score;  // [B] added on the row's last valid token, or nullptr
  acc_t gamma;
  acc_t gamma_lam;
  ValueNorm norm;
  const Moments<acc_t>* value_parts;  // seq: [B, parts_per_row] tile Moments of the raw values
  int64_t parts_per_row;
  const acc_t* value_stats;  // batch: {mean, 1/std}
  acc_t eps;
  acc_t* adv;
  acc_t* ret;
  Moments<acc_t>* adv_parts;  // [B] Moments of each row's advantages, or nullptr
  int64_t len;
};

// Loads the kScanItems tokens of this thread in the chunk starting at `start`: values and
// rewards (0 where masked or past the row), and the valid bits.
template <typename acc_t>
__device__ __forceinline__ void load_chunk(const ScanArgs<acc_t>& a, int64_t base, int64_t start,
                                           acc_t (&v)[kScanItems], acc_t (&r)[kScanItems], unsigned& valid) {
  const int64_t p0 = start + static_cast<int64_t>(threadIdx.x) * kScanItems;
  valid = 0;
#pragma unroll
  for (int j = 0; j < kScanItems; ++j) {
    const int64_t p = p0 + j;
    v[j] = 0;
    r[j] = 0;
    if (p < a.len) {
      const int64_t i = base + p;
      const bool ok = a.mask[i];
      const acc_t vi = a.values[i];
      acc_t ri = 0;
      if (a.rewards != nullptr) {
        ri = a.rewards[i];
      } else if (a.old_lp != nullptr) {
        ri = a.neg_kl * (a.old_lp[i] - a.ref_lp[i]);
      }
      if (ok) {
        valid |= 1u << j;
        v[j] = vi;
        r[j] = ri;
      }
    }
  }
}

template <typename acc_t, int NT>
__global__ void __launch_bounds__(NT) gae_scan_kernel(const ScanArgs<acc_t> a) {
  constexpr int kWarps = NT / 32;
  constexpr int64_t kChunk = static_cast<int64_t>(NT) * kScanItems;
  __shared__ Moments<acc_t> sm_mom[kWarps];
  __shared__ NextValue<acc_t> sm_next[2 * kWarps];
  __shared__ Affine<acc_t> sm_aff[2 * kWarps];

  const int64_t row = blockIdx.x;
  const int64_t base = row * a.len;
  acc_t mu = 0, rstd = 1;  // value_norm="none": identity
  if (a.norm == ValueNorm::kSeq) {
    Moments<acc_t> m{0, 0, 0};
    for (int64_t k = threadIdx.x; k < a.parts_per_row; k += NT) m = merge(m, a.value_parts[row * a.parts_per_row + k]);
    m = block_merge<NT>(m, sm_mom);
    mu = m.mean;
    rstd = inv_std(m, a.eps);
  } else if (a.norm == ValueNorm::kBatch) {
    mu = a.value_stats[0];
    rstd = a.value_stats[1];
  }
  const acc_t score = a.score != nullptr ? a.score[row] : acc_t(0);

  NextValue<acc_t> carry_v{0, 0};  // next valid value right of the chunk (and whether any)
  acc_t carry_a = 0;               // advantage of that token
  Moments<acc_t> adv_m{0, 0, 0};

  acc_t v[kScanItems], r[kScanItems], nv[kScanItems], nr[kScanItems];
  unsigned valid = 0, nvalid = 0;
  const int64_t chunks = (a.len + kChunk - 1) / kChunk;
  load_chunk(a, base, (chunks - 1) * kChunk, v, r, valid);
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t start = c * kChunk;
    if (c > 0) load_chunk(a, base, start - kChunk, nv, nr, nvalid);  // in flight while this chunk scans

    NextValue<acc_t> first{0, 0};  // my first valid (normalised) value
#pragma unroll
    for (int j = kScanItems - 1; j >= 0; --j) {
      if (valid >> j & 1u) {
        v[j] = (v[j] - mu) * rstd;
        first = {v[j], 1};
      }
    }
    NextValue<acc_t> chunk_v;
    const NextValue<acc_t> right_v = block_suffix_scan<NT>(first, carry_v, FirstValid{}, sm_next, chunk_v);

    // TD errors right to left; the token with nothing valid to its right in the row is the last one.
    acc_t delta[kScanItems];
    acc_t next_v = right_v.v;  // 0 when nothing valid follows
    int seen = right_v.has;
    Affine<acc_t> mine{1, 0};
#pragma unroll
    for (int j = kScanItems - 1; j >= 0; --j) {
      delta[j] = 0;
      if (valid >> j & 1u) {
        const acc_t rj = seen ? r[j] : r[j] + score;
        delta[j] = rj + a.gamma * next_v - v[j];
        next_v = v[j];
        seen = 1;
        mine = {a.gamma_lam * mine.m, delta[j] + a.gamma_lam * mine.a};
      }
    }
    Affine<acc_t> chunk_a;
    const Affine<acc_t> right_a = block_suffix_scan<NT>(mine, Affine<acc_t>{0, carry_a}, Compose{}, sm_aff, chunk_a);

    acc_t next_a = right_a.a;
    const int64_t p0 = start + static_cast<int64_t>(threadIdx.x) * kScanItems;
#pragma unroll
    for (int j = kScanItems - 1; j >= 0; --j) {
      const bool ok = valid >> j & 1u;
      const acc_t adv = delta[j] + a.gamma_lam * next_a;
      if (ok) {
        next_a = adv;
        push(adv_m, adv);
      }
      const int64_t p = p0 + j;
      if (p < a.len) {
        const int64_t i = base + p;
        a.adv[i] = ok ? adv : acc_t(0);
        a.ret[i] = ok ? adv + v[j] : acc_t(0);
        if (a.values_out != nullptr) a.values_out[i] = ok ? v[j] : acc_t(0);
      }
    }
    carry_v = chunk_v;
    carry_a = chunk_a.a;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      v[j] = nv[j];
      r[j] = nr[j];
    }
    valid = nvalid;
  }
  if (a.adv_parts != nullptr) {
    adv_m = block_merge<NT>(adv_m, sm_mom);
    if (threadIdx.x == 0) a.adv_parts[row] = adv_m;
  }
}

template <typename acc_t>
void launch_scan(const ScanArgs<acc_t>& args, int64_t rows, cudaStream_t stream) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(rows));
  if (args.len <= 128 * kScanItems) {  // short rows: small blocks, many per SM
    gae_scan_kernel<acc_t, 128><<<grid, 128, 0, stream>>>(args);
  } else {
    gae_scan_kernel<acc_t, 512><<<grid, 512, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- host helpers -------------------------------------------------------------------------

at::ScalarType stat_type(at::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

void check_on(const at::Tensor& t, const at::Tensor& ref, at::ScalarType st, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == st, name, " must have dtype ", st, ", got ", t.scalar_type());
}

template <typename acc_t>
Moments<acc_t>* workspace(at::Tensor& holder, int64_t n, const at::Tensor& like) {
  holder = at::empty({std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(Moments<acc_t>))},
                     like.options().dtype(at::kByte));
  return reinterpret_cast<Moments<acc_t>*>(holder.data_ptr());
}

template <typename acc_t>
const acc_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
ScanArgs<acc_t> scan_args(int64_t len, double gamma, double lam) {
  ScanArgs<acc_t> a{};
  a.gamma = static_cast<acc_t>(gamma);
  a.gamma_lam = static_cast<acc_t>(gamma * lam);
  a.norm = ValueNorm::kNone;
  a.eps = static_cast<acc_t>(kWhitenEps);
  a.len = len;
  return a;
}

}  // namespace

at::Tensor value_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 2, "hidden must be a [N, H] CUDA tensor");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto st = stat_type(hidden.scalar_type());
  const auto h = hidden.contiguous(), w = weight.contiguous();
  check_on(w, h, st, "weight");
  TORCH_CHECK(w.numel() == h.size(1), "weight must have H elements");
  if (bias.has_value()) check_on(*bias, h, st, "bias");
  auto out = at::empty({h.size(0)}, h.options().dtype(st));
  if (h.size(0) == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dvpo_value_head_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_project<scalar_t, acc_t>(h.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), opt_ptr<acc_t>(bias), nullptr,
                                    out.data_ptr<acc_t>(), nullptr, 1, h.size(0), h.size(1), stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& values, const at::Tensor& rewards, const at::Tensor& mask,
                                       double gamma, double lam) {
  TORCH_CHECK(values.is_cuda() && values.dim() == 2, "values must be a [B, T] CUDA tensor");
  const c10::cuda::CUDAGuard guard(values.device());
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "values must be fp32 or fp64");
  const auto v = values.contiguous(), r = rewards.contiguous(), m = mask.contiguous();
  check_on(r, v, st, "rewards");
  check_on(m, v, at::kBool, "mask");
  TORCH_CHECK(r.sizes() == v.sizes() && m.sizes() == v.sizes(), "values, rewards and mask must have one shape");
  auto adv = at::empty_like(v), ret = at::empty_like(v);
  if (v.numel() == 0) return {adv, ret};
  AT_DISPATCH_FLOATING_TYPES(st, "dvpo_gae_cuda", [&] {
    auto a = scan_args<scalar_t>(v.size(1), gamma, lam);
    a.values = v.data_ptr<scalar_t>();
    a.mask = m.data_ptr<bool>();
    a.rewards = r.data_ptr<scalar_t>();
    a.adv = adv.data_ptr<scalar_t>();
    a.ret = ret.data_ptr<scalar_t>();
    launch_scan(a, v.size(0), c10::cuda::getCurrentCUDAStream());
  });
  return {adv, ret};
}

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps, bool per_row) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "x must be fp32 or fp64");
  const auto xc = x.contiguous(), m = mask.contiguous();
  check_on(m, xc, at::kBool, "mask");
  TORCH_CHECK(m.sizes() == xc.sizes(), "mask must have the shape of x");
  TORCH_CHECK(!per_row || xc.dim() == 2, "per-row whitening needs a 2-D x");
  auto out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  const int64_t rows = per_row ? xc.size(0) : 1, len = per_row ? xc.size(1) : xc.numel();
  const int64_t bpr = blocks_per_row(rows, len);
  TORCH_CHECK(rows * bpr <= std::numeric_limits<int32_t>::max(), "too many rows for one launch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(st, "dvpo_masked_whiten_cuda", [&] {
    at::Tensor ws;
    auto* parts = workspace<scalar_t>(ws, rows * bpr, xc);
    moments_kernel<scalar_t><<<static_cast<unsigned>(rows * bpr), kStatThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), m.data_ptr<bool>(), len, bpr, parts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_whiten<scalar_t>(xc.data_ptr<scalar_t>(), m.data_ptr<bool>(), out.data_ptr<scalar_t>(), parts, bpr, rows,
                            len, bpr, eps, shift_mean, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dvpo_advantages(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& score, const AdvParams& p) {
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 3, "gvm_hidden must be a [B, T, H] CUDA tensor");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto st = stat_type(hidden.scalar_type());
  const auto h = hidden.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  const int64_t rows = h.size(0), len = h.size(1), hdim = h.size(2);
  check_on(w, h, st, "value_weight");
  TORCH_CHECK(w.numel() == hdim, "value_weight must have H elements");
  check_on(m, h, at::kBool, "mask");
  TORCH_CHECK(m.dim() == 2 && m.size(0) == rows && m.size(1) == len, "mask must be [B, T]");
  if (bias.has_value()) check_on(*bias, h, st, "value_bias");
  const bool has_kl = ref_logprobs.has_value() && p.kl_coef != 0.0;
  at::Tensor old, ref;
  if (has_kl) {
    TORCH_CHECK(old_logprobs.has_value(), "old_logprobs is required with ref_logprobs");
    old = old_logprobs->contiguous();
    ref = ref_logprobs->contiguous();
    check_on(old, h, st, "old_logprobs");
    check_on(ref, h, st, "ref_logprobs");
    TORCH_CHECK(old.numel() == rows * len && ref.numel() == rows * len, "old/ref log-probs must be [B, T]");
  }
  std::optional<at::Tensor> sc;
  if (score.has_value()) {
    sc = score->contiguous();
    check_on(*sc, h, st, "score");
    TORCH_CHECK(sc->numel() == rows, "score must be [B]");
  }
  auto values = at::empty({rows, len}, h.options().dtype(st));
  auto adv = at::empty_like(values), ret = at::empty_like(values);
  if (values.numel() == 0) return {adv, ret, values};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = (len + kProjTokens - 1) / kProjTokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dvpo_advantages_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor tile_ws, stats, adv_ws;
    Moments<acc_t>* tile_parts = nullptr;
    if (p.value_norm != ValueNorm::kNone) tile_parts = workspace<acc_t>(tile_ws, rows * tiles, h);
    launch_project<scalar_t, acc_t>(h.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), opt_ptr<acc_t>(bias),
                                    m.data_ptr<bool>(), values.data_ptr<acc_t>(), tile_parts, rows, len, hdim, stream);
    if (p.value_norm == ValueNorm::kBatch) {
      stats = at::empty({2}, values.options());
      finalize_kernel<acc_t><<<1, kFinalizeThreads, 0, stream>>>(tile_parts, rows * tiles,
                                                                   static_cast<acc_t>(kWhitenEps),
                                                                   stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    Moments<acc_t>* adv_parts = p.whiten_advantages ? workspace<acc_t>(adv_ws, rows, h) : nullptr;

    auto a = scan_args<acc_t>(len, p.gamma, p.lam);
    a.values = values.data_ptr<acc_t>();
    a.values_out = values.data_ptr<acc_t>();
    a.mask = m.data_ptr<bool>();
    if (has_kl) {
      a.old_lp = old.data_ptr<acc_t>();
      a.ref_lp = ref.data_ptr<acc_t>();
      a.neg_kl = static_cast<acc_t>(-p.kl_coef);
    }
    a.score = opt_ptr<acc_t>(sc);
    a.norm = p.value_norm;
    a.value_parts = tile_parts;
    a.parts_per_row = tiles;
    a.value_stats = p.value_norm == ValueNorm::kBatch ? stats.data_ptr<acc_t>() : nullptr;
    a.adv = adv.data_ptr<acc_t>();
    a.ret = ret.data_ptr<acc_t>();
    a.adv_parts = adv_parts;
    launch_scan(a, rows, stream);

    if (p.whiten_advantages) {
      const int64_t n = rows * len;
      launch_whiten<acc_t>(a.adv, a.mask, a.adv, adv_parts, rows, 1, n, blocks_per_row(1, n), kWhitenEps, true,
                           stream);
    }
  });
  return {adv, ret, values};
}

}  // namespace dvpo::cuda
