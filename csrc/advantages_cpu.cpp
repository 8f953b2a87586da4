// C++ CPU twins of the advantage kernels: the same semantics as the PyTorch backend
// (dvpo_kernels/torch_backend/advantages.py), rows in parallel with at::parallel_for.
// Per-element math runs in the statistics dtype (fp32, fp64 for fp64 input); reductions
// for means and variances run in double over fixed chunks merged in order, so results do
// not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dvpo_kernels.h"
#include "moments.h"

namespace dvpo::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task / statistics chunk

int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1)); }

// Dot product with 8 independent accumulators: vectorisable, and pairwise-summed at the end.
template <typename in_t, typename acc_t>
acc_t dot(const in_t* h, const acc_t* w, int64_t n) {
  constexpr int kLanes = 8;
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += static_cast<acc_t>(h[i + l]) * w[i + l];
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(h[i]) * w[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// out[i] = h[i] . w + bias; rows with mask 0 are not read and get 0.
template <typename in_t, typename acc_t>
void project(const in_t* h, const acc_t* w, const acc_t* bias, const bool* mask, acc_t* out, int64_t n,
             int64_t hdim) {
  const acc_t b = bias != nullptr ? *bias : acc_t(0);
  at::parallel_for(0, n, row_grain(hdim), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      out[i] = (mask != nullptr && !mask[i]) ? acc_t(0) : dot(h + i * hdim, w, hdim) + b;
    }
  });
}

// Exact two-pass moments of the valid entries of one contiguous range.
template <typename acc_t>
Moments<double> range_moments(const acc_t* x, const bool* m, int64_t n) {
  int64_t count = 0;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (m[i]) {
      ++count;
      sum += static_cast<double>(x[i]);
    }
  }
  if (count == 0) return {0, 0.0, 0.0};
  const double mean = sum / static_cast<double>(count);
  double m2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (m[i]) {
      const double d = static_cast<double>(x[i]) - mean;
      m2 += d * d;
    }
  }
  return {count, mean, m2};
}

// Moments over [0, n): fixed chunks in parallel, merged in chunk order.
template <typename acc_t>
Moments<double> moments(const acc_t* x, const bool* m, int64_t n) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<Moments<double>> parts(chunks, Moments<double>{0, 0.0, 0.0});
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t start = c * kGrain;
      parts[c] = range_moments(x + start, m + start, std::min(kGrain, n - start));
    }
  });
  Moments<double> acc{0, 0.0, 0.0};
  for (const auto& p : parts) acc = merge(acc, p);
  return acc;
}

// out = (x - mean) / sqrt(var + eps) (+ mean back unless shift_mean) on valid entries, else 0.
template <typename acc_t>
void whiten_range(const acc_t* x, const bool* m, acc_t* out, int64_t n, const Moments<double>& st, double eps,
                  bool shift_mean) {
  const acc_t mean = static_cast<acc_t>(st.mean);
  const acc_t rstd = static_cast<acc_t>(inv_std(st, eps));
  const acc_t back = shift_mean ? acc_t(0) : mean;
  for (int64_t i = 0; i < n; ++i) out[i] = m[i] ? (x[i] - mean) * rstd + back : acc_t(0);
}

template <typename acc_t>
void whiten_all(const acc_t* x, const bool* m, acc_t* out, int64_t n, double eps, bool shift_mean) {
  const Moments<double> st = moments(x, m, n);
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    whiten_range(x + lo, m + lo, out + lo, hi - lo, st, eps, shift_mean);
  });
}

template <typename acc_t>
void whiten_rows(const acc_t* x, const bool* m, acc_t* out, int64_t rows, int64_t len, double eps, bool shift_mean) {
  at::parallel_for(0, rows, row_grain(len), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t o = r * len;
      whiten_range(x + o, m + o, out + o, len, range_moments(x + o, m + o, len), eps, shift_mean);
    }
  });
}

// Reverse GAE scan of one row. Masked positions are skipped (0 in both outputs); the next
// value of a valid token is the value of the next valid token, 0 after the last one.
// reward(t, is_last_valid) gives r_t; the expression order matches the PyTorch backend.
template <typename acc_t, typename Reward>
void scan_row(const acc_t* v, const bool* m, int64_t len, acc_t gamma, acc_t gl, const Reward& reward, acc_t* adv,
              acc_t* ret) {
  acc_t next_v = 0, next_a = 0;
  bool seen = false;
  for (int64_t t = len - 1; t >= 0; --t) {
    if (!m[t]) {
      adv[t] = 0;
      ret[t] = 0;
      continue;
    }
    const acc_t a = reward(t, !seen) + gamma * next_v - v[t] + gl * next_a;
    adv[t] = a;
    ret[t] = a + v[t];
    next_v = v[t];
    next_a = a;
    seen = true;
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_stat(const at::Tensor& t, at::ScalarType st, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == st, name, " must have dtype ", st, ", got ", t.scalar_type());
}

at::ScalarType stat_type(at::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

template <typename acc_t>
const acc_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<acc_t>() : nullptr;
}

}  // namespace

at::Tensor value_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_cpu(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [N, H]");
  const auto st = stat_type(hidden.scalar_type());
  const auto h = hidden.contiguous();
  const auto w = weight.contiguous();
  check_stat(w, st, "weight");
  TORCH_CHECK(w.numel() == h.size(1), "weight must have H elements");
  if (bias.has_value()) check_stat(*bias, st, "bias");
  auto out = at::empty({h.size(0)}, h.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dvpo_value_head_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    project<scalar_t, acc_t>(h.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), opt_ptr<acc_t>(bias), nullptr,
                             out.data_ptr<acc_t>(), h.size(0), h.size(1));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& values, const at::Tensor& rewards, const at::Tensor& mask,
                                       double gamma, double lam) {
  TORCH_CHECK(values.dim() == 2, "values must be [B, T]");
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "values must be fp32 or fp64");
  const auto v = values.contiguous(), r = rewards.contiguous(), m = mask.contiguous();
  check_stat(v, st, "values");
  check_stat(r, st, "rewards");
  check_stat(m, at::kBool, "mask");
  TORCH_CHECK(r.sizes() == v.sizes() && m.sizes() == v.sizes(), "values, rewards and mask must have one shape");
  const int64_t rows = v.size(0), len = v.size(1);
  auto adv = at::empty_like(v), ret = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(st, "dvpo_gae_cpu", [&] {
    const scalar_t g = static_cast<scalar_t>(gamma), gl = static_cast<scalar_t>(gamma * lam);
    const scalar_t *vp = v.data_ptr<scalar_t>(), *rp = r.data_ptr<scalar_t>();
    const bool* mp = m.data_ptr<bool>();
    scalar_t *ap = adv.data_ptr<scalar_t>(), *tp = ret.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(len), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t o = b * len;
        scan_row(vp + o, mp + o, len, g, gl, [&](int64_t t, bool) { return rp[o + t]; }, ap + o, tp + o);
      }
    });
  });
  return {adv, ret};
}

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps, bool per_row) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "x must be fp32 or fp64");
  const auto xc = x.contiguous(), m = mask.contiguous();
  check_stat(xc, st, "x");
  check_stat(m, at::kBool, "mask");
  TORCH_CHECK(m.sizes() == xc.sizes(), "mask must have the shape of x");
  TORCH_CHECK(!per_row || xc.dim() == 2, "per-row whitening needs a 2-D x");
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(st, "dvpo_masked_whiten_cpu", [&] {
    if (per_row) {
      whiten_rows(xc.data_ptr<scalar_t>(), m.data_ptr<bool>(), out.data_ptr<scalar_t>(), xc.size(0), xc.size(1), eps,
                  shift_mean);
    } else {
      whiten_all(xc.data_ptr<scalar_t>(), m.data_ptr<bool>(), out.data_ptr<scalar_t>(), xc.numel(), eps, shift_mean);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dvpo_advantages(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& score, const AdvParams& p) {
  check_cpu(hidden, "gvm_hidden");
  TORCH_CHECK(hidden.dim() == 3, "gvm_hidden must be [B, T, H]");
  const auto st = stat_type(hidden.scalar_type());
  const auto h = hidden.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  const int64_t rows = h.size(0), len = h.size(1), hdim = h.size(2), n = rows * len;
  check_stat(w, st, "value_weight");
  TORCH_CHECK(w.numel() == hdim, "value_weight must have H elements");
  check_stat(m, at::kBool, "mask");
  TORCH_CHECK(m.dim() == 2 && m.size(0) == rows && m.size(1) == len, "mask must be [B, T]");
  if (bias.has_value()) check_stat(*bias, st, "value_bias");
  const bool has_kl = ref_logprobs.has_value() && p.kl_coef != 0.0;
  std::optional<at::Tensor> old, ref;
  if (has_kl) {
    TORCH_CHECK(old_logprobs.has_value(), "old_logprobs is required with ref_logprobs");
    old = old_logprobs->contiguous();
    ref = ref_logprobs->contiguous();
    check_stat(*old, st, "old_logprobs");
    check_stat(*ref, st, "ref_logprobs");
    TORCH_CHECK(old->numel() == n && ref->numel() == n, "old/ref log-probs must be [B, T]");
  }
  std::optional<at::Tensor> sc;
  if (score.has_value()) {
    sc = score->contiguous();
    check_stat(*sc, st, "score");
    TORCH_CHECK(sc->numel() == rows, "score must be [B]");
  }

  auto values = at::empty({rows, len}, h.options().dtype(st));
  auto adv = at::empty_like(values), ret = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dvpo_advantages_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* mp = m.data_ptr<bool>();
    acc_t* vp = values.data_ptr<acc_t>();
    project<scalar_t, acc_t>(h.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), opt_ptr<acc_t>(bias), mp, vp, n, hdim);
    if (p.value_norm == ValueNorm::kSeq) {
      whiten_rows(vp, mp, vp, rows, len, kWhitenEps, true);
    } else if (p.value_norm == ValueNorm::kBatch) {
      whiten_all(vp, mp, vp, n, kWhitenEps, true);
    }  // kNone: projection already wrote 0 on masked tokens

    const acc_t g = static_cast<acc_t>(p.gamma), gl = static_cast<acc_t>(p.gamma * p.lam);
    const acc_t neg_kl = static_cast<acc_t>(-p.kl_coef);
    const acc_t* op = has_kl ? old->data_ptr<acc_t>() : nullptr;
    const acc_t* rp = has_kl ? ref->data_ptr<acc_t>() : nullptr;
    const acc_t* sp = opt_ptr<acc_t>(sc);
    acc_t *ap = adv.data_ptr<acc_t>(), *tp = ret.data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(len), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t o = b * len;
        const auto reward = [&](int64_t t, bool last) {
          acc_t r = has_kl ? neg_kl * (op[o + t] - rp[o + t]) : acc_t(0);
          if (sp != nullptr && last) r += sp[b];
          return r;
        };
        scan_row(vp + o, mp + o, len, g, gl, reward, ap + o, tp + o);
      }
    });
    if (p.whiten_advantages) whiten_all(ap, mp, ap, n, kWhitenEps, true);
  });
  return {adv, ret, values};
}

}  // namespace dvpo::cpu
