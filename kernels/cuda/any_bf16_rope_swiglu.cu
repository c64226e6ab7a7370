// Rotary position embedding (in place, both pairings, forward and backward) and SwiGLU on bf16.
//
// Rope, with h = R/2, c_i = cos[pos, i], s_i = sin[pos, i], v = x[n, head, offset : offset + R]:
//   RotateHalf:       y[i] = v[i] c - v[i+h] s,     y[i+h] = v[i+h] c + v[i] s   (backward: s -> -s)
//   Interleaved fwd:  y[i] = v[2i] c - v[2i+1] s,   y[i+h] = v[2i+1] c + v[2i] s (de-interleaves)
//   Interleaved bwd:  y[2i] = v[i] c + v[i+h] s,    y[2i+1] = v[i+h] c - v[i] s
// NOTES: one warp per (token, head) slice; every lane loads its pairs into registers before any lane
// writes (__syncwarp), which makes the permuting Interleaved forms safe in place. h <= 128.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_layers.h"

namespace dsa::cuda {

namespace {

using bf = __nv_bfloat16;
constexpr int kMaxPairsPerLane = 4;  // h <= 128

struct RopeParams {
  bf* x;                  // [N, H, D] in place
  const int32_t* pos;     // [N]
  const float* cos;       // [P, h]
  const float* sin;       // [P, h]
  int64_t n, heads, d, offset, h, p;
  bool interleaved, backward;
};

__global__ void rope_kernel(RopeParams p) {
  const int64_t slice = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (slice >= p.n * p.heads) return;
  const int64_t t = slice / p.heads;
  const int32_t ps = p.pos[t];
  bf* v = p.x + slice * p.d + p.offset;
  const bool bad = ps < 0 || ps >= p.p;  // out-of-range position: NaN slice (no host check)
  float a[kMaxPairsPerLane], b[kMaxPairsPerLane];
#pragma unroll
  for (int k = 0; k < kMaxPairsPerLane; ++k) {
    const int64_t i = lane + 32 * k;
    if (i < p.h) {
      const bool pairs_in = p.interleaved && !p.backward;  // read (2i, 2i+1), else (i, i+h)
      a[k] = __bfloat162float(v[pairs_in ? 2 * i : i]);
      b[k] = __bfloat162float(v[pairs_in ? 2 * i + 1 : i + p.h]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int k = 0; k < kMaxPairsPerLane; ++k) {
    const int64_t i = lane + 32 * k;
    if (i >= p.h) continue;
    const float c = bad ? NAN : p.cos[static_cast<int64_t>(ps) * p.h + i];
    const float s = bad ? NAN : p.sin[static_cast<int64_t>(ps) * p.h + i];
    if (!p.backward) {
      v[i] = __float2bfloat16_rn(a[k] * c - b[k] * s);
      v[i + p.h] = __float2bfloat16_rn(b[k] * c + a[k] * s);
    } else if (!p.interleaved) {
      v[i] = __float2bfloat16_rn(a[k] * c + b[k] * s);
      v[i + p.h] = __float2bfloat16_rn(b[k] * c - a[k] * s);
    } else {
      v[2 * i] = __float2bfloat16_rn(a[k] * c + b[k] * s);
      v[2 * i + 1] = __float2bfloat16_rn(b[k] * c - a[k] * s);
    }
  }
}

// ---------------------------------------------------------------------------------------- swiglu
struct SwigluParams {
  const bf* gate;  // [n]
  const bf* up;    // [n]
  const bf* dy;    // [n] (backward)
  bf* y;           // [n] forward output
  bf* dgate;       // [n] or nullptr
  bf* dup;         // [n] or nullptr
  int64_t n;
  bool vec;        // every pointer 16-byte aligned
};

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

__device__ __forceinline__ void swiglu_one(const SwigluParams& p, bool bwd, float g, float u, float d, float& y,
                                           float& dg, float& du) {
  const float s = sigmoidf_(g);
  if (!bwd) {
    y = g * s * u;
  } else {
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
  }
}

template <bool kBwd>
__global__ void swiglu_kernel(SwigluParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (p.vec) {
    const int64_t nv = p.n / 8;
    for (int64_t i = i0; i < nv; i += stride) {
      Vec<bf> g, u, d, y, dg, du;
      g.load(p.gate + i * 8);
      u.load(p.up + i * 8);
      if (kBwd) d.load(p.dy + i * 8);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float fy = 0, fdg = 0, fdu = 0;
        swiglu_one(p, kBwd, to_f32(g.v[j]), to_f32(u.v[j]), kBwd ? to_f32(d.v[j]) : 0.0f, fy, fdg, fdu);
        y.v[j] = __float2bfloat16_rn(fy);
        dg.v[j] = __float2bfloat16_rn(fdg);
        du.v[j] = __float2bfloat16_rn(fdu);
      }
      if (!kBwd) y.store(p.y + i * 8);
      if (kBwd && p.dgate) dg.store(p.dgate + i * 8);
      if (kBwd && p.dup) du.store(p.dup + i * 8);
    }
    done = nv * 8;
  }
  for (int64_t i = done + i0; i < p.n; i += stride) {
    float fy = 0, fdg = 0, fdu = 0;
    swiglu_one(p, kBwd, to_f32(p.gate[i]), to_f32(p.up[i]), kBwd ? to_f32(p.dy[i]) : 0.0f, fy, fdg, fdu);
    if (!kBwd) p.y[i] = __float2bfloat16_rn(fy);
    if (kBwd && p.dgate) p.dgate[i] = __float2bfloat16_rn(fdg);
    if (kBwd && p.dup) p.dup[i] = __float2bfloat16_rn(fdu);
  }
}

void check_gate_up(const char* op, const Tensor& gate, const Tensor& up) {
  expect_dtype_cuda(op, "gate", gate, DType::BF16);
  expect_dtype_cuda(op, "up", up, DType::BF16);
  DSA_CHECK(gate.ndim() >= 1 && up.shape() == gate.shape(), "[", op, "] up must have gate's shape ", gate.shape(),
            ", got ", up.desc());
}

}  // namespace

void rope_apply_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t offset,
                 ops::RopeStyle style, bool backward) {
  const char* op = backward ? "rope_backward" : "rope";
  expect_dtype_cuda(op, "x", x, DType::BF16);
  DSA_CHECK(x.ndim() == 2 || x.ndim() == 3, "[", op, "] x must be [N, H, D] or [N, D], got ", x.desc());
  expect_dtype_cuda(op, "cos", cos, DType::F32);
  expect_shape(op, "cos", cos, {-1, -1});
  expect_dtype_cuda(op, "sin", sin, DType::F32);
  expect_shape(op, "sin", sin, cos.shape());
  expect_dtype_cuda(op, "positions", positions, DType::I32);
  expect_shape(op, "positions", positions, {x.size(0)});
  const int64_t n = x.size(0), heads = x.ndim() == 3 ? x.size(1) : 1, d = x.size(-1);
  const int64_t h = cos.size(1);
  DSA_CHECK(offset >= 0 && offset + 2 * h <= d, "[", op, "] rotating dims [", offset, ", ", offset + 2 * h,
            ") do not fit x ", x.desc());
  DSA_CHECK(h <= 32 * kMaxPairsPerLane, "[", op, "] rotary half-width ", h, " exceeds the GPU kernel's ",
            32 * kMaxPairsPerLane);
  if (n * heads == 0 || h == 0) return;
  RopeParams p{static_cast<bf*>(x.raw()), positions.data<int32_t>(), cos.data<float>(), sin.data<float>(),
               n, heads, d, offset, h, cos.size(0), style == ops::RopeStyle::Interleaved, backward};
  const int warps = 8;
  rope_kernel<<<static_cast<unsigned>((n * heads + warps - 1) / warps), warps * 32, 0, stream()>>>(p);
  check_launch(op);
}

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu";
  check_gate_up(op, gate, up);
  Tensor y = Tensor::empty(gate.shape(), DType::BF16, Device::CUDA);
  const int64_t n = gate.numel();
  if (n == 0) return y;
  SwigluParams p{static_cast<const bf*>(gate.raw()), static_cast<const bf*>(up.raw()), nullptr,
                 static_cast<bf*>(y.raw()), nullptr, nullptr, n,
                 aligned16(gate.raw()) && aligned16(up.raw()) && aligned16(y.raw())};
  swiglu_kernel<false><<<grid_for(p.vec ? n / 8 + 1 : n, 256), 256, 0, stream()>>>(p);
  check_launch(op);
  return y;
}

void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor* dgate, Tensor* dup) {
  const char* op = "swiglu_backward";
  check_gate_up(op, gate, up);
  expect_dtype_cuda(op, "dy", dy, DType::BF16);
  DSA_CHECK(dy.shape() == gate.shape(), "[", op, "] dy must have shape ", gate.shape(), ", got ", dy.desc());
  Tensor* dg = dgate ? &output_arg(op, "dgate", dgate, gate.shape(), DType::BF16) : nullptr;
  Tensor* du = dup ? &output_arg(op, "dup", dup, gate.shape(), DType::BF16) : nullptr;
  const int64_t n = gate.numel();
  if (n == 0 || (!dg && !du)) return;
  SwigluParams p{static_cast<const bf*>(gate.raw()), static_cast<const bf*>(up.raw()),
                 static_cast<const bf*>(dy.raw()), nullptr, dg ? static_cast<bf*>(dg->raw()) : nullptr,
                 du ? static_cast<bf*>(du->raw()) : nullptr, n, false};
  p.vec = aligned16(p.gate) && aligned16(p.up) && aligned16(p.dy) && (!p.dgate || aligned16(p.dgate)) &&
          (!p.dup || aligned16(p.dup));
  swiglu_kernel<true><<<grid_for(p.vec ? n / 8 + 1 : n, 256), 256, 0, stream()>>>(p);
  check_launch(op);
}

}  // namespace dsa::cuda
