// Fused explanation loss, CPU kernel (OpenMP through at::parallel_for, SIMD inner loops).
//
// Pass 1: cam = relu(alpha . A) (B, d, h, w) and its scale max|alpha . A|; a (d, Y, Z) intermediate T of the
// separable upsample (z, then y); every x-plane U[x] = lerp(T[i0], T[i1]) gives per-plane min/max (NaN if the
// plane holds one) and tie counts; per sample, mn, mx and 1/R (0 when flat, see ../explanation_loss.h).
// Pass 2: recompute each U plane, the per-voxel loss terms, and (when a gradient is wanted) the per-voxel
// derivative channels contracted through the transposed upsample into per-plane (h, w) buffers.
// Finalize: per-sample loss, min/max chain rule, lift along x -> gradient w.r.t. the pre-relu CAM.
// Nothing at full resolution is allocated except the optional CAM output.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../explanation_loss.h"
#include "../explanation_loss_inputs.h"

namespace due_ext {
namespace {

// exp and log for float that GCC vectorises (glibc exposes its SIMD expf/logf only under -ffast-math).
// exp: 2^n e^r with |r| <= ln2/2 and a degree-7 Taylor polynomial (< 2e-7 relative). No clamping (a clamp
// next to the float->int conversion stops GCC's if-conversion): valid for |x| < 87, and the only caller
// passes 2 * 5 * (S - 0.5) with S in [0, 1]. A NaN x is kept out of the float->int conversion (undefined
// behaviour) and reaches the result through r.
inline float exp_simd(float x) {
  const float finite_x = x == x ? x : 0.0f;
  const int32_t n = static_cast<int32_t>(finite_x * 1.44269504088896341f + 127.5f) - 127;  // round(x / ln2)
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * __builtin_bit_cast(float, (n + 127) << 23);
}

// log(x) for normal positive x: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)) by its
// series to t^15 (|t| < 0.172: < 1e-9 truncation); absolute error < 6e-7 over [1e-6, 1]. NaN gives NaN (the
// bit manipulation alone would turn it into a finite number).
inline float log_simd(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  const float m1 = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const float big = m1 > 1.41421356f ? 1.0f : 0.0f;
  const float m = m1 * (1.0f - 0.5f * big);
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127) + big;
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  float p = 1.0f / 15.0f;
  p = p * t2 + 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  const float value = e * 0.693147180559945309f + 2.0f * t * p;
  return x == x ? value : x;
}

// tanh(x) = 1 - 2 / (e^{2x} + 1); double keeps libm (gradcheck-grade accuracy, speed irrelevant).
inline float tanh_simd(float x) { return 1.0f - 2.0f / (exp_simd(2.0f * x) + 1.0f); }
inline double tanh_simd(double x) { return std::tanh(x); }
inline double log_simd(double x) { return std::log(x); }

template <typename T>
inline T sign_of(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// Interpolation tables of one axis, plus the transposed weights as dense columns restricted to their
// support [lo, hi) so the adjoint contraction is a short dot product per low-res index.
template <typename T>
struct AxisTable {
  std::vector<LerpIndex<T>> fwd;
  std::vector<T> columns;  // (in, out) dense: columns[i * out + o] = weight of low-res i in output o
  std::vector<int64_t> lo, hi;
  int64_t in = 0, out = 0;

  AxisTable(int64_t in_size, int64_t out_size) : in(in_size), out(out_size) {
    fwd.resize(out);
    columns.assign(in * out, T(0));
    lo.assign(in, out);
    hi.assign(in, 0);
    for (int64_t o = 0; o < out; ++o) {
      fwd[o] = lerp_index<T>(in, out, o);
      columns[fwd[o].i0 * out + o] += T(1) - fwd[o].f;
      columns[fwd[o].i1 * out + o] += fwd[o].f;
      for (int64_t i : {fwd[o].i0, fwd[o].i1}) {
        lo[i] = std::min(lo[i], o);
        hi[i] = std::max(hi[i], o + 1);
      }
    }
  }

  // out_low[i] = sum_o columns[i, o] * values[o]
  void adjoint(const T* values, T* out_low, int64_t stride) const {
    for (int64_t i = 0; i < in; ++i) {
      const T* col = columns.data() + i * out;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t o = lo[i]; o < hi[i]; ++o) acc += col[o] * values[o];
      out_low[i * stride] = acc;
    }
  }
};

// One row of U = (1 - f) a + f b. Not inlined so pass 1 and pass 2 round identically (the tie tests
// compare U to the min/max found in pass 1 with ==).
template <typename T>
__attribute__((noinline)) void lerp_row(const T* a, const T* b, T f, T* out, int64_t n) {
  const T g = T(1) - f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = g * a[i] + f * b[i];
}

struct Shapes {
  int64_t B, C, d, h, w, X, Y, Z;
  int64_t low() const { return d * h * w; }
  int64_t plane() const { return Y * Z; }
  int64_t voxels() const { return X * Y * Z; }
};

// cam = relu(sum_c alpha A), scale = max |sum_c alpha A| (the flat test's scale) and the (d, Y, Z)
// intermediate of the separable upsample, per sample.
template <typename T>
void low_res_stage(const T* features, const T* alpha, const Shapes& s, const AxisTable<T>& ay,
                   const AxisTable<T>& az, T* cam, T* scale, T* inter) {
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> tz(s.d * s.h * s.Z);
    for (int64_t b = b0; b < b1; ++b) {
      T* c = cam + b * s.low();
      std::fill(c, c + s.low(), T(0));
      for (int64_t ch = 0; ch < s.C; ++ch) {
        const T a = alpha[b * s.C + ch];
        const T* f = features + (b * s.C + ch) * s.low();
#pragma omp simd
        for (int64_t p = 0; p < s.low(); ++p) c[p] += a * f[p];
      }
      T largest = T(0);
      for (int64_t p = 0; p < s.low(); ++p) {
        largest = std::max(largest, std::abs(c[p]));
        c[p] = c[p] < T(0) ? T(0) : c[p];  // keeps NaN
      }
      scale[b] = largest;
      for (int64_t ij = 0; ij < s.d * s.h; ++ij) {
        for (int64_t z = 0; z < s.Z; ++z) {
          const auto& t = az.fwd[z];
          tz[ij * s.Z + z] = (T(1) - t.f) * c[ij * s.w + t.i0] + t.f * c[ij * s.w + t.i1];
        }
      }
      for (int64_t i = 0; i < s.d; ++i) {
        for (int64_t y = 0; y < s.Y; ++y) {
          const auto& t = ay.fwd[y];
          lerp_row(tz.data() + (i * s.h + t.i0) * s.Z, tz.data() + (i * s.h + t.i1) * s.Z, t.f,
                   inter + ((b * s.d + i) * s.Y + y) * s.Z, s.Z);
        }
      }
    }
  });
}

template <typename T>
struct PlaneStats {
  std::vector<T> min, max;
  std::vector<int64_t> n_min, n_max;
};

template <typename T>
PlaneStats<T> plane_min_max(const T* inter, const Shapes& s, const AxisTable<T>& ax) {
  PlaneStats<T> st{std::vector<T>(s.B * s.X), std::vector<T>(s.B * s.X), std::vector<int64_t>(s.B * s.X),
                   std::vector<int64_t>(s.B * s.X)};
  at::parallel_for(0, s.B * s.X, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> plane(s.plane());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / s.X, x = p % s.X;
      const auto& t = ax.fwd[x];
      const T* base = inter + b * s.d * s.plane();
      lerp_row(base + t.i0 * s.plane(), base + t.i1 * s.plane(), t.f, plane.data(), s.plane());
      T lo = std::numeric_limits<T>::infinity(), hi = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : lo) reduction(max : hi)
      for (int64_t v = 0; v < s.plane(); ++v) {
        lo = std::min(lo, plane[v]);
        hi = std::max(hi, plane[v]);
      }
      int64_t n_lo = 0, n_hi = 0, n_nan = 0;
#pragma omp simd reduction(+ : n_lo, n_hi, n_nan)
      for (int64_t v = 0; v < s.plane(); ++v) {
        n_lo += plane[v] == lo;
        n_hi += plane[v] == hi;
        n_nan += plane[v] != plane[v];
      }
      if (n_nan > 0) lo = hi = std::numeric_limits<T>::quiet_NaN();  // the SIMD min/max skip NaN
      st.min[p] = lo;
      st.max[p] = hi;
      st.n_min[p] = n_lo;
      st.n_max[p] = n_hi;
    }
  });
  return st;
}

struct RowSums {
  double v[kPlaneSums] = {0, 0, 0, 0, 0, 0, 0};
};

// Per-thread row buffers of pass 2.
template <typename T>
struct RowScratch {
  std::vector<T> u, c0, c1, ind, main, cont, norm, aux;
  explicit RowScratch(int64_t n)
      : u(n), c0(n, T(0)), c1(n, T(0)), ind(n), main(n), cont(n, T(0)), norm(n), aux(n) {}
};

// Per-voxel terms of one row (U in r.u): loss terms, derivative channels c0/c1, optionally S. Two loops:
// GCC does not if-convert the term loop when it also carries the seven reductions, so they come after.
template <typename T, ExplanationMethod M, bool kWeights, bool kGrad, bool kCam>
void row_terms(const T* m, const T* soft, const T* wt, T mn, T inv_r, T inv_n, int64_t n, RowScratch<T>& r,
               T* cam_row, RowSums& out) {
  const T lo = static_cast<T>(kBceClamp), hi = T(1) - static_cast<T>(kBceClamp);
  const T k = static_cast<T>(kTanhScale);
  const T* u = r.u.data();
  T* main_t = r.main.data();
  T* cont_t = r.cont.data();
  T* norm_t = r.norm.data();
  T* c0 = r.c0.data();
  T* c1 = r.c1.data();
  T* aux = r.aux.data();
#pragma omp simd
  for (int64_t z = 0; z < n; ++z) {
    const T s = (u[z] - mn) * inv_r;
    const T mv = m[z];
    const T wv = kWeights ? wt[z] : T(1);
    if constexpr (M == ExplanationMethod::kDue || M == ExplanationMethod::kBaselinePlus) {
      const T fg = mv != T(0) ? T(1) : T(0);
      const T t = tanh_simd(k * (s - T(0.5)));
      const T diff = t - mv;
      const T dc = s - soft[z];
      main_t[z] = wv * fg * std::abs(diff);
      cont_t[z] = wv * std::abs(dc);
      norm_t[z] = fg;
      if constexpr (kGrad) {
        c0[z] = wv * fg * sign_of(diff) * k * (T(1) - t * t);
        c1[z] = wv * sign_of(dc) * inv_n;
      }
    } else if constexpr (M == ExplanationMethod::kGradia) {
      const T diff = s - mv;
      main_t[z] = wv * std::abs(diff);
      norm_t[z] = wv;
      if constexpr (kGrad) c0[z] = wv * sign_of(diff);
    } else {
      // haics, step 1: clamp (the log loop below vectorises only without these branches)
      cont_t[z] = s < lo ? lo : (s > hi ? hi : s);
      aux[z] = (s >= lo && s <= hi) ? wv : T(0);
      norm_t[z] = wv;
    }
    if constexpr (kCam) cam_row[z] = s;
  }
  if constexpr (M == ExplanationMethod::kHaics) {
#pragma omp simd
    for (int64_t z = 0; z < n; ++z) {
      const T sc = cont_t[z], mv = m[z], wv = kWeights ? wt[z] : T(1);
      main_t[z] = -wv * (mv * log_simd(sc) + (T(1) - mv) * log_simd(T(1) - sc));
      if constexpr (kGrad) c0[z] = aux[z] * (sc - mv) / (sc * (T(1) - sc));
      cont_t[z] = T(0);
    }
  }
  T main = 0, cont = 0, norm = 0, s0 = 0, s0s = 0, s1 = 0, s1s = 0;
#pragma omp simd reduction(+ : main, cont, norm, s0, s0s, s1, s1s)
  for (int64_t z = 0; z < n; ++z) {
    const T s = (u[z] - mn) * inv_r;
    main += main_t[z];
    cont += cont_t[z];
    norm += norm_t[z];
    s0 += c0[z];
    s0s += c0[z] * s;
    s1 += c1[z];
    s1s += c1[z] * s;
  }
  const T vals[kPlaneSums] = {main, cont, norm, s0, s0s, s1, s1s};
  for (int i = 0; i < kPlaneSums; ++i) out.v[i] += static_cast<double>(vals[i]);
}

template <typename T>
struct Pass2Args {
  const T* inter;
  const T* target;
  const T* soft;
  const T* weights;
  const T* mn;       // (B,)
  const T* mx;       // (B,)
  const T* inv_r;    // (B,) minmax_inverse_range: 0 for a flat sample
  const uint8_t* tie_plane;  // (B*X,) bit 0: holds the sample min, bit 1: holds the max
  double* plane_sums;        // (B*X, kPlaneSums)
  double* q;                 // (B*X, kQChannels, h, w)
  T* cam_out;                // (B, X, Y, Z) or nullptr
};

template <typename T, ExplanationMethod M, bool kWeights, bool kGrad>
void pass2(const Pass2Args<T>& a, const Shapes& s, const AxisTable<T>& ax, const AxisTable<T>& ay,
           const AxisTable<T>& az) {
  const bool two_channels = M == ExplanationMethod::kDue || M == ExplanationMethod::kBaselinePlus;
  const T inv_n = T(1) / static_cast<T>(s.voxels());
  at::parallel_for(0, s.B * s.X, 1, [&](int64_t p0, int64_t p1) {
    RowScratch<T> row(s.Z);
    T* u = row.u.data();
    T* ind = row.ind.data();
    // acc[ch, j, z]: the y-adjoint of each derivative channel, accumulated row by row (two axpys per row);
    // the z-adjoint of these h rows at the end of the plane gives Q[ch, j, k].
    std::vector<T> acc(kQChannels * s.h * s.Z), qrow(s.w);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / s.X, x = p % s.X;
      const auto& tx = ax.fwd[x];
      const T mn = a.mn[b];
      const T inv_r = a.inv_r[b];
      const uint8_t ties = a.tie_plane[p];
      const T* t0 = a.inter + (b * s.d + tx.i0) * s.plane();
      const T* t1 = a.inter + (b * s.d + tx.i1) * s.plane();
      const int64_t off = (b * s.X + x) * s.plane();
      RowSums sums;
      if constexpr (kGrad) std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t y = 0; y < s.Y; ++y) {
        const int64_t r = off + y * s.Z;
        lerp_row(t0 + y * s.Z, t1 + y * s.Z, tx.f, u, s.Z);
        const T* soft = a.soft == nullptr ? nullptr : a.soft + r;
        const T* wt = kWeights ? a.weights + r : nullptr;
        if (a.cam_out != nullptr) {
          row_terms<T, M, kWeights, kGrad, true>(a.target + r, soft, wt, mn, inv_r, inv_n, s.Z, row, a.cam_out + r,
                                                 sums);
        } else {
          row_terms<T, M, kWeights, kGrad, false>(a.target + r, soft, wt, mn, inv_r, inv_n, s.Z, row, nullptr, sums);
        }
        if constexpr (kGrad) {
          const auto& ty = ay.fwd[y];
          const T g1 = ty.f, g0 = T(1) - ty.f;
          for (int ch = 0; ch < kQChannels; ++ch) {
            const T* src;
            if (ch == 0) {
              src = row.c0.data();
            } else if (ch == 1) {
              if (!two_channels) continue;
              src = row.c1.data();
            } else {
              if (!(ties & (1 << (ch - 2)))) continue;
              const T ref = ch == 2 ? mn : a.mx[b];
#pragma omp simd
              for (int64_t z = 0; z < s.Z; ++z) ind[z] = u[z] == ref ? T(1) : T(0);
              src = ind;
            }
            T* r0 = acc.data() + (ch * s.h + ty.i0) * s.Z;
            T* r1 = acc.data() + (ch * s.h + ty.i1) * s.Z;
#pragma omp simd
            for (int64_t z = 0; z < s.Z; ++z) r0[z] += g0 * src[z];
#pragma omp simd
            for (int64_t z = 0; z < s.Z; ++z) r1[z] += g1 * src[z];
          }
        }
      }
      std::memcpy(a.plane_sums + p * kPlaneSums, sums.v, sizeof(sums.v));
      if constexpr (kGrad) {
        double* q = a.q + p * kQChannels * s.h * s.w;
        for (int64_t cj = 0; cj < kQChannels * s.h; ++cj) {
          az.adjoint(acc.data() + cj * s.Z, qrow.data(), 1);
          for (int64_t k = 0; k < s.w; ++k) q[cj * s.w + k] = static_cast<double>(qrow[k]);
        }
      }
    }
  });
}

template <typename T>
void run_pass2(ExplanationMethod method, bool has_weights, bool need_grad, const Pass2Args<T>& a,
               const Shapes& s, const AxisTable<T>& ax, const AxisTable<T>& ay, const AxisTable<T>& az) {
#define DUE_EXT_PASS2(M)                                          \
  if (has_weights && need_grad) pass2<T, M, true, true>(a, s, ax, ay, az);    \
  else if (has_weights) pass2<T, M, true, false>(a, s, ax, ay, az);          \
  else if (need_grad) pass2<T, M, false, true>(a, s, ax, ay, az);            \
  else pass2<T, M, false, false>(a, s, ax, ay, az);
  switch (method) {
    case ExplanationMethod::kDue: DUE_EXT_PASS2(ExplanationMethod::kDue) break;
    case ExplanationMethod::kBaselinePlus: DUE_EXT_PASS2(ExplanationMethod::kBaselinePlus) break;
    case ExplanationMethod::kGradia: DUE_EXT_PASS2(ExplanationMethod::kGradia) break;
    case ExplanationMethod::kHaics: DUE_EXT_PASS2(ExplanationMethod::kHaics) break;
  }
#undef DUE_EXT_PASS2
}

template <typename T>
void explanation_loss_cpu_impl(const at::Tensor& features, const at::Tensor& alpha, const at::Tensor& target,
                               const at::Tensor* soft, const at::Tensor* weights, ExplanationMethod method,
                               bool need_grad, const Shapes& s, at::Tensor& loss, at::Tensor& grad_pre,
                               at::Tensor* cam_out) {
  const AxisTable<T> ax(s.d, s.X), ay(s.h, s.Y), az(s.w, s.Z);
  std::vector<T> cam(s.B * s.low()), scale(s.B), inter(s.B * s.d * s.plane());
  low_res_stage<T>(features.data_ptr<T>(), alpha.data_ptr<T>(), s, ay, az, cam.data(), scale.data(), inter.data());
  const PlaneStats<T> st = plane_min_max<T>(inter.data(), s, ax);

  std::vector<T> mn(s.B), mx(s.B), inv_r(s.B);
  std::vector<double> n_min(s.B, 0), n_max(s.B, 0);
  std::vector<uint8_t> tie_plane(s.B * s.X, 0);
  for (int64_t b = 0; b < s.B; ++b) {
    mn[b] = st.min[b * s.X];
    mx[b] = st.max[b * s.X];
    for (int64_t x = 1; x < s.X; ++x) {
      mn[b] = nan_min(mn[b], st.min[b * s.X + x]);
      mx[b] = nan_max(mx[b], st.max[b * s.X + x]);
    }
    inv_r[b] = minmax_inverse_range(mn[b], mx[b], scale[b]);
    for (int64_t x = 0; x < s.X; ++x) {
      const int64_t p = b * s.X + x;
      if (st.min[p] == mn[b]) {
        n_min[b] += static_cast<double>(st.n_min[p]);
        tie_plane[p] |= 1;
      }
      if (st.max[p] == mx[b]) {
        n_max[b] += static_cast<double>(st.n_max[p]);
        tie_plane[p] |= 2;
      }
    }
  }

  std::vector<double> plane_sums(s.B * s.X * kPlaneSums, 0.0);
  std::vector<double> q(need_grad ? s.B * s.X * kQChannels * s.h * s.w : 0, 0.0);
  Pass2Args<T> args{inter.data(), target.data_ptr<T>(), soft ? soft->data_ptr<T>() : nullptr,
                    weights ? weights->data_ptr<T>() : nullptr, mn.data(), mx.data(), inv_r.data(), tie_plane.data(),
                    plane_sums.data(), q.data(), cam_out ? cam_out->data_ptr<T>() : nullptr};
  run_pass2<T>(method, weights != nullptr, need_grad, args, s, ax, ay, az);

  T* loss_ptr = loss.data_ptr<T>();
  T* grad_ptr = grad_pre.data_ptr<T>();
  const bool due_like = method == ExplanationMethod::kDue || method == ExplanationMethod::kBaselinePlus;
  std::vector<double> g(s.h * s.w * s.d);
  for (int64_t b = 0; b < s.B; ++b) {
    double tot[kPlaneSums] = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t x = 0; x < s.X; ++x)
      for (int i = 0; i < kPlaneSums; ++i) tot[i] += plane_sums[(b * s.X + x) * kPlaneSums + i];
    const double s0 = due_like ? 1.0 / std::max(1.0, tot[kNormSum]) : 1.0 / std::max(kWeightEps, tot[kNormSum]);
    const double value = due_like ? tot[kMainSum] * s0 + tot[kContSum] / static_cast<double>(s.voxels())
                                  : tot[kMainSum] * s0;
    loss_ptr[b] = static_cast<T>(value);
    if (!need_grad) continue;
    // 1/R in the kernel's precision, as the voxels saw it; 0 for a flat sample zeroes every channel.
    const double r_inv = static_cast<double>(inv_r[b]);
    const double g_sum = s0 * tot[kC0Sum] + tot[kC1Sum];
    const double gs_sum = s0 * tot[kC0SSum] + tot[kC1SSum];
    const double coef[kQChannels] = {r_inv * s0, r_inv, (gs_sum - g_sum) * r_inv / n_min[b],
                                     -gs_sum * r_inv / n_max[b]};
    std::fill(g.begin(), g.end(), 0.0);
    const int64_t hw = s.h * s.w;
    for (int64_t x = 0; x < s.X; ++x) {
      const auto& tx = ax.fwd[x];
      const double* qx = q.data() + (b * s.X + x) * kQChannels * hw;
      for (int64_t jk = 0; jk < hw; ++jk) {
        double v = 0;
        for (int ch = 0; ch < kQChannels; ++ch) v += coef[ch] * qx[ch * hw + jk];
        g[tx.i0 * hw + jk] += (1.0 - static_cast<double>(tx.f)) * v;
        g[tx.i1 * hw + jk] += static_cast<double>(tx.f) * v;
      }
    }
    for (int64_t p = 0; p < s.low(); ++p)
      // relu backward as torch's (cam <= 0 ? 0 : g): a NaN cam passes its NaN gradient
      grad_ptr[b * s.low() + p] = cam[b * s.low() + p] <= T(0) ? T(0) : static_cast<T>(g[p]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> explanation_loss_fwd_cpu(
    const at::Tensor& features_in, const at::Tensor& alpha_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& soft_in, const std::optional<at::Tensor>& weights_in,
    c10::string_view method_name, bool need_grad, bool write_cam) {
  const ExplanationInputs in = prepare_explanation_inputs(features_in, alpha_in, target_in, soft_in, weights_in,
                                                          method_name);
  const at::Tensor &features = in.features, &alpha = in.alpha, &target = in.target;
  const at::Tensor &soft = in.soft, &weights = in.weights;
  const ExplanationMethod method = in.method;
  const Shapes s{features.size(0), features.size(1), features.size(2), features.size(3), features.size(4),
                 target.size(1),   target.size(2),   target.size(3)};
  at::Tensor loss = at::empty({s.B}, features.options());
  at::Tensor grad_pre = at::zeros({s.B, s.d, s.h, s.w}, features.options());
  at::Tensor cam = write_cam ? at::empty({s.B, s.X, s.Y, s.Z}, features.options()) : at::empty({0}, features.options());
  if (s.B == 0) return explanation_outputs(in, loss, grad_pre, cam);
  TORCH_CHECK(s.C > 0 && s.d > 0 && s.h > 0 && s.w > 0 && s.X > 0 && s.Y > 0 && s.Z > 0,
              "due_ext::explanation_loss_fwd: empty feature or target dimensions ", features.sizes(), ", ",
              target.sizes());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "explanation_loss_fwd_cpu", [&] {
    explanation_loss_cpu_impl<scalar_t>(features, alpha, target, soft.defined() ? &soft : nullptr,
                                        weights.defined() ? &weights : nullptr, method, need_grad, s, loss,
                                        grad_pre, write_cam ? &cam : nullptr);
  });
  return explanation_outputs(in, loss, grad_pre, cam);
}

}  // namespace due_ext

TORCH_LIBRARY_FRAGMENT(due_ext, m) {
  m.def(
      "explanation_loss_fwd(Tensor features, Tensor alpha, Tensor target, Tensor? soft_target, Tensor? weights, "
      "str method, bool need_grad, bool write_cam) -> (Tensor loss, Tensor grad_pre, Tensor cam)");
}

TORCH_LIBRARY_IMPL(due_ext, CPU, m) { m.impl("explanation_loss_fwd", &due_ext::explanation_loss_fwd_cpu); }
