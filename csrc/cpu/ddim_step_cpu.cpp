// due_ext::ddim_step: one DDIM update for B independent chains, fused into one pass over memory.
// Defines the operator schema (CPU always builds) and its CPU kernel; the CUDA kernel lives in
// csrc/cuda/ddim_step_cuda.cu, autograd and the fake (meta) implementation in due_ext/ops/ddim.py.
// The formula and its oracle are in due_ext/ops/ddim_reference.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace due_ext {
namespace {

// Per-chain coefficients, in double precision: x0 = x_scale * x_t + eps_scale * eps, then
// x_prev = prev_scale * clamp(x0) + direction * eps + sigma * noise.
// Keep in sync with ddim_coefficients() in csrc/cuda/ddim_step_cuda.cu (both are tested against the reference).
struct DdimCoefficients {
  double x_scale, eps_scale, prev_scale, direction, sigma;
};

DdimCoefficients ddim_coefficients(double alpha_t, double alpha_prev, double eta) {
  DdimCoefficients c{};
  const double sqrt_alpha_t = std::sqrt(alpha_t);
  c.x_scale = 1.0 / sqrt_alpha_t;
  c.eps_scale = -std::sqrt(1.0 - alpha_t) / sqrt_alpha_t;
  c.prev_scale = std::sqrt(alpha_prev);
  // eta == 0 gives exactly 0 (the general formula is 0 * inf = NaN when alpha_t == 1).
  c.sigma = eta > 0 ? eta * std::sqrt((1.0 - alpha_prev) / (1.0 - alpha_t)) * std::sqrt(1.0 - alpha_t / alpha_prev)
                    : 0.0;
  c.direction = std::sqrt(std::max(0.0, 1.0 - alpha_prev - c.sigma * c.sigma));
  return c;
}

// One chain's contiguous segment [begin, end). Templated on the two options so the inner loop has no
// branches and the compiler vectorises it (-O3 -march=native; `omp simd` states there is no aliasing).
template <typename scalar_t, bool kClip, bool kNoise>
void ddim_segment(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ eps,
                  const scalar_t* __restrict__ noise, scalar_t* __restrict__ out, int64_t begin, int64_t end,
                  const DdimCoefficients& c, double clip) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t xs = static_cast<opmath_t>(c.x_scale);
  const opmath_t es = static_cast<opmath_t>(c.eps_scale);
  const opmath_t ps = static_cast<opmath_t>(c.prev_scale);
  const opmath_t dir = static_cast<opmath_t>(c.direction);
  const opmath_t sg = static_cast<opmath_t>(c.sigma);
  const opmath_t hi = static_cast<opmath_t>(clip);
  const opmath_t lo = -hi;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t e = static_cast<opmath_t>(eps[i]);
    opmath_t x0 = xs * static_cast<opmath_t>(x_t[i]) + es * e;
    if constexpr (kClip) {
      x0 = std::min(std::max(x0, lo), hi);
    }
    opmath_t y = ps * x0 + dir * e;
    if constexpr (kNoise) {
      y += sg * static_cast<opmath_t>(noise[i]);
    }
    out[i] = static_cast<scalar_t>(y);
  }
}

void check_inputs(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& alpha_t,
                  const at::Tensor& alpha_prev, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(x_t.dim() >= 1, "due_ext::ddim_step: x_t must be (B, ...), got a 0-d tensor");
  TORCH_CHECK(eps.sizes() == x_t.sizes(), "due_ext::ddim_step: eps has shape ", eps.sizes(), " but x_t has ",
              x_t.sizes());
  TORCH_CHECK(eps.scalar_type() == x_t.scalar_type(), "due_ext::ddim_step: eps is ", eps.scalar_type(),
              " but x_t is ", x_t.scalar_type());
  const int64_t batch = x_t.size(0);
  for (const at::Tensor* alpha : {&alpha_t, &alpha_prev}) {
    TORCH_CHECK(alpha->dim() == 1 && alpha->size(0) == batch,
                "due_ext::ddim_step: alphas must have shape (B,) = (", batch, ",), got ", alpha->sizes());
    TORCH_CHECK(alpha->device() == x_t.device(), "due_ext::ddim_step: alphas are on ", alpha->device(),
                " but x_t is on ", x_t.device());
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x_t.sizes(), "due_ext::ddim_step: noise has shape ", noise->sizes(),
                " but x_t has ", x_t.sizes());
    TORCH_CHECK(noise->scalar_type() == x_t.scalar_type(), "due_ext::ddim_step: noise is ", noise->scalar_type(),
                " but x_t is ", x_t.scalar_type());
  }
}

at::Tensor ddim_step_cpu(const at::Tensor& x_t_in, const at::Tensor& eps_in, const at::Tensor& alpha_t_in,
                         const at::Tensor& alpha_prev_in, double eta, const c10::optional<at::Tensor>& noise_in,
                         c10::optional<double> clip_x0) {
  check_inputs(x_t_in, eps_in, alpha_t_in, alpha_prev_in, noise_in);
  TORCH_CHECK(x_t_in.device().is_cpu(), "due_ext::ddim_step (CPU kernel): tensors are on ", x_t_in.device());
  TORCH_CHECK(eta >= 0, "due_ext::ddim_step: eta must be >= 0, got ", eta);
  const bool use_noise = eta > 0;
  TORCH_CHECK(!use_noise || noise_in.has_value(), "due_ext::ddim_step: eta = ", eta, " > 0 needs noise");
  TORCH_CHECK(!clip_x0.has_value() || *clip_x0 > 0, "due_ext::ddim_step: clip_x0 must be > 0, got ",
              clip_x0.value_or(0.0));

  const at::Tensor x_t = x_t_in.contiguous();
  const at::Tensor eps = eps_in.contiguous();
  const at::Tensor noise = use_noise ? noise_in->contiguous() : at::Tensor();
  const at::Tensor alpha_t = alpha_t_in.to(at::kDouble).contiguous();
  const at::Tensor alpha_prev = alpha_prev_in.to(at::kDouble).contiguous();
  at::Tensor out = at::empty_like(x_t);

  const int64_t batch = x_t.size(0);
  const int64_t total = x_t.numel();
  if (total == 0) return out;
  const int64_t per_chain = total / batch;
  const double* a_t = alpha_t.const_data_ptr<double>();
  const double* a_prev = alpha_prev.const_data_ptr<double>();
  const bool clip = clip_x0.has_value();
  const double clip_value = clip_x0.value_or(0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "due_ext::ddim_step", [&] {
    const scalar_t* x_ptr = x_t.const_data_ptr<scalar_t>();
    const scalar_t* e_ptr = eps.const_data_ptr<scalar_t>();
    const scalar_t* n_ptr = use_noise ? noise.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    // Flat range over all chains; each worker walks its share chain segment by chain segment, so tiny
    // per-chain sizes and few huge chains are both split evenly. The grain keeps small steps on one thread.
    at::parallel_for(0, total, /*grain_size=*/1 << 15, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t chain = i / per_chain;
        const int64_t stop = std::min(end, (chain + 1) * per_chain);
        const DdimCoefficients c = ddim_coefficients(a_t[chain], a_prev[chain], eta);
        if (clip) {
          if (use_noise) ddim_segment<scalar_t, true, true>(x_ptr, e_ptr, n_ptr, o_ptr, i, stop, c, clip_value);
          else ddim_segment<scalar_t, true, false>(x_ptr, e_ptr, n_ptr, o_ptr, i, stop, c, clip_value);
        } else {
          if (use_noise) ddim_segment<scalar_t, false, true>(x_ptr, e_ptr, n_ptr, o_ptr, i, stop, c, clip_value);
          else ddim_segment<scalar_t, false, false>(x_ptr, e_ptr, n_ptr, o_ptr, i, stop, c, clip_value);
        }
        i = stop;
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace due_ext

TORCH_LIBRARY_FRAGMENT(due_ext, m) {
  m.def("ddim_step(Tensor x_t, Tensor eps, Tensor alpha_t, Tensor alpha_prev, float eta, Tensor? noise, "
        "float? clip_x0) -> Tensor");
}

TORCH_LIBRARY_IMPL(due_ext, CPU, m) {
  m.impl("ddim_step", &due_ext::ddim_step_cpu);
}
