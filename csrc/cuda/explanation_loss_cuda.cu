// Fused explanation loss, CUDA kernels (same math as csrc/cpu/explanation_loss_cpu.cpp; see
// csrc/explanation_loss.h).
//
//   cam_kernel            grid (B, ceil(dhw/256)): cam = relu(sum_c alpha A) (keeps NaN), |sum_c alpha A|
//   plane_stats_kernel    one block per (b, x) plane: min, max of U (NaN if the plane holds one), tie counts
//   sample_stats_kernel   one thread per sample: mn, mx, #ties over the planes, the flat test's scale
//                         max |sum_c alpha A| and inv_r = minmax_inverse_range (0 when flat)
//   plane_terms_kernel    one block per plane: per-voxel terms; each thread owns columns z, so the y-adjoint
//                         P[ch, j, z] accumulates in shared memory without atomics; then the z-adjoint -> Q
//   finalize_kernel       one block per sample: loss, min/max chain rule, lift along x -> grad_pre
// Deterministic: no floating-point atomics anywhere.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cfloat>
#include <string>

#include "../explanation_loss.h"
#include "../explanation_loss_inputs.h"

namespace due_ext {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int64_t B, C, d, h, w, X, Y, Z;
};

template <typename T>
__device__ __forceinline__ T cam_at(const T* cam, const Dims& s, int64_t b, int64_t i, int64_t j, int64_t k) {
  return cam[((b * s.d + i) * s.h + j) * s.w + k];
}

// U[b, x, y, z]; the same function in both passes, so ties compare equal bit for bit.
template <typename T>
__device__ __forceinline__ T upsampled(const T* cam, const Dims& s, int64_t b, int64_t x, int64_t y, int64_t z) {
  const LerpIndex<T> lx = lerp_index<T>(s.d, s.X, x);
  const LerpIndex<T> ly = lerp_index<T>(s.h, s.Y, y);
  const LerpIndex<T> lz = lerp_index<T>(s.w, s.Z, z);
  const T gz = T(1) - lz.f, gy = T(1) - ly.f, gx = T(1) - lx.f;
  const T c00 = gz * cam_at(cam, s, b, lx.i0, ly.i0, lz.i0) + lz.f * cam_at(cam, s, b, lx.i0, ly.i0, lz.i1);
  const T c01 = gz * cam_at(cam, s, b, lx.i0, ly.i1, lz.i0) + lz.f * cam_at(cam, s, b, lx.i0, ly.i1, lz.i1);
  const T c10 = gz * cam_at(cam, s, b, lx.i1, ly.i0, lz.i0) + lz.f * cam_at(cam, s, b, lx.i1, ly.i0, lz.i1);
  const T c11 = gz * cam_at(cam, s, b, lx.i1, ly.i1, lz.i0) + lz.f * cam_at(cam, s, b, lx.i1, ly.i1, lz.i1);
  return gx * (gy * c00 + ly.f * c01) + lx.f * (gy * c10 + ly.f * c11);
}

template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

template <typename T>
__global__ void cam_kernel(const T* __restrict__ features, const T* __restrict__ alpha, T* __restrict__ cam,
                           T* __restrict__ pre_abs, Dims s) {
  const int64_t b = blockIdx.x;
  const int64_t low = s.d * s.h * s.w;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (p >= low) return;
  T acc = T(0);
  for (int64_t c = 0; c < s.C; ++c) acc += alpha[b * s.C + c] * features[(b * s.C + c) * low + p];
  cam[b * low + p] = acc < T(0) ? T(0) : acc;  // keeps NaN
  pre_abs[b * low + p] = acc < T(0) ? -acc : acc;
}

// Block-wide reductions through shared memory (blockDim.x == kThreads).
template <typename T, typename Op>
__device__ T block_reduce(T v, T* shared, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const T out = shared[0];
  __syncthreads();
  return out;
}

struct MinOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct AddOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

template <typename T>
__global__ void plane_stats_kernel(const T* __restrict__ cam, Dims s, T* __restrict__ stats,
                                   long long* __restrict__ counts) {
  __shared__ T shared_t[kThreads];
  __shared__ long long shared_n[kThreads];
  const int64_t p = blockIdx.x;
  const int64_t b = p / s.X, x = p % s.X;
  const int64_t plane = s.Y * s.Z;
  T lo = T(INFINITY), hi = T(-INFINITY);
  long long n_nan = 0;
  for (int64_t v = threadIdx.x; v < plane; v += blockDim.x) {
    const T u = upsampled(cam, s, b, x, v / s.Z, v % s.Z);
    lo = u < lo ? u : lo;
    hi = u > hi ? u : hi;
    n_nan += u != u;
  }
  lo = block_reduce(lo, shared_t, MinOp());
  hi = block_reduce(hi, shared_t, MaxOp());
  n_nan = block_reduce(n_nan, shared_n, AddOp());
  long long n_lo = 0, n_hi = 0;
  for (int64_t v = threadIdx.x; v < plane; v += blockDim.x) {
    const T u = upsampled(cam, s, b, x, v / s.Z, v % s.Z);
    n_lo += u == lo;
    n_hi += u == hi;
  }
  n_lo = block_reduce(n_lo, shared_n, AddOp());
  n_hi = block_reduce(n_hi, shared_n, AddOp());
  if (n_nan > 0) lo = hi = T(NAN);  // the comparisons above skip NaN
  if (threadIdx.x == 0) {
    stats[2 * p] = lo;
    stats[2 * p + 1] = hi;
    counts[2 * p] = n_lo;
    counts[2 * p + 1] = n_hi;
  }
}

// minmax[b] = (mn, mx, inv_r)
template <typename T>
__global__ void sample_stats_kernel(const T* __restrict__ stats, const long long* __restrict__ counts,
                                    const T* __restrict__ pre_abs, Dims s, T* __restrict__ minmax,
                                    double* __restrict__ ties) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= s.B) return;
  T lo = stats[2 * b * s.X], hi = stats[2 * b * s.X + 1];
  for (int64_t x = 1; x < s.X; ++x) {
    lo = nan_min(lo, stats[2 * (b * s.X + x)]);
    hi = nan_max(hi, stats[2 * (b * s.X + x) + 1]);
  }
  const int64_t low = s.d * s.h * s.w;
  T scale = T(0);
  for (int64_t p = 0; p < low; ++p) scale = pre_abs[b * low + p] > scale ? pre_abs[b * low + p] : scale;
  double n_lo = 0, n_hi = 0;
  for (int64_t x = 0; x < s.X; ++x) {
    if (stats[2 * (b * s.X + x)] == lo) n_lo += static_cast<double>(counts[2 * (b * s.X + x)]);
    if (stats[2 * (b * s.X + x) + 1] == hi) n_hi += static_cast<double>(counts[2 * (b * s.X + x) + 1]);
  }
  minmax[3 * b] = lo;
  minmax[3 * b + 1] = hi;
  minmax[3 * b + 2] = minmax_inverse_range(lo, hi, scale);
  ties[2 * b] = n_lo;
  ties[2 * b + 1] = n_hi;
}

template <typename T>
struct TermArgs {
  const T* cam;
  const T* target;
  const T* soft;
  const T* weights;  // nullptr: all ones
  const T* minmax;  // (B, 3): mn, mx, inv_r
  T* cam_out;  // nullptr: not written
  double* plane_sums;
  double* q;  // (B*X, kQChannels, h, w) or nullptr when no gradient is wanted
};

// Dynamic shared memory: P[kQChannels][h][Z] (T) when a gradient is wanted.
template <typename T>
__global__ void plane_terms_kernel(TermArgs<T> a, Dims s, int method, bool need_grad) {
  extern __shared__ unsigned char shared_raw[];
  T* P = reinterpret_cast<T*>(shared_raw);
  __shared__ double shared_sum[kThreads];
  const int64_t p = blockIdx.x;
  const int64_t b = p / s.X, x = p % s.X;
  const T mn = a.minmax[3 * b], mx = a.minmax[3 * b + 1];
  const T inv_r = a.minmax[3 * b + 2];  // 0 for a flat sample
  const T inv_n = T(1) / static_cast<T>(s.X * s.Y * s.Z);
  const T lo = static_cast<T>(kBceClamp), hi = T(1) - static_cast<T>(kBceClamp);
  const T k5 = static_cast<T>(kTanhScale);
  const bool due_like = method == static_cast<int>(ExplanationMethod::kDue) ||
                        method == static_cast<int>(ExplanationMethod::kBaselinePlus);
  if (need_grad) {
    for (int64_t i = threadIdx.x; i < kQChannels * s.h * s.Z; i += blockDim.x) P[i] = T(0);
  }
  __syncthreads();
  double sums[kPlaneSums] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t z = threadIdx.x; z < s.Z; z += blockDim.x) {
    for (int64_t y = 0; y < s.Y; ++y) {
      const T u = upsampled(a.cam, s, b, x, y, z);
      const int64_t v = ((b * s.X + x) * s.Y + y) * s.Z + z;
      const T sv = (u - mn) * inv_r;
      const T mv = a.target[v];
      const T wv = a.weights != nullptr ? a.weights[v] : T(1);
      T d0 = T(0), d1 = T(0);
      if (due_like) {
        const T fg = mv != T(0) ? T(1) : T(0);
        const T t = tanh(k5 * (sv - T(0.5)));
        const T diff = t - mv;
        const T dc = sv - a.soft[v];
        sums[kMainSum] += static_cast<double>(wv * fg * fabs(diff));
        sums[kContSum] += static_cast<double>(wv * fabs(dc));
        sums[kNormSum] += static_cast<double>(fg);
        d0 = wv * fg * sign_of(diff) * k5 * (T(1) - t * t);
        d1 = wv * sign_of(dc) * inv_n;
      } else if (method == static_cast<int>(ExplanationMethod::kGradia)) {
        const T diff = sv - mv;
        sums[kMainSum] += static_cast<double>(wv * fabs(diff));
        sums[kNormSum] += static_cast<double>(wv);
        d0 = wv * sign_of(diff);
      } else {
        const T sc = sv < lo ? lo : (sv > hi ? hi : sv);
        sums[kMainSum] += static_cast<double>(-wv * (mv * log(sc) + (T(1) - mv) * log(T(1) - sc)));
        sums[kNormSum] += static_cast<double>(wv);
        d0 = (sv >= lo && sv <= hi) ? wv * (sc - mv) / (sc * (T(1) - sc)) : T(0);
      }
      if (a.cam_out != nullptr) a.cam_out[v] = sv;
      if (need_grad) {
        sums[kC0Sum] += static_cast<double>(d0);
        sums[kC0SSum] += static_cast<double>(d0 * sv);
        sums[kC1Sum] += static_cast<double>(d1);
        sums[kC1SSum] += static_cast<double>(d1 * sv);
        const LerpIndex<T> ly = lerp_index<T>(s.h, s.Y, y);
        const T channel[kQChannels] = {d0, d1, u == mn ? T(1) : T(0), u == mx ? T(1) : T(0)};
        for (int ch = 0; ch < kQChannels; ++ch) {
          // only this thread touches column z: no atomics
          P[(ch * s.h + ly.i0) * s.Z + z] += (T(1) - ly.f) * channel[ch];
          P[(ch * s.h + ly.i1) * s.Z + z] += ly.f * channel[ch];
        }
      }
    }
  }
  for (int i = 0; i < kPlaneSums; ++i) {
    const double total = block_reduce(sums[i], shared_sum, AddOp());
    if (threadIdx.x == 0) a.plane_sums[p * kPlaneSums + i] = total;
  }
  if (!need_grad) return;
  __syncthreads();
  // z-adjoint: Q[ch, j, k] = sum_z Wz[z, k] P[ch, j, z]
  for (int64_t e = threadIdx.x; e < kQChannels * s.h * s.w; e += blockDim.x) {
    const int64_t k = e % s.w, cj = e / s.w;
    double acc = 0;
    for (int64_t z = 0; z < s.Z; ++z) {
      const LerpIndex<T> lz = lerp_index<T>(s.w, s.Z, z);
      const T weight = (lz.i0 == k ? T(1) - lz.f : T(0)) + (lz.i1 == k ? lz.f : T(0));
      acc += static_cast<double>(weight * P[cj * s.Z + z]);
    }
    a.q[p * kQChannels * s.h * s.w + e] = acc;
  }
}

template <typename T>
__global__ void finalize_kernel(const T* __restrict__ cam, const T* __restrict__ minmax,
                                const double* __restrict__ ties, const double* __restrict__ plane_sums,
                                const double* __restrict__ q, Dims s, int method, bool need_grad,
                                T* __restrict__ loss, T* __restrict__ grad_pre) {
  __shared__ double coef[kQChannels];
  const int64_t b = blockIdx.x;
  const bool due_like = method == static_cast<int>(ExplanationMethod::kDue) ||
                        method == static_cast<int>(ExplanationMethod::kBaselinePlus);
  if (threadIdx.x == 0) {
    double tot[kPlaneSums] = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t x = 0; x < s.X; ++x)
      for (int i = 0; i < kPlaneSums; ++i) tot[i] += plane_sums[(b * s.X + x) * kPlaneSums + i];
    const double s0 = due_like ? 1.0 / fmax(1.0, tot[kNormSum]) : 1.0 / fmax(kWeightEps, tot[kNormSum]);
    const double value = due_like
                             ? tot[kMainSum] * s0 + tot[kContSum] / static_cast<double>(s.X * s.Y * s.Z)
                             : tot[kMainSum] * s0;
    loss[b] = static_cast<T>(value);
    const double inv_r = static_cast<double>(minmax[3 * b + 2]);  // 1/R as the voxels saw it; 0 when flat
    const double g_sum = s0 * tot[kC0Sum] + tot[kC1Sum];
    const double gs_sum = s0 * tot[kC0SSum] + tot[kC1SSum];
    coef[0] = inv_r * s0;
    coef[1] = inv_r;
    coef[2] = (gs_sum - g_sum) * inv_r / ties[2 * b];
    coef[3] = -gs_sum * inv_r / ties[2 * b + 1];
  }
  __syncthreads();
  if (!need_grad) return;
  const int64_t hw = s.h * s.w, low = s.d * hw;
  for (int64_t e = threadIdx.x; e < low; e += blockDim.x) {
    const int64_t i = e / hw, jk = e % hw;
    double g = 0;
    for (int64_t x = 0; x < s.X; ++x) {
      const LerpIndex<T> lx = lerp_index<T>(s.d, s.X, x);
      const double weight = (lx.i0 == i ? 1.0 - static_cast<double>(lx.f) : 0.0) +
                            (lx.i1 == i ? static_cast<double>(lx.f) : 0.0);
      if (weight == 0.0) continue;
      const double* qx = q + (b * s.X + x) * kQChannels * hw;
      double v = 0;
      for (int ch = 0; ch < kQChannels; ++ch) v += coef[ch] * qx[ch * hw + jk];
      g += weight * v;
    }
    // relu backward as torch's (cam <= 0 ? 0 : g): a NaN cam passes its NaN gradient
    grad_pre[b * low + e] = cam[b * low + e] <= T(0) ? T(0) : static_cast<T>(g);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> explanation_loss_fwd_cuda(
    const at::Tensor& features_in, const at::Tensor& alpha_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& soft_in, const std::optional<at::Tensor>& weights_in,
    c10::string_view method_name, bool need_grad, bool write_cam) {
  const ExplanationInputs in = prepare_explanation_inputs(features_in, alpha_in, target_in, soft_in, weights_in,
                                                          method_name);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor &features = in.features, &alpha = in.alpha, &target = in.target;
  const at::Tensor &soft = in.soft, &weights = in.weights;
  const ExplanationMethod method = in.method;
  const Dims s{features.size(0), features.size(1), features.size(2), features.size(3), features.size(4),
               target.size(1),   target.size(2),   target.size(3)};
  auto options = features.options();
  at::Tensor loss = at::empty({s.B}, options);
  at::Tensor grad_pre = at::zeros({s.B, s.d, s.h, s.w}, options);
  at::Tensor cam_out = write_cam ? at::empty({s.B, s.X, s.Y, s.Z}, options) : at::empty({0}, options);
  if (s.B == 0) return explanation_outputs(in, loss, grad_pre, cam_out);
  TORCH_CHECK(s.C > 0 && s.d > 0 && s.h > 0 && s.w > 0 && s.X > 0 && s.Y > 0 && s.Z > 0,
              "due_ext::explanation_loss_fwd: empty feature or target dimensions");
  const int64_t low = s.d * s.h * s.w, planes = s.B * s.X;
  auto doubles = options.dtype(at::kDouble);
  at::Tensor cam = at::empty({s.B, s.d, s.h, s.w}, options);
  at::Tensor pre_abs = at::empty({s.B, s.d, s.h, s.w}, options);
  at::Tensor stats = at::empty({planes, 2}, options);
  at::Tensor counts = at::empty({planes, 2}, options.dtype(at::kLong));
  at::Tensor minmax = at::empty({s.B, 3}, options);
  at::Tensor ties = at::empty({s.B, 2}, doubles);
  at::Tensor plane_sums = at::empty({planes, kPlaneSums}, doubles);
  at::Tensor q = need_grad ? at::empty({planes, kQChannels, s.h, s.w}, doubles) : at::empty({0}, doubles);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "explanation_loss_fwd_cuda", [&] {
    const size_t shared = need_grad ? kQChannels * s.h * s.Z * sizeof(scalar_t) : 0;
    TORCH_CHECK(shared <= 48 * 1024, "due_ext::explanation_loss_fwd (CUDA): h * Z = ", s.h * s.Z,
                " is too large for the shared-memory adjoint buffer (max ", 48 * 1024 / (kQChannels * sizeof(scalar_t)),
                ")");
    const dim3 cam_grid(static_cast<unsigned>(s.B), static_cast<unsigned>((low + kThreads - 1) / kThreads));
    cam_kernel<scalar_t><<<cam_grid, kThreads, 0, stream>>>(features.data_ptr<scalar_t>(),
                                                            alpha.data_ptr<scalar_t>(), cam.data_ptr<scalar_t>(),
                                                            pre_abs.data_ptr<scalar_t>(), s);
    plane_stats_kernel<scalar_t><<<static_cast<unsigned>(planes), kThreads, 0, stream>>>(
        cam.data_ptr<scalar_t>(), s, stats.data_ptr<scalar_t>(), reinterpret_cast<long long*>(counts.data_ptr<int64_t>()));
    sample_stats_kernel<scalar_t><<<static_cast<unsigned>((s.B + 127) / 128), 128, 0, stream>>>(
        stats.data_ptr<scalar_t>(), reinterpret_cast<const long long*>(counts.data_ptr<int64_t>()),
        pre_abs.data_ptr<scalar_t>(), s, minmax.data_ptr<scalar_t>(), ties.data_ptr<double>());
    TermArgs<scalar_t> args{cam.data_ptr<scalar_t>(),
                            target.data_ptr<scalar_t>(),
                            soft.defined() ? soft.data_ptr<scalar_t>() : nullptr,
                            weights.defined() ? weights.data_ptr<scalar_t>() : nullptr,
                            minmax.data_ptr<scalar_t>(),
                            write_cam ? cam_out.data_ptr<scalar_t>() : nullptr,
                            plane_sums.data_ptr<double>(),
                            need_grad ? q.data_ptr<double>() : nullptr};
    plane_terms_kernel<scalar_t><<<static_cast<unsigned>(planes), kThreads, shared, stream>>>(
        args, s, static_cast<int>(method), need_grad);
    finalize_kernel<scalar_t><<<static_cast<unsigned>(s.B), kThreads, 0, stream>>>(
        cam.data_ptr<scalar_t>(), minmax.data_ptr<scalar_t>(), ties.data_ptr<double>(),
        plane_sums.data_ptr<double>(), need_grad ? q.data_ptr<double>() : nullptr, s, static_cast<int>(method),
        need_grad, loss.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>());
  });
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "due_ext::explanation_loss_fwd (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  return explanation_outputs(in, loss, grad_pre, cam_out);
}

}  // namespace due_ext

TORCH_LIBRARY_IMPL(due_ext, CUDA, m) { m.impl("explanation_loss_fwd", &due_ext::explanation_loss_fwd_cuda); }
