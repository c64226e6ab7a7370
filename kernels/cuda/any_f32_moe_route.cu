// MoE router on the GPU, f32: sigmoid or softmax scores, group-limited (top-2 sum or max) top-k with an
// optional correction bias, the routing backward, the scores backward, expert loads and the
// sequence-wise balance loss (CPU reference: kernels/moe.cpp).
//
// NOTES:
//  - One warp per token. Lane l holds experts l, l+32, ... (E <= 256: 8 per lane) in registers and the
//    warp's biased scores c and scores s in shared memory for the per-group top-2 (lane g scans group g).
//  - Selection reproduces the CPU order exactly: the k-th expert is the k-th element of the total order
//    (c descending, index ascending) among the kept groups, found as the best element strictly after the
//    previous pick (no "taken" state); groups are picked by a scan with strict '>' like the CPU.
//  - The sigmoid is 1 / (1 + e) in f32 with e = exp(-x) evaluated in double and rounded to f32: that is
//    the correctly rounded expf, which glibc's expf also returns, so scores (and thus the selection on
//    the same logits) match the CPU bit for bit; CUDA's f32 expf may be 1-2 ulp off.
//  - Softmax as the CPU forms it: f32 row max, e = exp(x - max) in double rounded to f32, the row sum
//    of e in double (a warp reduction here, sequential on the CPU), s = e / sum rounded to f32. The two
//    sums may differ in the last bits of the double, which changes an f32 score only when it lies
//    within 2^-29 relative of a rounding boundary: the selection matches the CPU's except at such ties.
//  - NaN logits/bias cannot throw from a kernel: the token gets experts -1 and weights NaN, and
//    moe_permutation (which copies the expert counts to the host anyway) reports it.
//  - Balance loss: per-(sequence, expert) sums of s/Z (f64) and counts are reduced on the GPU, copied to
//    the host ([batch, E], small) and combined there in f64 like the CPU.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <vector>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#include "kernels/cuda/ops_moe.h"

namespace dsa::cuda {
namespace {

constexpr int kRouteWarps = 4;  // tokens per 128-thread block
constexpr int kPerLane = kMoeMaxExperts / 32;

struct MoeRouteParams {
  const float* logits;  // [N, E]
  const float* bias;    // [E], nullptr: no correction bias
  float* scores;        // [N, E] sigmoid(logits)
  int32_t* experts;     // [N, K] chosen experts, descending c (ties: lower index)
  float* weights;       // [N, K]
  int64_t N;
  int E, G, group_size, topk_group, K;
  bool norm_topk_prob;
  float scaling;
  bool softmax;    // softmax scores over the experts (else sigmoid per expert)
  bool group_max;  // group score = its largest biased score (else the sum of its top 2)
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {  // (v desc, index asc) order
  return bi == INT_MAX || v > bv || (v == bv && i < bi);
}

__global__ void __launch_bounds__(kRouteWarps * 32) moe_route_kernel(MoeRouteParams p) {
  __shared__ float c_sh[kRouteWarps][kMoeMaxExperts];
  __shared__ float s_sh[kRouteWarps][kMoeMaxExperts];
  __shared__ float g_sh[kRouteWarps][kMoeMaxGroups];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (n >= p.N) return;  // whole warps exit; only __syncwarp below
  const int E = p.E, K = p.K;
  float* c = c_sh[warp];
  float* s = s_sh[warp];
  float cv[kPerLane], sv[kPerLane];
  bool nan = false;
  if (p.softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int i = lane + 32 * j;
      sv[j] = i < E ? p.logits[n * E + i] : -INFINITY;
      m = fmaxf(m, sv[j]);
      nan |= isnan(sv[j]);
    }
    m = warp_max(m);
    double z = 0.0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int i = lane + 32 * j;
      sv[j] = i < E ? static_cast<float>(exp(static_cast<double>(sv[j] - m))) : 0.f;
      z += static_cast<double>(sv[j]);
    }
    z = warp_sum(z);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) sv[j] = static_cast<float>(static_cast<double>(sv[j]) / z);
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int i = lane + 32 * j;
      sv[j] = i < E ? 1.0f / (1.0f + static_cast<float>(exp(-static_cast<double>(p.logits[n * E + i])))) : 0.f;
    }
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int i = lane + 32 * j;
    cv[j] = 0.f;
    if (i < E) {
      p.scores[n * E + i] = sv[j];
      cv[j] = sv[j] + (p.bias ? p.bias[i] : 0.f);
      c[i] = cv[j];
      s[i] = sv[j];
      nan |= isnan(cv[j]);
    }
  }
  if (__any_sync(0xffffffffu, nan)) {
    if (lane < K) {
      p.experts[n * K + lane] = -1;
      p.weights[n * K + lane] = __int_as_float(0x7fc00000);
    }
    return;
  }
  __syncwarp();
  const int gs = p.group_size;
  if (lane < p.G) {  // sum of the group's top-2 biased scores (or its max), as the CPU computes it
    const float* cg = c + lane * gs;
    float score;
    if (p.group_max) {
      score = cg[0];
      for (int i = 1; i < gs; ++i) score = fmaxf(score, cg[i]);
    } else if (gs == 1) {
      score = cg[0];
    } else {
      float m1 = cg[0], m2 = cg[1];
      if (m2 > m1) {
        const float t = m1;
        m1 = m2;
        m2 = t;
      }
      for (int i = 2; i < gs; ++i) {
        if (cg[i] > m1) {
          m2 = m1;
          m1 = cg[i];
        } else if (cg[i] > m2) {
          m2 = cg[i];
        }
      }
      score = m1 + m2;
    }
    g_sh[warp][lane] = score;
  }
  __syncwarp();
  uint32_t keep = 0;  // every lane computes the same kept-group mask
  for (int t = 0; t < p.topk_group; ++t) {
    int best = -1;
    for (int g = 0; g < p.G; ++g) {
      if ((keep >> g) & 1u) continue;
      if (best < 0 || g_sh[warp][g] > g_sh[warp][best]) best = g;
    }
    keep |= 1u << best;
  }
  float pv = INFINITY;  // previous pick (c, index); the first pick has none
  int pi = -1;
  int ex[kMoeMaxTopK];
  float sel[kMoeMaxTopK];
#pragma unroll
  for (int k = 0; k < kMoeMaxTopK; ++k) {
    ex[k] = 0;
    sel[k] = 0.f;
    if (k < K) {
      float bv = -INFINITY;
      int bi = INT_MAX;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int i = lane + 32 * j;
        if (i >= E || !((keep >> (i / gs)) & 1u)) continue;
        const float v = cv[j];
        const bool after = pi < 0 || v < pv || (v == pv && i > pi);
        if (after && better(v, i, bv, bi)) {
          bv = v;
          bi = i;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (oi != INT_MAX && better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      pv = bv;
      pi = bi;
      ex[k] = bi;
      sel[k] = s[bi];
    }
  }
  if (lane != 0) return;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kMoeMaxTopK; ++k)
    if (k < K) sum += sel[k];
  const float denom = p.norm_topk_prob ? sum + 1e-20f : 1.0f;
#pragma unroll
  for (int k = 0; k < kMoeMaxTopK; ++k)
    if (k < K) {
      p.experts[n * K + k] = ex[k];
      p.weights[n * K + k] = sel[k] / denom * p.scaling;
    }
}

struct MoeRouteBwdParams {
  const float* dweights;  // [N, K]
  const float* scores;    // [N, E]
  const int32_t* experts; // [N, K]
  float* dlogits;         // [N, E], zeroed before the launch; K entries per token written (softmax: all E)
  int64_t N;
  int E, K;
  bool norm_topk_prob;
  float scaling;
  bool softmax;
};

__global__ void moe_route_backward_kernel(MoeRouteBwdParams p) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= p.N) return;
  const int E = p.E, K = p.K;
  const float* s = p.scores + n * E;
  const float* dw = p.dweights + n * K;
  const int32_t* ex = p.experts + n * K;
  for (int k = 0; k < K; ++k)
    if (ex[k] < 0 || ex[k] >= E) return;  // NaN-routed token (see moe_route)
  float Z = 1.f, proj = 0.f;
  if (p.norm_topk_prob) {  // w_k = c s_k / Z  =>  ds_j = c (dw_j - sum_k dw_k s_k / Z) / Z
    float sum = 0.f;
    for (int k = 0; k < K; ++k) sum += s[ex[k]];
    Z = sum + 1e-20f;
    for (int k = 0; k < K; ++k) proj += dw[k] * s[ex[k]];
    proj /= Z;
  }
  if (p.softmax) {  // dl_j = s_j (ds_j - sum_k ds_k s_k), ds nonzero on the chosen experts only
    float dot = 0.f;
    for (int k = 0; k < K; ++k) dot += p.scaling * (dw[k] - proj) / Z * s[ex[k]];
    for (int e = 0; e < E; ++e) p.dlogits[n * E + e] = -s[e] * dot;
    for (int k = 0; k < K; ++k) p.dlogits[n * E + ex[k]] += s[ex[k]] * (p.scaling * (dw[k] - proj) / Z);
    return;
  }
  for (int k = 0; k < K; ++k) {
    const float se = s[ex[k]];
    const float ds = p.scaling * (dw[k] - proj) / Z;
    p.dlogits[n * E + ex[k]] = ds * se * (1.f - se);
  }
}

// Softmax backward of a row: one warp per row, dl = s (ds - sum_j ds_j s_j).
__global__ void moe_softmax_scores_backward_kernel(const float* __restrict__ ds, const float* __restrict__ s,
                                                   float* __restrict__ dl, int64_t N, int E) {
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  double dot = 0.0;
  for (int e = lane; e < E; e += 32) dot += double(ds[n * E + e]) * double(s[n * E + e]);
  dot = warp_sum(dot);
  for (int e = lane; e < E; e += 32) dl[n * E + e] = s[n * E + e] * (ds[n * E + e] - static_cast<float>(dot));
}

__global__ void moe_scores_backward_kernel(const float* __restrict__ ds /*[n]*/, const float* __restrict__ s /*[n]*/,
                                           float* __restrict__ dl /*[n]*/, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dl[i] = ds[i] * s[i] * (1.f - s[i]);
}

__global__ void moe_expert_load_kernel(const int32_t* __restrict__ ids /*[n]*/, int64_t n, int E,
                                       float* __restrict__ load /*[E], zeroed*/) {
  extern __shared__ int hist[];  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(&load[e], static_cast<float>(hist[e]));  // exact below 2^24 rows
}

constexpr int kBalanceWarps = 8;
constexpr int kBalanceTokensPerBlock = 256;

struct MoeBalanceParams {
  const float* scores;     // [batch * seq, E]
  const int32_t* experts;  // [batch * seq, K]
  double* psum;            // [batch, E] sum over the sequence of s / Z (zeroed)
  int32_t* count;          // [batch, E] tokens of the sequence choosing each expert (zeroed)
  float* dscores;          // [batch * seq, E] += (backward kernel only)
  int64_t seq;
  int64_t batch;
  int E, K;
  double alpha;
};

// grid (token chunks of a sequence, batch)
__global__ void __launch_bounds__(kBalanceWarps * 32) moe_balance_stats_kernel(MoeBalanceParams p) {
  __shared__ double P[kMoeMaxExperts];
  __shared__ int cnt[kMoeMaxExperts];
  const int E = p.E, K = p.K, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    P[e] = 0.0;
    cnt[e] = 0;
  }
  __syncthreads();
  const int64_t b = blockIdx.y, t0 = b * p.seq + int64_t(blockIdx.x) * kBalanceTokensPerBlock;
  const int64_t t1 = min(t0 + kBalanceTokensPerBlock, (b + 1) * p.seq);
  for (int64_t t = t0 + warp; t < t1; t += kBalanceWarps) {
    const float* s = p.scores + t * E;
    double z = 0.0;
    for (int e = lane; e < E; e += 32) z += s[e];
    z = warp_sum(z);
    for (int e = lane; e < E; e += 32) atomicAdd(&P[e], double(s[e]) / z);
    if (lane < K) {
      const int id = p.experts[t * K + lane];
      if (id >= 0 && id < E) atomicAdd(&cnt[id], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    atomicAdd(&p.psum[b * E + e], P[e]);
    atomicAdd(&p.count[b * E + e], cnt[e]);
  }
}

// one warp per token: ds_{t,j} += (g_j - sum_i g_i s_i / Z) / Z,  g_i = alpha f_i / (seq * batch)
__global__ void __launch_bounds__(kBalanceWarps * 32) moe_balance_backward_kernel(MoeBalanceParams p) {
  const int E = p.E, lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kBalanceWarps + threadIdx.x / 32;
  if (t >= p.seq * p.batch) return;
  const int64_t b = t / p.seq;
  const float* s = p.scores + t * E;
  const double fscale = double(E) / double(int64_t(p.K) * p.seq), gscale = p.alpha / double(p.seq * p.batch);
  double z = 0.0, gsum = 0.0;
  for (int e = lane; e < E; e += 32) {
    z += s[e];
    gsum += gscale * (fscale * p.count[b * E + e]) * s[e];
  }
  z = warp_sum(z);
  gsum = warp_sum(gsum) / z;
  for (int e = lane; e < E; e += 32) {
    const double g = gscale * (fscale * p.count[b * E + e]);
    p.dscores[t * E + e] += static_cast<float>((g - gsum) / z);
  }
}

void expect_cuda(const char* op, const char* name, const Tensor& t) {
  DSA_CHECK(t.device() == Device::CUDA, "[", op, "] ", name, " must be on the GPU like the other operands, got ",
            t.desc());
}

int64_t blocks_for(int64_t n, int per_block) { return (n + per_block - 1) / per_block; }

}  // namespace

ops::MoeRouting moe_route(const Tensor& logits, const Tensor& bias, const ops::MoeRouteConfig& cfg) {
  const char* op = "moe_route";
  expect_cuda(op, "logits", logits);
  expect_dtype(op, "logits", logits, DType::F32);
  const int64_t N = logits.size(0), E = logits.size(1);
  DSA_CHECK(E <= kMoeMaxExperts, "[moe_route] at most ", kMoeMaxExperts, " experts on the GPU, got ", E);
  DSA_CHECK(cfg.n_group <= kMoeMaxGroups, "[moe_route] at most ", kMoeMaxGroups, " groups on the GPU, got ",
            cfg.n_group);
  DSA_CHECK(cfg.top_k <= kMoeMaxTopK, "[moe_route] top_k at most ", kMoeMaxTopK, " on the GPU, got ", cfg.top_k);
  Tensor b;
  if (bias.defined()) {
    b = bias.device() == Device::CUDA ? bias : bias.to(DType::F32).to(Device::CUDA);
    expect_dtype(op, "bias", b, DType::F32);
  }
  ops::MoeRouting r{Tensor::empty({N, E}, DType::F32, Device::CUDA),
                    Tensor::empty({N, cfg.top_k}, DType::I32, Device::CUDA),
                    Tensor::empty({N, cfg.top_k}, DType::F32, Device::CUDA), cfg.scoring};
  if (N == 0) return r;
  MoeRouteParams p{logits.data<float>(), b.defined() ? b.data<float>() : nullptr, r.scores.data<float>(),
                   r.experts.data<int32_t>(), r.weights.data<float>(), N, int(E), cfg.n_group, int(E / cfg.n_group),
                   cfg.topk_group, cfg.top_k, cfg.norm_topk_prob, static_cast<float>(cfg.routed_scaling_factor),
                   cfg.scoring == ops::MoeScoring::Softmax, cfg.group_max};
  moe_route_kernel<<<blocks_for(N, kRouteWarps), kRouteWarps * 32, 0, stream()>>>(p);
  check_launch(op);
  return r;
}

Tensor moe_route_backward(const Tensor& dweights, const ops::MoeRouting& r, const ops::MoeRouteConfig& cfg) {
  const char* op = "moe_route_backward";
  expect_cuda(op, "dweights", dweights);
  expect_cuda(op, "scores", r.scores);
  expect_cuda(op, "experts", r.experts);
  expect_dtype(op, "scores", r.scores, DType::F32);
  expect_dtype(op, "dweights", dweights, DType::F32);
  const int64_t N = r.scores.size(0), E = r.scores.size(1);
  Tensor dlogits = Tensor::zeros({N, E}, DType::F32, Device::CUDA);
  if (N == 0) return dlogits;
  MoeRouteBwdParams p{dweights.data<float>(), r.scores.data<float>(), r.experts.data<int32_t>(),
                      dlogits.data<float>(), N, int(E), cfg.top_k, cfg.norm_topk_prob,
                      static_cast<float>(cfg.routed_scaling_factor), r.scoring == ops::MoeScoring::Softmax};
  moe_route_backward_kernel<<<blocks_for(N, 128), 128, 0, stream()>>>(p);
  check_launch(op);
  return dlogits;
}

Tensor moe_scores_backward(const Tensor& dscores, const ops::MoeRouting& r) {
  const char* op = "moe_scores_backward";
  expect_cuda(op, "dscores", dscores);
  expect_cuda(op, "scores", r.scores);
  expect_dtype(op, "dscores", dscores, DType::F32);
  expect_dtype(op, "scores", r.scores, DType::F32);
  Tensor dlogits = Tensor::empty(r.scores.shape(), DType::F32, Device::CUDA);
  const int64_t n = dscores.numel();
  if (n == 0) return dlogits;
  if (r.scoring == ops::MoeScoring::Softmax) {
    const int64_t N = r.scores.size(0);
    moe_softmax_scores_backward_kernel<<<blocks_for(N, 4), 128, 0, stream()>>>(
        dscores.data<float>(), r.scores.data<float>(), dlogits.data<float>(), N, int(r.scores.size(1)));
    check_launch(op);
    return dlogits;
  }
  const int64_t blocks = std::min<int64_t>(blocks_for(n, 256), int64_t(sm_count()) * 8);
  moe_scores_backward_kernel<<<blocks, 256, 0, stream()>>>(dscores.data<float>(), r.scores.data<float>(),
                                                           dlogits.data<float>(), n);
  check_launch(op);
  return dlogits;
}

Tensor moe_expert_load(const ops::MoeRouting& r, int64_t n_experts) {
  const char* op = "moe_expert_load";
  expect_cuda(op, "experts", r.experts);
  DSA_CHECK(n_experts >= 1 && n_experts <= 8192, "[moe_expert_load] n_experts must be in [1, 8192], got ",
            n_experts);
  Tensor load = Tensor::zeros({n_experts}, DType::F32, Device::CUDA);
  const int64_t n = r.experts.numel();
  if (n == 0) return load;
  const int64_t blocks = std::min<int64_t>(blocks_for(n, 256), int64_t(sm_count()) * 2);
  moe_expert_load_kernel<<<blocks, 256, n_experts * sizeof(int), stream()>>>(r.experts.data<int32_t>(), n,
                                                                             int(n_experts), load.data<float>());
  check_launch(op);
  return load;
}

double moe_seq_balance_loss(const ops::MoeRouting& r, int64_t n_experts, int64_t batch, int64_t seq, double alpha,
                            Tensor* dscores) {
  const char* op = "moe_seq_balance_loss";
  expect_cuda(op, "scores", r.scores);
  expect_cuda(op, "experts", r.experts);
  expect_dtype(op, "scores", r.scores, DType::F32);
  const int64_t E = n_experts, K = r.experts.size(1);
  DSA_CHECK(E <= kMoeMaxExperts, "[moe_seq_balance_loss] at most ", kMoeMaxExperts, " experts on the GPU, got ", E);
  if (dscores) {
    expect_cuda(op, "dscores", *dscores);
    expect_dtype(op, "dscores", *dscores, DType::F32);
  }
  if (batch == 0 || seq == 0) return 0.0;
  Tensor psum = Tensor::zeros({batch, E}, DType::F64, Device::CUDA);
  Tensor count = Tensor::zeros({batch, E}, DType::I32, Device::CUDA);
  MoeBalanceParams p{r.scores.data<float>(), r.experts.data<int32_t>(), psum.data<double>(), count.data<int32_t>(),
                     dscores ? dscores->data<float>() : nullptr, seq, batch, int(E), int(K), alpha};
  const dim3 grid(static_cast<unsigned>(blocks_for(seq, kBalanceTokensPerBlock)), static_cast<unsigned>(batch));
  moe_balance_stats_kernel<<<grid, kBalanceWarps * 32, 0, stream()>>>(p);
  check_launch(op);
  if (dscores) {
    moe_balance_backward_kernel<<<blocks_for(batch * seq, kBalanceWarps), kBalanceWarps * 32, 0, stream()>>>(p);
    check_launch(op);
  }
  const Tensor P = psum.to(Device::CPU), C = count.to(Device::CPU);  // synchronizes
  const double* Ph = P.data<double>();
  const int32_t* Ch = C.data<int32_t>();
  double loss = 0;
  for (int64_t b = 0; b < batch; ++b) {
    double L = 0;
    for (int64_t e = 0; e < E; ++e)
      L += double(Ch[b * E + e]) * double(E) / double(K * seq) * (Ph[b * E + e] / double(seq));
    loss += alpha * L;
  }
  return loss / double(batch);
}

}  // namespace dsa::cuda
