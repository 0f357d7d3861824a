// CUDA kernel of due_ext::ddim_step (schema and CPU kernel: csrc/cpu/ddim_step_cpu.cpp; formula and oracle:
// due_ext/ops/ddim_reference.py). Grid: x covers the elements of one chain, y covers chains; each thread
// forms its chain's coefficients once (double precision) and then streams x_t, eps, noise -> x_prev.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace due_ext {
namespace {

// Same values as ddim_coefficients() in csrc/cpu/ddim_step_cpu.cpp; keep the two in sync.
struct DdimCoefficients {
  double x_scale, eps_scale, prev_scale, direction, sigma;
};

__device__ __forceinline__ DdimCoefficients ddim_coefficients(double alpha_t, double alpha_prev, double eta) {
  DdimCoefficients c;
  const double sqrt_alpha_t = sqrt(alpha_t);
  c.x_scale = 1.0 / sqrt_alpha_t;
  c.eps_scale = -sqrt(1.0 - alpha_t) / sqrt_alpha_t;
  c.prev_scale = sqrt(alpha_prev);
  c.sigma = eta > 0 ? eta * sqrt((1.0 - alpha_prev) / (1.0 - alpha_t)) * sqrt(1.0 - alpha_t / alpha_prev) : 0.0;
  c.direction = sqrt(fmax(0.0, 1.0 - alpha_prev - c.sigma * c.sigma));
  return c;
}

template <typename scalar_t, bool kClip, bool kNoise>
__global__ void ddim_step_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ eps,
                                 const scalar_t* __restrict__ noise, const double* __restrict__ alpha_t,
                                 const double* __restrict__ alpha_prev, scalar_t* __restrict__ out, int64_t batch,
                                 int64_t per_chain, double eta, double clip) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const opmath_t hi = static_cast<opmath_t>(clip);
  for (int64_t chain = blockIdx.y; chain < batch; chain += gridDim.y) {
    const DdimCoefficients c = ddim_coefficients(__ldg(alpha_t + chain), __ldg(alpha_prev + chain), eta);
    const opmath_t xs = static_cast<opmath_t>(c.x_scale);
    const opmath_t es = static_cast<opmath_t>(c.eps_scale);
    const opmath_t ps = static_cast<opmath_t>(c.prev_scale);
    const opmath_t dir = static_cast<opmath_t>(c.direction);
    const opmath_t sg = static_cast<opmath_t>(c.sigma);
    const int64_t offset = chain * per_chain;
    for (int64_t j = start; j < per_chain; j += stride) {
      const int64_t i = offset + j;
      const opmath_t e = static_cast<opmath_t>(eps[i]);
      opmath_t x0 = xs * static_cast<opmath_t>(x_t[i]) + es * e;
      if constexpr (kClip) {
        // fmin/fmax would drop NaN; comparisons keep it, like torch.clamp.
        x0 = x0 < -hi ? -hi : (x0 > hi ? hi : x0);
      }
      opmath_t y = ps * x0 + dir * e;
      if constexpr (kNoise) {
        y += sg * static_cast<opmath_t>(noise[i]);
      }
      out[i] = static_cast<scalar_t>(y);
    }
  }
}

constexpr int kThreads = 256;

template <typename scalar_t, bool kClip, bool kNoise>
void launch_ddim_step(dim3 grid, cudaStream_t stream, const scalar_t* x_t, const scalar_t* eps, const scalar_t* noise,
                      const double* alpha_t, const double* alpha_prev, scalar_t* out, int64_t batch,
                      int64_t per_chain, double eta, double clip) {
  ddim_step_kernel<scalar_t, kClip, kNoise>
      <<<grid, kThreads, 0, stream>>>(x_t, eps, noise, alpha_t, alpha_prev, out, batch, per_chain, eta, clip);
}

at::Tensor ddim_step_cuda(const at::Tensor& x_t_in, const at::Tensor& eps_in, const at::Tensor& alpha_t_in,
                          const at::Tensor& alpha_prev_in, double eta, const c10::optional<at::Tensor>& noise_in,
                          c10::optional<double> clip_x0) {
  TORCH_CHECK(x_t_in.is_cuda(), "due_ext::ddim_step (CUDA kernel): x_t is on ", x_t_in.device());
  TORCH_CHECK(x_t_in.dim() >= 1, "due_ext::ddim_step: x_t must be (B, ...), got a 0-d tensor");
  TORCH_CHECK(eps_in.sizes() == x_t_in.sizes() && eps_in.scalar_type() == x_t_in.scalar_type() &&
                  eps_in.device() == x_t_in.device(),
              "due_ext::ddim_step: eps (", eps_in.sizes(), ", ", eps_in.scalar_type(), ", ", eps_in.device(),
              ") must match x_t (", x_t_in.sizes(), ", ", x_t_in.scalar_type(), ", ", x_t_in.device(), ")");
  const int64_t batch = x_t_in.size(0);
  for (const at::Tensor* alpha : {&alpha_t_in, &alpha_prev_in}) {
    TORCH_CHECK(alpha->dim() == 1 && alpha->size(0) == batch && alpha->device() == x_t_in.device(),
                "due_ext::ddim_step: alphas must be (B,) = (", batch, ",) on ", x_t_in.device(), ", got ",
                alpha->sizes(), " on ", alpha->device());
  }
  TORCH_CHECK(eta >= 0, "due_ext::ddim_step: eta must be >= 0, got ", eta);
  const bool use_noise = eta > 0;
  TORCH_CHECK(!use_noise || noise_in.has_value(), "due_ext::ddim_step: eta = ", eta, " > 0 needs noise");
  if (use_noise) {
    TORCH_CHECK(noise_in->sizes() == x_t_in.sizes() && noise_in->scalar_type() == x_t_in.scalar_type() &&
                    noise_in->device() == x_t_in.device(),
                "due_ext::ddim_step: noise (", noise_in->sizes(), ", ", noise_in->scalar_type(),
                ") must match x_t (", x_t_in.sizes(), ", ", x_t_in.scalar_type(), ")");
  }
  TORCH_CHECK(!clip_x0.has_value() || *clip_x0 > 0, "due_ext::ddim_step: clip_x0 must be > 0, got ",
              clip_x0.value_or(0.0));

  const c10::cuda::CUDAGuard guard(x_t_in.device());
  const at::Tensor x_t = x_t_in.contiguous();
  const at::Tensor eps = eps_in.contiguous();
  const at::Tensor noise = use_noise ? noise_in->contiguous() : at::Tensor();
  const at::Tensor alpha_t = alpha_t_in.to(at::kDouble).contiguous();
  const at::Tensor alpha_prev = alpha_prev_in.to(at::kDouble).contiguous();
  at::Tensor out = at::empty_like(x_t);
  const int64_t total = x_t.numel();
  if (total == 0) return out;
  const int64_t per_chain = total / batch;

  // Enough blocks per chain to cover it, capped so huge chains use a grid-stride loop; chains beyond the
  // y-limit of the grid are walked by the chain loop.
  const int64_t blocks_x = std::min<int64_t>((per_chain + kThreads - 1) / kThreads, 4096);
  const int64_t blocks_y = std::min<int64_t>(batch, 65535);
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  const bool clip = clip_x0.has_value();
  const double clip_value = clip_x0.value_or(0.0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "due_ext::ddim_step_cuda", [&] {
    const scalar_t* x_ptr = x_t.const_data_ptr<scalar_t>();
    const scalar_t* e_ptr = eps.const_data_ptr<scalar_t>();
    const scalar_t* n_ptr = use_noise ? noise.const_data_ptr<scalar_t>() : nullptr;
    const double* at_ptr = alpha_t.const_data_ptr<double>();
    const double* ap_ptr = alpha_prev.const_data_ptr<double>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    // The two options become template flags so the inner loop carries no branches.
    auto launch = [&](auto clip_flag, auto noise_flag) {
      launch_ddim_step<scalar_t, decltype(clip_flag)::value, decltype(noise_flag)::value>(
          grid, stream, x_ptr, e_ptr, n_ptr, at_ptr, ap_ptr, o_ptr, batch, per_chain, eta, clip_value);
    };
    if (clip && use_noise) launch(std::true_type{}, std::true_type{});
    else if (clip) launch(std::true_type{}, std::false_type{});
    else if (use_noise) launch(std::false_type{}, std::true_type{});
    else launch(std::false_type{}, std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace due_ext

TORCH_LIBRARY_IMPL(due_ext, CUDA, m) {
  m.impl("ddim_step", &due_ext::ddim_step_cuda);
}
