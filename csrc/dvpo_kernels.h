// Entry points of the dvpo_kernels._C extension. Each op has a C++ CPU twin and, when the
// extension is built with CUDA, a CUDA implementation; bindings.cpp dispatches on the device.
//
// Dtypes: hidden may be fp16/bf16/fp32/fp64; everything else arrives in the statistics dtype
// (fp32, or fp64 for fp64 hidden), already cast by the Python layer. Outputs are in that dtype.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dvpo {

// value_norm of dvpo_advantages.
enum class ValueNorm : int { kNone = 0, kSeq = 1, kBatch = 2 };

// Hyper-parameters of the advantage recipe, in double; the kernels cast them once.
struct AdvParams {
  double kl_coef = 0.0;
  double gamma = 1.0;
  double lam = 0.95;
  ValueNorm value_norm = ValueNorm::kSeq;
  bool whiten_advantages = true;
};

// Whitening epsilon of the DVPO recipe (values and advantages), as in the PyTorch backend.
constexpr double kWhitenEps = 1e-8;

namespace cpu {
at::Tensor value_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& values, const at::Tensor& rewards, const at::Tensor& mask,
                                       double gamma, double lam);
at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps, bool per_row);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dvpo_advantages(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& score, const AdvParams& p);
}  // namespace cpu

#ifdef DVPO_WITH_CUDA
namespace cuda {
at::Tensor value_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& values, const at::Tensor& rewards, const at::Tensor& mask,
                                       double gamma, double lam);
at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps, bool per_row);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dvpo_advantages(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& score, const AdvParams& p);
}  // namespace cuda
#endif

}  // namespace dvpo
