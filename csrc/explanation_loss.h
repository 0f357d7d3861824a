// Shared definitions of the fused explanation loss (CPU and CUDA kernels).
//
// Math (per sample b; see due_ext/ops/explanation_loss.py for the user-facing description):
//   cam = relu(sum_c alpha_c A_c)  (d, h, w);  U = trilinear upsample (align_corners=True) to (X, Y, Z)
//   S = (U - mn) / R,  R = mx - mn + eps;  loss = method-specific sum of per-voxel terms of (S, m, I, w).
// Flat samples (due_ext/explain/cam.py): when mx - mn <= kFlatRtol * max|alpha . A| (the scale before the
// relu), S = 0 and nothing flows back through the normaliser. The kernels implement both cases with one
// per-sample factor inv_r = flat ? 0 : 1 / R, so S = (U - mn) inv_r and every gradient term carries inv_r.
// NaN: the relu keeps NaN (c < 0 ? 0 : c, not c > 0 ? c : 0) and a plane or sample holding a NaN has
// mn = mx = NaN, so S, the loss and the gradient of that sample are NaN, as in the PyTorch reference.
// Precision: float32 and float64 kernels; float16/bfloat16 features are converted to float32 on entry
// (explanation_loss_inputs.h), loss and CAM are returned in the input dtype, grad_pre in float32.
// Backward without full-resolution storage: the per-voxel derivative dL/dS_v is split into
//   g_v = s0 * c0_v + c1_v,
// where c0 is a per-voxel term whose sample-level normaliser s0 (1/max(1, #foreground) or
// 1/max(eps, sum w)) is only known once every voxel was seen, and c1 a term with a known normaliser.
// Both are contracted at once through the transposed separable upsample into per-x-plane low-res
// buffers Q[b, x, channel, j, k]; the min/max part of the chain rule needs
//   dL/dmn = (sum g S - sum g) / R,  dL/dmx = -(sum g S) / R,
// routed (split evenly among ties, as torch.amin/amax do) to the voxels equal to mn / mx, which are
// contracted as two more channels of indicators. A final per-sample step combines the channels and lifts
// along x into the gradient w.r.t. the pre-relu CAM (B, d, h, w).
#pragma once

#include <cstdint>
#include <string>

#include <c10/util/Exception.h>

namespace due_ext {

enum class ExplanationMethod : int { kDue = 0, kBaselinePlus = 1, kGradia = 2, kHaics = 3 };

// Q channels written per x-plane: c0 and c1 contractions, then the min and max tie indicators.
constexpr int kQChannels = 4;
// Per x-plane partial sums (double), see PlaneSum.
constexpr int kPlaneSums = 7;
enum PlaneSum : int {
  kMainSum = 0,   // due: sum w fg |t - m|; gradia: sum w |S - m|; haics: sum w BCE
  kContSum = 1,   // due: sum w |S - I|
  kNormSum = 2,   // due: #foreground; gradia/haics: sum w
  kC0Sum = 3,     // sum c0
  kC0SSum = 4,    // sum c0 S
  kC1Sum = 5,     // sum c1
  kC1SSum = 6,    // sum c1 S
};

constexpr double kMinMaxEps = 1e-6;   // due_ext.explain.cam.MINMAX_EPS
constexpr double kFlatRtol = 1e-3;    // due_ext.explain.cam.FLAT_RTOL
constexpr double kWeightEps = 1e-6;   // explanation_loss_reference.WEIGHT_EPS
constexpr double kBceClamp = 1e-6;    // explanation_loss_reference.BCE_CLAMP
constexpr double kTanhScale = 5.0;    // explanation_loss_reference.TANH_SCALE

inline ExplanationMethod parse_explanation_method(const std::string& name) {
  if (name == "due") return ExplanationMethod::kDue;
  if (name == "baseline_plus") return ExplanationMethod::kBaselinePlus;
  if (name == "gradia") return ExplanationMethod::kGradia;
  if (name == "haics") return ExplanationMethod::kHaics;
  TORCH_CHECK(false, "due_ext::explanation_loss_fwd: method '", name,
              "' has no fused kernel (fused: due, baseline_plus, gradia, haics)");
}

// Source index and weight of one output coordinate of a linear upsample with align_corners=True,
// following PyTorch's convention (truncate, clamp the upper neighbour, clamp the weight to [0, 1]).
// 1 / (mx - mn + eps), or 0 for a flat sample (see the header comment); T is the kernel's precision.
// A NaN range compares false and yields NaN.
template <typename T>
#ifdef __CUDACC__
__host__ __device__
#endif
inline T minmax_inverse_range(T mn, T mx, T scale) {
  const T range = mx - mn;
  return range <= static_cast<T>(kFlatRtol) * scale ? T(0) : T(1) / (range + static_cast<T>(kMinMaxEps));
}

// min / max that keep a NaN once it is seen (in either argument), unlike std::min / fmin.
template <typename T>
#ifdef __CUDACC__
__host__ __device__
#endif
inline T nan_min(T a, T b) {
  return a != a ? a : (b != b ? b : (b < a ? b : a));
}

template <typename T>
#ifdef __CUDACC__
__host__ __device__
#endif
inline T nan_max(T a, T b) {
  return a != a ? a : (b != b ? b : (b > a ? b : a));
}

template <typename T>
struct LerpIndex {
  int64_t i0;
  int64_t i1;
  T f;
};

template <typename T>
#ifdef __CUDACC__
__host__ __device__
#endif
inline LerpIndex<T> lerp_index(int64_t in_size, int64_t out_size, int64_t o) {
  const T scale = out_size > 1 ? static_cast<T>(in_size - 1) / static_cast<T>(out_size - 1) : T(0);
  const T src = scale * static_cast<T>(o);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  const int64_t i1 = i0 < in_size - 1 ? i0 + 1 : i0;
  T f = src - static_cast<T>(i0);
  f = f < T(0) ? T(0) : (f > T(1) ? T(1) : f);
  return {i0, i1, f};
}

}  // namespace due_ext
