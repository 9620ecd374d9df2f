// Fused CPU kernel of CDG's training gate (cdg/nn/gated_conv.py, _gate_forward / _gate_backward),
// for the default gate: instance norm, C_g = 1, sigmoid surrogate, channels-last float tensors.
//
// Same math as the PyTorch form, per sample n and channel c over the H*W positions i:
//   forward   mu, rstd = moments of S = Y_base;  M = [S > mu + tau / rstd]  (n > tau, Eq. 2)
//             Y = M ? Y_full : Y_base                                           (Eq. 3)
//   backward  gm = dL/dY * (Y_full - Y_base);  gb = gm * sig * (1 - sig), sig = sigmoid(alpha (n - tau))
//             dY_full = dL/dY * M;  dY_base = dL/dY * (1 - M) + instance-norm backward of alpha * gb
//             dtau = -alpha * sum gb
// Each sample is a (H*W) x C slab that fits in a core's L2 cache, so every pass after the first
// reads it from cache: the forward reads Y_base and Y_full once from memory and writes Y and M, the
// backward reads dL/dY, Y_full, Y_base, M once and writes the two gradients. The PyTorch form
// takes about 15 passes over memory for the same work.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// exp for float that the compiler vectorises: Cephes expf (range reduction + degree-5 polynomial,
// ~1 ulp) with no library call or branch in it; std::exp in a loop is not vectorised without
// -ffast-math. Rounding to the nearest integer by adding 1.5 * 2^23, and 2^n built from its bits.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float fx = shifted - 12582912.0f;
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int n = __builtin_bit_cast(int, shifted) - 0x4B400000;  // fx as an integer
  return p * __builtin_bit_cast(float, (n + 127) << 23);
}

inline float sigmoid(float u) { return 1.0f / (1.0f + exp_approx(-u)); }
inline double sigmoid(double u) { return 1.0 / (1.0 + std::exp(-u)); }

template <typename T>
void forward_kernel(const T* yf, const T* yb, const T* tau, T* out, T* mask, T* mu_out, T* rstd_out,
                    int64_t n_samples, int64_t hw, int64_t c) {
  at::parallel_for(0, n_samples, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(c), sq(c);
    std::vector<T> thr(c);
    for (int64_t n = begin; n < end; ++n) {
      const T* b = yb + n * hw * c;
      const T* f = yf + n * hw * c;
      T* o = out + n * hw * c;
      T* m = mask + n * hw * c;
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      for (int64_t i = 0; i < hw; ++i) {
        const T* row = b + i * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const double v = row[j];
          sum[j] += v;
          sq[j] += v * v;
        }
      }
      for (int64_t j = 0; j < c; ++j) {
        const double mu = sum[j] / hw;
        const double var = std::max(sq[j] / hw - mu * mu, 0.0);
        const T rstd = static_cast<T>(1.0 / std::sqrt(var + 1e-5));
        mu_out[n * c + j] = static_cast<T>(mu);
        rstd_out[n * c + j] = rstd;
        thr[j] = static_cast<T>(mu) + tau[j] / rstd;
      }
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t k = i * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const bool open = b[k + j] > thr[j];
          m[k + j] = open ? T(1) : T(0);
          o[k + j] = open ? f[k + j] : b[k + j];
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* grad, const T* yf, const T* yb, const T* mask, const T* mu, const T* rstd,
                     const T* tau, T alpha, T* grad_full, T* grad_base, T* grad_tau_n, int64_t n_samples,
                     int64_t hw, int64_t c) {
  at::parallel_for(0, n_samples, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(hw * c + 8 * c);
    T* __restrict gb = buffer.data();
    T* __restrict k = gb + hw * c;
    T *__restrict b0 = k + c, *__restrict c1 = b0 + c, *__restrict c2 = c1 + c, *__restrict c3 = c2 + c;
    T *__restrict sgb = c3 + c, *__restrict sgbs = sgb + c;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t off = n * hw * c;
      const T* __restrict g = grad + off;
      const T* __restrict f = yf + off;
      const T* __restrict s = yb + off;
      const T* __restrict m = mask + off;
      for (int64_t j = 0; j < c; ++j) {
        k[j] = alpha * rstd[n * c + j];
        b0[j] = -k[j] * mu[n * c + j] - alpha * tau[j];  // k s + b0 = alpha ((s - mu) rstd - tau)
        sgb[j] = T(0);
        sgbs[j] = T(0);
      }
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t q = i * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const T sig = sigmoid(k[j] * s[q + j] + b0[j]);
          const T v = g[q + j] * (f[q + j] - s[q + j]) * sig * (T(1) - sig);
          gb[q + j] = v;
          sgb[j] += v;
          sgbs[j] += v * s[q + j];
        }
      }
      for (int64_t j = 0; j < c; ++j) {
        const double r = rstd[n * c + j], u = mu[n * c + j];
        const double mean_gb = static_cast<double>(sgb[j]) / hw, mean_gbs = static_cast<double>(sgbs[j]) / hw;
        const double bb = r * (mean_gbs - u * mean_gb);  // mean(gb * n)
        c1[j] = static_cast<T>(alpha * r);
        c2[j] = static_cast<T>(-alpha * r * r * bb);
        c3[j] = static_cast<T>(alpha * r * (r * bb * u - mean_gb));
        grad_tau_n[n * c + j] = static_cast<T>(-alpha * sgb[j]);
      }
      T* __restrict gf = grad_full + off;
      T* __restrict gbase = grad_base + off;
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t q = i * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const T gm = g[q + j] * m[q + j];
          gf[q + j] = gm;
          gbase[q + j] = c1[j] * gb[q + j] + c2[j] * s[q + j] + c3[j] + (g[q + j] - gm);
        }
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "instance_gate: ", name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "instance_gate: ", name, " must be a contiguous N x H x W x C tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "instance_gate: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
}

}  // namespace

// y_full, y_base: contiguous (N, H, W, C); tau: (C,). Returns out, mask (N, H, W, C), mu, rstd (N, C).
std::vector<torch::Tensor> forward(torch::Tensor y_full, torch::Tensor y_base, torch::Tensor tau) {
  check(y_full, "y_full", y_base);
  check(y_base, "y_base", y_base);
  check(tau, "tau", y_base);
  TORCH_CHECK(y_base.dim() == 4 && y_full.sizes() == y_base.sizes(), "instance_gate: shape mismatch");
  const int64_t n = y_base.size(0), hw = y_base.size(1) * y_base.size(2), c = y_base.size(3);
  TORCH_CHECK(tau.numel() == c, "instance_gate: tau has ", tau.numel(), " entries for ", c, " channels");
  auto out = torch::empty_like(y_base), mask = torch::empty_like(y_base);
  auto mu = torch::empty({n, c}, y_base.options()), rstd = torch::empty({n, c}, y_base.options());
  AT_DISPATCH_FLOATING_TYPES(y_base.scalar_type(), "instance_gate_forward", [&] {
    forward_kernel<scalar_t>(y_full.data_ptr<scalar_t>(), y_base.data_ptr<scalar_t>(), tau.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                             rstd.data_ptr<scalar_t>(), n, hw, c);
  });
  return {out, mask, mu, rstd};
}

// Returns grad_full, grad_base (N, H, W, C) and grad_tau (C,).
std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor y_full, torch::Tensor y_base, torch::Tensor mask,
                                    torch::Tensor mu, torch::Tensor rstd, torch::Tensor tau, double alpha) {
  for (auto* p : {&grad, &y_full, &mask, &mu, &rstd, &tau}) check(*p, "input", y_base);
  const int64_t n = y_base.size(0), hw = y_base.size(1) * y_base.size(2), c = y_base.size(3);
  auto grad_full = torch::empty_like(y_base), grad_base = torch::empty_like(y_base);
  auto grad_tau_n = torch::empty({n, c}, y_base.options());
  AT_DISPATCH_FLOATING_TYPES(y_base.scalar_type(), "instance_gate_backward", [&] {
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), y_full.data_ptr<scalar_t>(), y_base.data_ptr<scalar_t>(),
                              mask.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                              tau.data_ptr<scalar_t>(), static_cast<scalar_t>(alpha), grad_full.data_ptr<scalar_t>(),
                              grad_base.data_ptr<scalar_t>(), grad_tau_n.data_ptr<scalar_t>(), n, hw, c);
  });
  return {grad_full, grad_base, grad_tau_n.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "CDG instance gate, forward (channels-last float)");
  m.def("backward", &backward, "CDG instance gate, backward (channels-last float)");
}
