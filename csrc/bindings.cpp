// Python bindings of dvpo_kernels._C: one function per op, dispatched on the device of the
// first tensor (CUDA kernels when built with CUDA, else the C++ CPU twins).
#include <torch/extension.h>

#include <string>

#include "dvpo_kernels.h"

namespace {

#ifdef DVPO_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// True when the op runs on CUDA; rejects devices the extension has no kernels for.
bool use_cuda(const at::Tensor& t) {
  if (t.is_cuda()) {
    TORCH_CHECK(kWithCuda, "dvpo_kernels._C was built without CUDA; rebuild with nvcc and a CUDA-enabled torch");
    return true;
  }
  TORCH_CHECK(t.device().is_cpu(), "dvpo_kernels._C has no kernels for ", t.device().type(), " tensors");
  return false;
}

void same_device(const at::Tensor& ref, const std::optional<at::Tensor>& t, const char* name) {
  if (t.has_value()) TORCH_CHECK(t->device() == ref.device(), name, " is on ", t->device(), ", expected ", ref.device());
}

dvpo::ValueNorm parse_value_norm(const std::string& s) {
  if (s == "seq") return dvpo::ValueNorm::kSeq;
  if (s == "batch") return dvpo::ValueNorm::kBatch;
  TORCH_CHECK(s == "none", "value_norm must be 'seq', 'batch' or 'none', got '", s, "'");
  return dvpo::ValueNorm::kNone;
}

#ifdef DVPO_WITH_CUDA
#define DVPO_CALL(t, fn, ...) (use_cuda(t) ? dvpo::cuda::fn(__VA_ARGS__) : dvpo::cpu::fn(__VA_ARGS__))
#else
#define DVPO_CALL(t, fn, ...) (use_cuda(t), dvpo::cpu::fn(__VA_ARGS__))
#endif

at::Tensor value_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  same_device(hidden, weight, "weight");
  same_device(hidden, bias, "bias");
  return DVPO_CALL(hidden, value_head, hidden, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& values, const at::Tensor& rewards, const at::Tensor& mask,
                                       double gamma, double lam) {
  same_device(values, rewards, "rewards");
  same_device(values, mask, "mask");
  return DVPO_CALL(values, gae, values, rewards, mask, gamma, lam);
}

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps, bool per_row) {
  same_device(x, mask, "mask");
  return DVPO_CALL(x, masked_whiten, x, mask, shift_mean, eps, per_row);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dvpo_advantages(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs, double kl_coef,
    const std::optional<at::Tensor>& score, double gamma, double lam, const std::string& value_norm,
    bool whiten_advantages) {
  same_device(hidden, weight, "value_weight");
  same_device(hidden, bias, "value_bias");
  same_device(hidden, mask, "mask");
  same_device(hidden, old_logprobs, "old_logprobs");
  same_device(hidden, ref_logprobs, "ref_logprobs");
  same_device(hidden, score, "score");
  dvpo::AdvParams p;
  p.kl_coef = kl_coef;
  p.gamma = gamma;
  p.lam = lam;
  p.value_norm = parse_value_norm(value_norm);
  p.whiten_advantages = whiten_advantages;
  return DVPO_CALL(hidden, dvpo_advantages, hidden, weight, bias, mask, old_logprobs, ref_logprobs, score, p);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "dvpo_kernels native kernels: value head, masked GAE, masked whitening, fused DVPO advantages";
  m.attr("with_cuda") = py::bool_(kWithCuda);
  m.def("value_head", &value_head, "hidden [N, H] @ weight [H] + bias -> values [N]", py::arg("hidden"),
        py::arg("weight"), py::arg("bias"));
  m.def("gae", &gae, "masked reverse GAE scan over [B, T] -> (advantages, returns)", py::arg("values"),
        py::arg("rewards"), py::arg("mask"), py::arg("gamma"), py::arg("lam"));
  m.def("masked_whiten", &masked_whiten, "whiten the valid entries (all of them, or per row of a 2-D x)",
        py::arg("x"), py::arg("mask"), py::arg("shift_mean"), py::arg("eps"), py::arg("per_row"));
  m.def("dvpo_advantages", &dvpo_advantages,
        "value head + value normalisation + KL/score rewards + GAE + advantage whitening -> "
        "(advantages, returns, values)",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("mask"), py::arg("old_logprobs"),
        py::arg("ref_logprobs"), py::arg("kl_coef"), py::arg("score"), py::arg("gamma"), py::arg("lam"),
        py::arg("value_norm"), py::arg("whiten_advantages"));
}
