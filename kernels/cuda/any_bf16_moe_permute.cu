// MoE token permutation on the GPU: the stable counting sort by expert (moe_permutation), the row gather
// into expert order (moe_permute) and its backward, the weighted combine and its backward. Rows are bf16,
// weights f32, sums in f32. CPU reference: kernels/moe.cpp.
//
// NOTES:
//  - moe_permutation is a three-kernel stable counting sort over chunks of 1024 flat indices i = n*K + k:
//    (1) per-chunk expert histograms, (2) one block scans them into each chunk's first row per expert
//    (expert offsets + earlier chunks), (3) each chunk scatters: the rank inside a warp comes from
//    __match_any_sync, the ranks of earlier warps of the chunk from a [32, E] shared prefix. Within an
//    expert the order is ascending i, exactly the CPU's. The counts (and the number of invalid ids) come
//    back to the host in one small copy, which is the only synchronization.
//  - The inverse map (n, k) -> row is rebuilt by a scatter kernel where needed (M int32 writes), since
//    MoePermutation carries only `rows`.
//  - Row kernels move 8 bf16 (16 B) per thread when D % 8 == 0, else one element per thread.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#include "kernels/cuda/ops_moe.h"

namespace dsa::cuda {
namespace {

constexpr int kChunk = 1024;  // flat indices per counting-sort block (one per thread)

struct MoePermParams {
  const int32_t* experts;  // [M] flat (token, slot) -> expert id
  int32_t* chunk_base;     // [n_chunks, E] counts per chunk, then (after the scan) each chunk's first row
  int32_t* info;           // [E + 1] counts per expert, then the number of ids outside [0, E) (zeroed)
  int32_t* rows;           // [M] permuted row -> flat index
  int64_t M;
  int E, n_chunks;
};

__global__ void __launch_bounds__(kChunk) moe_perm_count_kernel(MoePermParams p) {
  extern __shared__ int hist[];  // [E]
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * kChunk + threadIdx.x;
  if (i < p.M) {
    const int e = p.experts[i];
    if (e >= 0 && e < p.E)
      atomicAdd(&hist[e], 1);
    else
      atomicAdd(&p.info[p.E], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) p.chunk_base[int64_t(blockIdx.x) * p.E + e] = hist[e];
}

__global__ void moe_perm_scan_kernel(MoePermParams p) {  // one block, >= E threads
  __shared__ int total[kMoeMaxExperts];
  __shared__ int offset[kMoeMaxExperts];
  const int e = threadIdx.x;
  if (e < p.E) {
    int run = 0;
    for (int c = 0; c < p.n_chunks; ++c) {
      int32_t* b = p.chunk_base + int64_t(c) * p.E + e;
      const int t = *b;
      *b = run;
      run += t;
    }
    total[e] = run;
    p.info[e] = run;
  }
  __syncthreads();
  if (e == 0) {
    int run = 0;
    for (int j = 0; j < p.E; ++j) {
      offset[j] = run;
      run += total[j];
    }
  }
  __syncthreads();
  if (e < p.E)
    for (int c = 0; c < p.n_chunks; ++c) p.chunk_base[int64_t(c) * p.E + e] += offset[e];
}

__global__ void __launch_bounds__(kChunk) moe_perm_scatter_kernel(MoePermParams p) {
  extern __shared__ int warp_count[];  // [32 warps, E]
  const int E = p.E, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = threadIdx.x; j < 32 * E; j += blockDim.x) warp_count[j] = 0;
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * kChunk + threadIdx.x;
  int e = i < p.M ? p.experts[i] : -1;
  const bool valid = e >= 0 && e < E;
  if (!valid) e = -1 - lane;  // a key no other lane shares
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int rank = __popc(peers & ((1u << lane) - 1u));
  if (valid && rank == 0) warp_count[warp * E + e] = __popc(peers);
  __syncthreads();
  for (int x = threadIdx.x; x < E; x += blockDim.x) {  // exclusive prefix over the warps
    int run = 0;
    for (int w = 0; w < 32; ++w) {
      const int t = warp_count[w * E + x];
      warp_count[w * E + x] = run;
      run += t;
    }
  }
  __syncthreads();
  if (valid) {
    const int row = p.chunk_base[int64_t(blockIdx.x) * E + e] + warp_count[warp * E + e] + rank;
    p.rows[row] = static_cast<int32_t>(i);
  }
}

__global__ void moe_inverse_rows_kernel(const int32_t* __restrict__ rows /*[M]*/, int32_t* __restrict__ where /*[M]*/,
                                        int64_t M) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < M) where[rows[r]] = static_cast<int32_t>(r);
}

// ---- bf16 vectors of V elements (8 = one 16-byte load, or 1)
template <int V>
struct Vec;
template <>
struct Vec<8> {
  uint4 raw;
  __device__ __forceinline__ void load(const __nv_bfloat16* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store(__nv_bfloat16* p) const { *reinterpret_cast<uint4*>(p) = raw; }
  __device__ __forceinline__ void to_f32(float* f) const {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = __bfloat1622float2(h[j]);
      f[2 * j] = t.x;
      f[2 * j + 1] = t.y;
    }
  }
  __device__ __forceinline__ void from_f32(const float* f) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
  }
};
template <>
struct Vec<1> {
  __nv_bfloat16 raw;
  __device__ __forceinline__ void load(const __nv_bfloat16* p) { raw = *p; }
  __device__ __forceinline__ void store(__nv_bfloat16* p) const { *p = raw; }
  __device__ __forceinline__ void to_f32(float* f) const { f[0] = __bfloat162float(raw); }
  __device__ __forceinline__ void from_f32(const float* f) { raw = __float2bfloat16_rn(f[0]); }
};

struct MoeRowsParams {
  const __nv_bfloat16* src;  // moe_permute: x [N, D]; backward/combine: dxp or yp [N*K, D]
  __nv_bfloat16* dst;        // moe_permute: xp [N*K, D]; backward/combine: dx or y [N, D]
  const int32_t* index;      // moe_permute: rows [N*K]; backward/combine: where [N*K] ((n, k) -> row)
  const float* weights;      // [N, K] (combine only, else null)
  int64_t n_out;             // rows of dst
  int64_t D;
  int K;
};

template <int V>
__global__ void moe_permute_kernel(MoeRowsParams p) {  // xp[r] = x[rows[r] / K]
  const int64_t vpr = p.D / V, n = p.n_out * vpr;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / vpr, c = (idx - r * vpr) * V;
    Vec<V> v;
    v.load(p.src + int64_t(p.index[r] / p.K) * p.D + c);
    v.store(p.dst + r * p.D + c);
  }
}

// dst[n] = sum_k (weights ? weights[n, k] : 1) * src[where[n*K + k]], accumulated in f32 in slot order
template <int V>
__global__ void moe_gather_sum_kernel(MoeRowsParams p) {
  const int64_t vpr = p.D / V, n = p.n_out * vpr;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / vpr, c = (idx - t * vpr) * V;
    float acc[V], f[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (int k = 0; k < p.K; ++k) {
      Vec<V> v;
      v.load(p.src + int64_t(p.index[t * p.K + k]) * p.D + c);
      v.to_f32(f);
      const float w = p.weights ? p.weights[t * p.K + k] : 1.f;
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = fmaf(w, f[j], acc[j]);
    }
    Vec<V> o;
    o.from_f32(acc);
    o.store(p.dst + t * p.D + c);
  }
}

struct MoeCombineBwdParams {
  const __nv_bfloat16* dy;  // [N, D]
  const __nv_bfloat16* yp;  // [N*K, D]
  const float* weights;     // [N, K]
  const int32_t* where;     // [N*K] (n, k) -> permuted row
  __nv_bfloat16* dyp;       // [N*K, D] or null
  float* dweights;          // [N, K] or null
  int64_t NK;
  int64_t D;
  int K;
};

// one warp per (token, slot): dyp[row] = w * dy[n]; dweights[n, k] = <dy[n], yp[row]>
template <int V>
__global__ void moe_combine_backward_kernel(MoeCombineBwdParams p) {
  const int64_t nk = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (nk >= p.NK) return;
  const int64_t n = nk / p.K, row = p.where[nk];
  const float w = p.weights[nk];
  const __nv_bfloat16* g = p.dy + n * p.D;
  float dot = 0.f, gf[V], yf[V];
  for (int64_t c = int64_t(lane) * V; c < p.D; c += 32 * V) {
    Vec<V> gv;
    gv.load(g + c);
    gv.to_f32(gf);
    if (p.dyp) {
      float o[V];
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = w * gf[j];
      Vec<V> ov;
      ov.from_f32(o);
      ov.store(p.dyp + row * p.D + c);
    }
    if (p.dweights) {
      Vec<V> yv;
      yv.load(p.yp + row * p.D + c);
      yv.to_f32(yf);
#pragma unroll
      for (int j = 0; j < V; ++j) dot = fmaf(gf[j], yf[j], dot);
    }
  }
  if (!p.dweights) return;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (lane == 0) p.dweights[nk] = dot;
}

// ---- host side

void expect_cuda(const char* op, const char* name, const Tensor& t) {
  DSA_CHECK(t.device() == Device::CUDA, "[", op, "] ", name, " must be on the GPU like the other operands, got ",
            t.desc());
}

void check_perm(const char* op, const ops::MoePermutation& p, int64_t n_rows) {
  expect_cuda(op, "permutation rows", p.rows);
  expect_dtype(op, "permutation rows", p.rows, DType::I32);
  DSA_CHECK(p.rows.numel() == n_rows, "[", op, "] permutation has ", p.rows.numel(), " rows, expected ", n_rows);
  DSA_CHECK(p.offsets.size() == p.counts.size() + 1 && p.offsets.back() == n_rows, "[", op,
            "] permutation counts/offsets do not cover ", n_rows, " rows");
}

const __nv_bfloat16* bf(const Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data<bf16>()); }
__nv_bfloat16* bf(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data<bf16>()); }

// 16-byte vectors when every row starts 16-byte aligned
bool vec8(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % 8 != 0) return false;
  for (const void* q : ptrs)
    if (q && reinterpret_cast<uintptr_t>(q) % 16 != 0) return false;
  return true;
}

int64_t grid_for(int64_t work, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, int64_t(sm_count()) * 16));
}

Tensor inverse_rows(const ops::MoePermutation& p) {
  const int64_t M = p.rows.numel();
  Tensor where = Tensor::empty({M}, DType::I32, Device::CUDA);
  if (M == 0) return where;
  moe_inverse_rows_kernel<<<(M + 255) / 256, 256, 0, stream()>>>(p.rows.data<int32_t>(), where.data<int32_t>(), M);
  check_launch("moe_permutation inverse");
  return where;
}

void launch_gather_sum(const char* op, MoeRowsParams p) {
  const int V = vec8(p.D, {p.src, p.dst}) ? 8 : 1;
  const int64_t grid = grid_for(p.n_out * (p.D / V), 256);
  if (V == 8)
    moe_gather_sum_kernel<8><<<grid, 256, 0, stream()>>>(p);
  else
    moe_gather_sum_kernel<1><<<grid, 256, 0, stream()>>>(p);
  check_launch(op);
}

}  // namespace

ops::MoePermutation moe_permutation(const Tensor& experts, int64_t n_experts) {
  const char* op = "moe_permutation";
  expect_cuda(op, "experts", experts);
  DSA_CHECK(n_experts >= 1 && n_experts <= kMoeMaxExperts, "[moe_permutation] n_experts must be in [1, ",
            kMoeMaxExperts, "] on the GPU, got ", n_experts);
  const int64_t M = experts.numel(), E = n_experts;
  DSA_CHECK(M < (int64_t(1) << 31), "[moe_permutation] too many rows: ", M);
  const int n_chunks = static_cast<int>((M + kChunk - 1) / kChunk);
  ops::MoePermutation perm;
  perm.rows = Tensor::empty({M}, DType::I32, Device::CUDA);
  Tensor info = Tensor::zeros({E + 1}, DType::I32, Device::CUDA);
  if (M > 0) {
    Tensor chunk_base = Tensor::empty({n_chunks, E}, DType::I32, Device::CUDA);
    MoePermParams p{experts.data<int32_t>(), chunk_base.data<int32_t>(), info.data<int32_t>(),
                    perm.rows.data<int32_t>(), M, int(E), n_chunks};
    moe_perm_count_kernel<<<n_chunks, kChunk, E * sizeof(int), stream()>>>(p);
    check_launch(op);
    moe_perm_scan_kernel<<<1, kMoeMaxExperts, 0, stream()>>>(p);
    check_launch(op);
    moe_perm_scatter_kernel<<<n_chunks, kChunk, 32 * E * sizeof(int), stream()>>>(p);
    check_launch(op);
  }
  const Tensor host = info.to(Device::CPU);  // the one synchronization
  const int32_t* h = host.data<int32_t>();
  DSA_CHECK(h[E] == 0, "[moe_permutation] ", h[E], " expert ids are outside [0, ", E,
            ") (a token with NaN router logits gets -1)");
  perm.counts.assign(static_cast<size_t>(E), 0);
  perm.offsets.assign(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) {
    perm.counts[e] = h[e];
    perm.offsets[e + 1] = perm.offsets[e] + h[e];
  }
  return perm;
}

Tensor moe_permute(const Tensor& x, const ops::MoePermutation& p, int64_t top_k) {
  const char* op = "moe_permute";
  expect_cuda(op, "x", x);
  expect_dtype(op, "x", x, DType::BF16);
  const int64_t N = x.size(0), D = x.size(1), M = N * top_k;
  check_perm(op, p, M);
  Tensor xp = Tensor::empty({M, D}, DType::BF16, Device::CUDA);
  if (M == 0 || D == 0) return xp;
  MoeRowsParams prm{bf(x), bf(xp), p.rows.data<int32_t>(), nullptr, M, D, int(top_k)};
  const int V = vec8(D, {prm.src, prm.dst}) ? 8 : 1;
  const int64_t grid = grid_for(M * (D / V), 256);
  if (V == 8)
    moe_permute_kernel<8><<<grid, 256, 0, stream()>>>(prm);
  else
    moe_permute_kernel<1><<<grid, 256, 0, stream()>>>(prm);
  check_launch(op);
  return xp;
}

Tensor moe_permute_backward(const Tensor& dxp, const ops::MoePermutation& p, int64_t n_tokens, int64_t top_k) {
  const char* op = "moe_permute_backward";
  expect_cuda(op, "dxp", dxp);
  expect_dtype(op, "dxp", dxp, DType::BF16);
  check_perm(op, p, n_tokens * top_k);
  const int64_t D = dxp.size(1);
  Tensor dx = Tensor::empty({n_tokens, D}, DType::BF16, Device::CUDA);
  if (n_tokens == 0 || D == 0) return dx;
  const Tensor where = inverse_rows(p);
  launch_gather_sum(op, MoeRowsParams{bf(dxp), bf(dx), where.data<int32_t>(), nullptr, n_tokens, D, int(top_k)});
  return dx;
}

Tensor moe_combine(const Tensor& yp, const Tensor& weights, const ops::MoePermutation& p) {
  const char* op = "moe_combine";
  expect_cuda(op, "yp", yp);
  expect_cuda(op, "weights", weights);
  expect_dtype(op, "yp", yp, DType::BF16);
  expect_dtype(op, "weights", weights, DType::F32);
  const int64_t N = weights.size(0), K = weights.size(1), D = yp.size(1);
  check_perm(op, p, N * K);
  Tensor y = Tensor::empty({N, D}, DType::BF16, Device::CUDA);
  if (N == 0 || D == 0) return y;
  const Tensor where = inverse_rows(p);
  launch_gather_sum(op, MoeRowsParams{bf(yp), bf(y), where.data<int32_t>(), weights.data<float>(), N, D, int(K)});
  return y;
}

void moe_combine_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const ops::MoePermutation& p,
                          Tensor* dyp, Tensor* dweights) {
  const char* op = "moe_combine_backward";
  expect_cuda(op, "dy", dy);
  expect_cuda(op, "yp", yp);
  expect_cuda(op, "weights", weights);
  expect_dtype(op, "dy", dy, DType::BF16);
  expect_dtype(op, "yp", yp, DType::BF16);
  expect_dtype(op, "weights", weights, DType::F32);
  const int64_t N = weights.size(0), K = weights.size(1), D = yp.size(1);
  check_perm(op, p, N * K);
  if (dyp) *dyp = Tensor::empty({N * K, D}, DType::BF16, Device::CUDA);
  if (dweights) *dweights = Tensor::zeros({N, K}, DType::F32, Device::CUDA);
  if (N * K == 0 || (!dyp && !dweights)) return;
  const Tensor where = inverse_rows(p);
  MoeCombineBwdParams prm{bf(dy), bf(yp), weights.data<float>(), where.data<int32_t>(),
                          dyp ? bf(*dyp) : nullptr, dweights ? dweights->data<float>() : nullptr, N * K, D, int(K)};
  const int64_t blocks = (N * K + 7) / 8;  // 8 warps per block
  if (vec8(D, {prm.dy, prm.yp, prm.dyp}))
    moe_combine_backward_kernel<8><<<blocks, 256, 0, stream()>>>(prm);
  else
    moe_combine_backward_kernel<1><<<blocks, 256, 0, stream()>>>(prm);
  check_launch(op);
}

}  // namespace dsa::cuda
