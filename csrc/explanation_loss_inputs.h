// Input validation and preparation of the fused explanation loss, shared by the CPU and CUDA entry points
// (host code only), so both backends accept and reject exactly the same arguments.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "explanation_loss.h"

namespace due_ext {

// Contiguous inputs in the compute dtype; soft/weights are undefined when the method does not read them.
// out_dtype: the dtype of the returned loss and CAM (the features' dtype).
struct ExplanationInputs {
  at::Tensor features, alpha, target, soft, weights;
  ExplanationMethod method;
  at::ScalarType out_dtype;
};

// float16 / bfloat16 features are computed in float32 (their 8-11 bit mantissas cannot hold the min-max,
// tanh and sums over ~1e6 voxels); float32 and float64 in their own precision.
inline at::ScalarType explanation_compute_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// The returned (loss, grad_pre, cam): loss and cam in the input dtype, grad_pre in the compute dtype (it is
// only read by the backward, which computes in that dtype too).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> explanation_outputs(const ExplanationInputs& in,
                                                                          const at::Tensor& loss,
                                                                          const at::Tensor& grad_pre,
                                                                          const at::Tensor& cam) {
  return {loss.to(in.out_dtype), grad_pre, cam.to(in.out_dtype)};
}

inline void check_explanation_volume(const at::Tensor& t, const char* name, const at::Tensor& like,
                                     const at::Tensor& features) {
  TORCH_CHECK(t.sizes() == like.sizes(), "due_ext::explanation_loss_fwd: ", name, " has shape ", t.sizes(),
              ", expected ", like.sizes(), " (the target's shape)");
  TORCH_CHECK(t.scalar_type() == features.scalar_type(), "due_ext::explanation_loss_fwd: ", name, " dtype ",
              t.scalar_type(), " differs from the compute dtype ", features.scalar_type(),
              " (the features' dtype; float32 for float16/bfloat16 features)");
  TORCH_CHECK(t.device() == features.device(), "due_ext::explanation_loss_fwd: ", name, " is on ", t.device(),
              ", the features on ", features.device());
}

inline ExplanationInputs prepare_explanation_inputs(const at::Tensor& features_in, const at::Tensor& alpha_in,
                                                    const at::Tensor& target_in,
                                                    const std::optional<at::Tensor>& soft_in,
                                                    const std::optional<at::Tensor>& weights_in,
                                                    c10::string_view method_name) {
  TORCH_CHECK(features_in.dim() == 5, "due_ext::explanation_loss_fwd: features must be (B, C, d, h, w), got ",
              features_in.sizes());
  TORCH_CHECK(alpha_in.dim() == 2 && alpha_in.size(0) == features_in.size(0) &&
                  alpha_in.size(1) == features_in.size(1),
              "due_ext::explanation_loss_fwd: alpha must be (B, C) = ", features_in.sizes().slice(0, 2), ", got ",
              alpha_in.sizes());
  TORCH_CHECK(target_in.dim() == 4 && target_in.size(0) == features_in.size(0),
              "due_ext::explanation_loss_fwd: target must be (B, X, Y, Z) with B = ", features_in.size(0), ", got ",
              target_in.sizes());
  const at::ScalarType dtype = features_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "due_ext::explanation_loss_fwd: features must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(alpha_in.scalar_type() == dtype, "due_ext::explanation_loss_fwd: alpha dtype ", alpha_in.scalar_type(),
              " differs from the features' ", dtype);
  const at::ScalarType compute = explanation_compute_dtype(dtype);
  ExplanationInputs in;
  in.method = parse_explanation_method(std::string(method_name));
  in.out_dtype = dtype;
  in.features = features_in.to(compute).contiguous();
  in.alpha = alpha_in.to(compute).contiguous();
  in.target = target_in.contiguous();
  check_explanation_volume(in.alpha, "alpha", in.alpha, in.features);
  check_explanation_volume(in.target, "target", in.target, in.features);
  const bool due_like = in.method == ExplanationMethod::kDue || in.method == ExplanationMethod::kBaselinePlus;
  TORCH_CHECK(!due_like || soft_in.has_value(), "due_ext::explanation_loss_fwd: method '", method_name,
              "' needs soft_target");
  if (due_like) {
    in.soft = soft_in->contiguous();
    check_explanation_volume(in.soft, "soft_target", in.target, in.features);
  }
  if (weights_in.has_value() && in.method != ExplanationMethod::kBaselinePlus) {
    in.weights = weights_in->contiguous();
    check_explanation_volume(in.weights, "weights", in.target, in.features);
  }
  return in;
}

}  // namespace due_ext
