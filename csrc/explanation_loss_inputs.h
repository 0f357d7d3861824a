// Input validation and preparation of the fused explanation loss, shared by the CPU and CUDA entry points
// (host code only), so both backends accept and reject exactly the same arguments.
#pragma once

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "explanation_loss.h"

namespace due_ext {

// Contiguous inputs; soft/weights are undefined when the method does not read them.
struct ExplanationInputs {
  at::Tensor features, alpha, target, soft, weights;
  ExplanationMethod method;
};

inline void check_explanation_volume(const at::Tensor& t, const char* name, const at::Tensor& like,
                                     const at::Tensor& features) {
  TORCH_CHECK(t.sizes() == like.sizes(), "due_ext::explanation_loss_fwd: ", name, " has shape ", t.sizes(),
              ", expected ", like.sizes(), " (the target's shape)");
  TORCH_CHECK(t.scalar_type() == features.scalar_type(), "due_ext::explanation_loss_fwd: ", name, " dtype ",
              t.scalar_type(), " differs from the features' ", features.scalar_type());
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
  TORCH_CHECK(features_in.scalar_type() == at::kFloat || features_in.scalar_type() == at::kDouble,
              "due_ext::explanation_loss_fwd: features must be float32 or float64, got ", features_in.scalar_type());
  ExplanationInputs in;
  in.method = parse_explanation_method(std::string(method_name));
  in.features = features_in.contiguous();
  in.alpha = alpha_in.contiguous();
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
