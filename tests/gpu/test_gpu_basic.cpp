// GPU tests of the basic op families against the CPU reference: gemm / linear (cuBLASLt),
// elementwise and layout ops, casts, embedding, norms, rope, swiglu, lm-head cross-entropy, AdamW and
// the gradient norm. The CPU computes on f32 copies of the same bf16-rounded inputs. Outputs are
// poisoned (NaN) before each GPU run where the op writes into a given buffer. Timings: `dsa-bench ops
// --only gemm`.
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "kernels/layout_ops.h"
#include "kernels/ops.h"
#include "tests/gpu/gpu_util.h"
#include "tests/test_util.h"

namespace dsa {
namespace {

using testing::poisoned_gpu;
using testing::randint;
using testing::randn;
using testing::rel_close;
using testing::to_cpu64;
using testing::to_gpu;

constexpr double kBf = 1e-2, kF32 = 1e-5;

// A random input: cpu is f32 holding exactly the values the GPU tensor (dtype) holds.
struct In {
  Tensor cpu, gpu;
};
In rnd(const Shape& s, uint64_t seed, DType dt = DType::BF16, double sd = 1.0) {
  Tensor c = randn(s, seed, sd, DType::F32);
  if (dt == DType::BF16) c = c.to(DType::BF16).to(DType::F32);
  return {c, to_gpu(c, dt)};
}
Tensor f32(const Tensor& gpu) { return gpu.to(Device::CPU).to(DType::F32); }

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// ---------------------------------------------------------------------------------------- gemm
TEST(GpuGemm, TwoDAllTransposesAndDtypes) {
  DSA_REQUIRE_GPU();
  struct Sz {
    int64_t m, k, n;
  };
  for (Sz z : {Sz{7, 13, 5}, Sz{64, 96, 80}, Sz{130, 257, 33}})
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      SCOPED_TRACE(strcat_("m ", z.m, " k ", z.k, " n ", z.n, " ta ", ta, " tb ", tb));
      const Shape sa = ta ? Shape{z.k, z.m} : Shape{z.m, z.k}, sb = tb ? Shape{z.n, z.k} : Shape{z.k, z.n};
      for (DType dt : {DType::BF16, DType::F32}) {
        In a = rnd(sa, 1, dt), b = rnd(sb, 2, dt);
        // c (same dtype as a/b), alpha 0.5, beta 0 into a poisoned buffer
        Tensor ref = Tensor::empty({z.m, z.n}, DType::F32);
        ops::gemm(a.cpu, ta, b.cpu, tb, ref, 0.5, 0.0);
        Tensor c = poisoned_gpu({z.m, z.n}, dt);
        ops::gemm(a.gpu, ta, b.gpu, tb, c, 0.5, 0.0);
        EXPECT_TRUE(rel_close(c, ref, dt == DType::BF16 ? kBf : kF32)) << dtype_name(dt);
        // f32 C accumulating with beta = 1 (how parameter gradients accumulate)
        In c0 = rnd({z.m, z.n}, 3, DType::F32);
        Tensor ref2 = c0.cpu.clone();
        ops::gemm(a.cpu, ta, b.cpu, tb, ref2, 1.0, 1.0);
        Tensor c2 = c0.gpu.clone();
        ops::gemm(a.gpu, ta, b.gpu, tb, c2, 1.0, 1.0);
        EXPECT_TRUE(rel_close(c2, ref2, dt == DType::BF16 ? 2e-3 : kF32)) << dtype_name(dt) << " -> f32 beta 1";
      }
    }
}

TEST(GpuGemm, BatchedAndSharedOperands) {
  DSA_REQUIRE_GPU();
  const int64_t B = 3, M = 9, K = 17, N = 11;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    const Shape sa = ta ? Shape{K, M} : Shape{M, K}, sb = tb ? Shape{N, K} : Shape{K, N};
    auto batched = [&](const Shape& s) { return Shape{B, s[0], s[1]}; };
    for (int mode = 0; mode < 3; ++mode) {  // 0: both batched, 1: b shared, 2: a shared
      SCOPED_TRACE(strcat_("ta ", ta, " tb ", tb, " mode ", mode));
      In a = rnd(mode == 2 ? sa : batched(sa), 4), b = rnd(mode == 1 ? sb : batched(sb), 5);
      Tensor ref = Tensor::empty({B, M, N}, DType::F32);
      ops::gemm(a.cpu, ta, b.cpu, tb, ref);
      Tensor c = poisoned_gpu({B, M, N}, DType::BF16);
      ops::gemm(a.gpu, ta, b.gpu, tb, c);
      EXPECT_TRUE(rel_close(c, ref, kBf));
    }
  }
}

TEST(GpuGemm, EmptyInnerDimOverwritesPoison) {
  DSA_REQUIRE_GPU();
  In a = rnd({5, 0}, 1), b = rnd({0, 3}, 2);
  Tensor c = poisoned_gpu({5, 3}, DType::BF16);
  ops::gemm(a.gpu, false, b.gpu, false, c);
  EXPECT_EQ(ops::sum_squares(c), 0.0);
}

TEST(GpuLinear, ForwardBackwardBf16AndF32) {
  DSA_REQUIRE_GPU();
  struct Sz {
    int64_t n, in, out;
  };
  for (Sz z : {Sz{7, 13, 5}, Sz{256, 1024, 384}, Sz{96, 256, 2048}})
    for (DType dt : {DType::BF16, DType::F32}) {
      SCOPED_TRACE(strcat_(dtype_name(dt), " n ", z.n, " in ", z.in, " out ", z.out));
      const double tol = dt == DType::BF16 ? kBf : kF32;
      In x = rnd({z.n, z.in}, 10, dt), w = rnd({z.out, z.in}, 11, dt, 0.05), dy = rnd({z.n, z.out}, 12, dt);
      In dw0 = rnd({z.out, z.in}, 13, DType::F32);
      const Tensor y_ref = ops::linear_forward(x.cpu, w.cpu);
      EXPECT_TRUE(rel_close(ops::linear_forward(x.gpu, w.gpu), y_ref, tol));
      Tensor dw_ref = dw0.cpu.clone(), dw = dw0.gpu.clone();
      const Tensor dx_ref = ops::linear_backward(dy.cpu, x.cpu, w.cpu, &dw_ref);
      const Tensor dx = ops::linear_backward(dy.gpu, x.gpu, w.gpu, &dw);
      EXPECT_EQ(dx.dtype(), dt);
      EXPECT_EQ(dw.dtype(), DType::F32);
      EXPECT_TRUE(rel_close(dx, dx_ref, tol));
      EXPECT_TRUE(rel_close(dw, dw_ref, dt == DType::BF16 ? 2e-3 : kF32));  // dw += on existing values
      Tensor dw_new;  // undefined: starts at zero, need_dx false
      EXPECT_FALSE(ops::linear_backward(dy.gpu, x.gpu, w.gpu, &dw_new, false).defined());
      Tensor dw_new_ref;
      ops::linear_backward(dy.cpu, x.cpu, w.cpu, &dw_new_ref, false);
      EXPECT_TRUE(rel_close(dw_new, dw_new_ref, dt == DType::BF16 ? kBf : kF32));
    }
  // leading dims [2, 3, in]
  In x = rnd({2, 3, 13}, 14), w = rnd({5, 13}, 15);
  Tensor y = ops::linear_forward(x.gpu, w.gpu);
  EXPECT_EQ(y.shape(), (Shape{2, 3, 5}));
  EXPECT_TRUE(rel_close(y, ops::linear_forward(x.cpu, w.cpu), kBf));
}

TEST(GpuGemm, ErrorMessages) {
  DSA_REQUIRE_GPU();
  In a = rnd({4, 5}, 1), b32 = rnd({5, 3}, 2, DType::F32);
  Tensor c = poisoned_gpu({4, 3}, DType::F32);
  EXPECT_NE(error_of([&] { ops::gemm(a.gpu, false, b32.gpu, false, c); }).find("[gemm] unsupported dtypes"),
            std::string::npos);
  In w32 = rnd({3, 5}, 3, DType::F32);
  EXPECT_NE(error_of([&] { ops::linear_forward(a.gpu, w32.gpu); }).find("[linear_forward] w must be bf16"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ops::gemm(a.gpu, false, b32.cpu, false, c); }).find("[gemm] b must be a CUDA tensor"),
            std::string::npos);
}

// ---------------------------------------------------------------------------- elementwise / layout
TEST(GpuElementwise, AxpbyFamily) {
  DSA_REQUIRE_GPU();
  for (DType dt : {DType::BF16, DType::F32})
    for (int64_t n : {int64_t(1), int64_t(1037), int64_t(4096)})
      for (int64_t off : {int64_t(0), int64_t(1)}) {  // off = 1: unaligned views (scalar path)
        SCOPED_TRACE(strcat_(dtype_name(dt), " n ", n, " off ", off));
        const double tol = dt == DType::BF16 ? kBf : kF32;
        In a = rnd({n + off}, 20, dt), b = rnd({n + off}, 21, dt);
        Tensor ag = a.gpu.slice_rows(off, n + off), ac = a.cpu.slice_rows(off, n + off).clone();
        const Tensor bg = b.gpu.slice_rows(off, n + off), bc = b.cpu.slice_rows(off, n + off);
        EXPECT_TRUE(rel_close(ops::add(ag, bg), ops::add(ac, bc), tol));
        // each step starts the CPU from the values the GPU holds (bf16 rounds after every op)
        ops::add_scaled_(ag, bg, -0.75);
        ops::add_scaled_(ac, bc, -0.75);
        EXPECT_TRUE(rel_close(ag, ac, tol));
        ac = f32(ag);
        ops::scale_(ag, 1.5);
        ops::scale_(ac, 1.5);
        EXPECT_TRUE(rel_close(ag, ac, tol));
        ac = f32(ag);
        ops::add_(ag, bg);
        ops::add_(ac, bc);
        EXPECT_TRUE(rel_close(ag, ac, tol));
        // sums over the bf16/f32 values actually held
        const Tensor held = f32(ag);
        EXPECT_NEAR(ops::sum(ag), ops::sum(held), 1e-9 * (1 + n));
        EXPECT_NEAR(ops::sum_squares(ag), ops::sum_squares(held), 1e-9 * ops::sum_squares(held) + 1e-12);
      }
  In a = rnd({3}, 1);
  In b = rnd({3}, 2, DType::F32);
  EXPECT_NE(error_of([&] { ops::add_(a.gpu, b.gpu); }).find("[add_scaled_] b must be bf16"), std::string::npos);
  EXPECT_NE(error_of([&] { ops::add_(a.gpu, a.cpu); }).find("[add_scaled_] b must be a CUDA tensor"),
            std::string::npos);
}

TEST(GpuElementwise, SlicesConcat) {
  DSA_REQUIRE_GPU();
  for (DType dt : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(dtype_name(dt));
    In x = rnd({7, 3, 13}, 30, dt);
    for (auto [b0, e0] : std::vector<std::pair<int64_t, int64_t>>{{0, 13}, {2, 9}, {8, 8}, {5, 13}})
      EXPECT_TRUE(rel_close(ops::slice_last(x.gpu, b0, e0), ops::slice_last(x.cpu, b0, e0), 0.0));
    In s = rnd({7, 3, 5}, 31, dt);
    Tensor dg = x.gpu.clone(), dc = x.cpu.clone();
    ops::slice_last_accumulate_(dg, s.gpu, 6);
    ops::slice_last_accumulate_(dc, s.cpu, 6);
    EXPECT_TRUE(rel_close(dg, dc, dt == DType::BF16 ? kBf : kF32));
    EXPECT_TRUE(rel_close(ops::concat_last(x.gpu, s.gpu), ops::concat_last(x.cpu, s.cpu), 0.0));
    In big = rnd({64, 512}, 32, dt), big2 = rnd({64, 64}, 33, dt);  // 16-byte copy units
    EXPECT_TRUE(rel_close(ops::concat_last(big.gpu, big2.gpu), ops::concat_last(big.cpu, big2.cpu), 0.0));
    EXPECT_TRUE(rel_close(ops::slice_last(big.gpu, 64, 320), ops::slice_last(big.cpu, 64, 320), 0.0));
  }
  // int32 copies are bytewise
  Tensor ids = randint({5, 9}, 1, 0, 1000);
  const Tensor sl = ops::slice_last(ids.to(Device::CUDA), 3, 8).to(Device::CPU);
  EXPECT_TRUE(rel_close(sl, ops::slice_last(ids, 3, 8), 0.0));
}

TEST(GpuLayout, NarrowTransposeRepeatSum) {
  DSA_REQUIRE_GPU();
  for (DType dt : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(dtype_name(dt));
    const double tol = dt == DType::BF16 ? kBf : kF32;
    In x = rnd({5, 7, 3, 6}, 40, dt);
    for (int dim = 0; dim < 4; ++dim) {
      const int64_t len = x.cpu.shape()[dim], b0 = len / 3, e0 = len - 1;
      EXPECT_TRUE(rel_close(ops::narrow(x.gpu, dim, b0, e0), ops::narrow(x.cpu, dim, b0, e0), 0.0)) << dim;
      Shape ss = x.cpu.shape();
      ss[dim] = e0 - b0;
      In s = rnd(ss, 41 + dim, dt);
      Tensor dg = x.gpu.clone(), dc = x.cpu.clone();
      ops::narrow_accumulate_(dg, s.gpu, dim, b0);
      ops::narrow_accumulate_(dc, s.cpu, dim, b0);
      EXPECT_TRUE(rel_close(dg, dc, tol)) << dim;
    }
    EXPECT_TRUE(rel_close(ops::transpose01(x.gpu), ops::transpose01(x.cpu), 0.0));
    In big = rnd({33, 16, 64}, 45, dt);
    EXPECT_TRUE(rel_close(ops::transpose01(big.gpu), ops::transpose01(big.cpu), 0.0));
    In r = rnd({9, 1, 13}, 46, dt);
    EXPECT_TRUE(rel_close(ops::repeat_dim1(r.gpu, 4), ops::repeat_dim1(r.cpu, 4), 0.0));
    In q = rnd({9, 5, 13}, 47, dt);
    EXPECT_TRUE(rel_close(ops::sum_dim1(q.gpu), ops::sum_dim1(q.cpu), tol));
  }
}

TEST(GpuCast, CastAndCopyCast) {
  DSA_REQUIRE_GPU();
  Tensor x = randn({1037}, 50, 3.0, DType::F32);
  const Tensor xg = x.to(Device::CUDA);
  const Tensor h = ops::cast(xg, DType::BF16);
  EXPECT_EQ(h.dtype(), DType::BF16);
  const Tensor hc = h.to(Device::CPU), ref = x.to(DType::BF16);
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(hc.data<bf16>()[i].bits, ref.data<bf16>()[i].bits) << i;
  const Tensor back = ops::cast(h, DType::F32);
  EXPECT_TRUE(rel_close(back, ref.to(DType::F32), 0.0));
  EXPECT_TRUE(ops::cast(xg, DType::F32).same_storage(xg));
  Tensor dst = poisoned_gpu({1037}, DType::BF16);
  ops::copy_cast_(dst, xg);
  EXPECT_TRUE(rel_close(dst, ref.to(DType::F32), 0.0));
  Tensor dst32 = poisoned_gpu({1037}, DType::F32);
  ops::copy_cast_(dst32, dst);
  EXPECT_TRUE(rel_close(dst32, ref.to(DType::F32), 0.0));
  Tensor bad = poisoned_gpu({5}, DType::F32);
  EXPECT_NE(error_of([&] { ops::copy_cast_(bad, xg); }).find("[copy_cast_]"), std::string::npos);
}

// ------------------------------------------------------------------------------------- embedding
TEST(GpuEmbedding, ForwardAndDeterministicBackward) {
  DSA_REQUIRE_GPU();
  for (int64_t d : {int64_t(13), int64_t(64)}) {
    SCOPED_TRACE(d);
    const int64_t v = 50, n = 37;
    In table = rnd({v, d}, 60);
    Tensor ids = randint({n}, 61, 0, 12);  // many repeats
    const Tensor idg = ids.to(Device::CUDA);
    EXPECT_TRUE(rel_close(ops::embedding_forward(idg, table.gpu), ops::embedding_forward(ids, table.cpu), 0.0));
    In dy = rnd({n, d}, 62), g0 = rnd({v, d}, 63, DType::F32);
    Tensor gc = g0.cpu.clone(), gg = g0.gpu.clone();
    ops::embedding_backward(dy.cpu, ids, &gc);
    ops::embedding_backward(dy.gpu, idg, &gg);
    EXPECT_TRUE(rel_close(gg, gc, kF32));
    Tensor gg2 = g0.gpu.clone();
    ops::embedding_backward(dy.gpu, idg, &gg2);
    EXPECT_TRUE(rel_close(gg2, gg, 0.0));  // bitwise reproducible
  }
}

// ----------------------------------------------------------------------------------------- norms
TEST(GpuNorms, RmsNormAndLayerNorm) {
  DSA_REQUIRE_GPU();
  for (auto [n, d] : std::vector<std::pair<int64_t, int64_t>>{{7, 13}, {64, 1024}, {300, 384}, {3, 7168}}) {
    SCOPED_TRACE(strcat_("n ", n, " d ", d));
    In x = rnd({n, d}, 70, DType::BF16, 2.0), w = rnd({d}, 71), b = rnd({d}, 72), dy = rnd({n, d}, 73);
    In dw0 = rnd({d}, 74, DType::F32), db0 = rnd({d}, 75, DType::F32);
    {
      Tensor rs_ref, rs = poisoned_gpu({n}, DType::F32);
      const Tensor y_ref = ops::rmsnorm_forward(x.cpu, w.cpu, 1e-6, &rs_ref);
      EXPECT_TRUE(rel_close(ops::rmsnorm_forward(x.gpu, w.gpu, 1e-6, &rs), y_ref, kBf));
      EXPECT_TRUE(rel_close(rs, rs_ref, kF32));
      Tensor dw_ref = dw0.cpu.clone(), dw = dw0.gpu.clone();
      const Tensor dx_ref = ops::rmsnorm_backward(dy.cpu, x.cpu, w.cpu, rs_ref, &dw_ref);
      EXPECT_TRUE(rel_close(ops::rmsnorm_backward(dy.gpu, x.gpu, w.gpu, rs, &dw), dx_ref, kBf));
      EXPECT_TRUE(rel_close(dw, dw_ref, 1e-4));
    }
    {
      Tensor mu_ref, rs_ref, mu = poisoned_gpu({n}, DType::F32), rs = poisoned_gpu({n}, DType::F32);
      const Tensor y_ref = ops::layernorm_forward(x.cpu, w.cpu, b.cpu, 1e-5, &mu_ref, &rs_ref);
      EXPECT_TRUE(rel_close(ops::layernorm_forward(x.gpu, w.gpu, b.gpu, 1e-5, &mu, &rs), y_ref, kBf));
      EXPECT_TRUE(rel_close(mu, mu_ref, 1e-4));
      EXPECT_TRUE(rel_close(rs, rs_ref, kF32));
      Tensor dw_ref = dw0.cpu.clone(), db_ref = db0.cpu.clone(), dw = dw0.gpu.clone(), db = db0.gpu.clone();
      const Tensor dx_ref = ops::layernorm_backward(dy.cpu, x.cpu, w.cpu, mu_ref, rs_ref, &dw_ref, &db_ref);
      EXPECT_TRUE(rel_close(ops::layernorm_backward(dy.gpu, x.gpu, w.gpu, mu, rs, &dw, &db), dx_ref, kBf));
      EXPECT_TRUE(rel_close(dw, dw_ref, 1e-4));
      EXPECT_TRUE(rel_close(db, db_ref, 1e-4));
    }
  }
  In x32 = rnd({4, 8}, 1, DType::F32), w = rnd({8}, 2);
  EXPECT_NE(error_of([&] { ops::rmsnorm_forward(x32.gpu, w.gpu, 1e-6, nullptr); }).find("[rmsnorm] x must be bf16"),
            std::string::npos);
}

// ------------------------------------------------------------------------------------------ rope
TEST(GpuRope, BothStylesForwardBackward) {
  DSA_REQUIRE_GPU();
  struct Case {
    Shape x;
    int64_t offset, half, p;
  };
  // tiny config (head 12, rope 6), bench-small MLA q (nope 64 + rope 32), indexer (64, rope 32), [N, D]
  for (const Case& c : {Case{{7, 3, 12}, 6, 3, 11}, Case{{33, 16, 96}, 64, 16, 40}, Case{{9, 16, 64}, 0, 16, 9},
                        Case{{7, 13}, 3, 5, 8}, Case{{5, 2, 256}, 0, 128, 6}})
    for (ops::RopeStyle st : {ops::RopeStyle::Interleaved, ops::RopeStyle::RotateHalf})
      for (bool bwd : {false, true}) {
        SCOPED_TRACE(strcat_(shape_str(c.x), " style ", static_cast<int>(st), " bwd ", bwd));
        In x = rnd(c.x, 80);
        In cs = rnd({c.p, c.half}, 81, DType::F32), sn = rnd({c.p, c.half}, 82, DType::F32);
        const Tensor pos = randint({c.x[0]}, 83, 0, static_cast<int>(c.p));
        Tensor xc = x.cpu.clone(), xg = x.gpu.clone();
        if (bwd) {
          ops::rope_backward_(xc, pos, cs.cpu, sn.cpu, c.offset, st);
          ops::rope_backward_(xg, pos.to(Device::CUDA), cs.gpu, sn.gpu, c.offset, st);
        } else {
          ops::rope_forward_(xc, pos, cs.cpu, sn.cpu, c.offset, st);
          ops::rope_forward_(xg, pos.to(Device::CUDA), cs.gpu, sn.gpu, c.offset, st);
        }
        EXPECT_TRUE(rel_close(xg, xc, kBf));
      }
}

// ---------------------------------------------------------------------------------------- swiglu
TEST(GpuSwiglu, ForwardBackward) {
  DSA_REQUIRE_GPU();
  for (int64_t off : {int64_t(0), int64_t(1)})
    for (int64_t n : {int64_t(7), int64_t(13), int64_t(512)}) {
      SCOPED_TRACE(strcat_("n ", n, " off ", off));
      In g = rnd({n + off, 13}, 90, DType::BF16, 2.0), u = rnd({n + off, 13}, 91), dy = rnd({n + off, 13}, 92);
      auto cut = [&](const Tensor& t) { return t.view({-1}).slice_rows(off, off + n * 13); };
      EXPECT_TRUE(rel_close(ops::swiglu_forward(cut(g.gpu), cut(u.gpu)),
                            ops::swiglu_forward(cut(g.cpu), cut(u.cpu)), kBf));
      Tensor dgc, duc, dgg = poisoned_gpu({n * 13}, DType::BF16), dug = poisoned_gpu({n * 13}, DType::BF16);
      ops::swiglu_backward(cut(dy.cpu), cut(g.cpu), cut(u.cpu), &dgc, &duc);
      ops::swiglu_backward(cut(dy.gpu), cut(g.gpu), cut(u.gpu), &dgg, &dug);
      EXPECT_TRUE(rel_close(dgg, dgc, kBf));
      EXPECT_TRUE(rel_close(dug, duc, kBf));
    }
}

// --------------------------------------------------------------------------------- cross entropy
void check_ce(int64_t n, int64_t d, int64_t v, uint64_t seed) {
  SCOPED_TRACE(strcat_("n ", n, " d ", d, " v ", v));
  In x = rnd({n, d}, seed, DType::BF16, 1.0), w = rnd({v, d}, seed + 1, DType::BF16, 1.0 / std::sqrt(double(d)));
  Tensor tg = randint({n}, seed + 2, -1, static_cast<int>(v));  // some -1 (ignored)
  In dw0 = rnd({v, d}, seed + 3, DType::F32, 0.01);
  const double gs = 1.0 / static_cast<double>(n);
  Tensor dx_ref, dw_ref = dw0.cpu.clone();
  const ops::CrossEntropyResult r_ref = ops::lm_head_cross_entropy(x.cpu, w.cpu, tg, gs, &dx_ref, &dw_ref);
  Tensor dx = poisoned_gpu({n, d}, DType::BF16), dw = dw0.gpu.clone();
  const ops::CrossEntropyResult r = ops::lm_head_cross_entropy(x.gpu, w.gpu, tg.to(Device::CUDA), gs, &dx, &dw);
  EXPECT_EQ(r.count, r_ref.count);
  EXPECT_NEAR(r.loss_sum, r_ref.loss_sum, 1e-3 * std::fabs(r_ref.loss_sum));
  EXPECT_TRUE(rel_close(dx, dx_ref, kBf));
  // dw = dw0 + update: compare the update itself (dw0 dominates otherwise)
  Tensor upd = f32(dw), upd_ref = dw_ref.clone();
  ops::add_scaled_(upd, dw0.cpu, -1.0);
  ops::add_scaled_(upd_ref, dw0.cpu, -1.0);
  EXPECT_TRUE(rel_close(upd, upd_ref, 2e-2));
  const ops::CrossEntropyResult r_fwd = ops::lm_head_cross_entropy(x.gpu, w.gpu, tg.to(Device::CUDA), gs, nullptr, nullptr);
  EXPECT_EQ(r_fwd.loss_sum, r.loss_sum);  // deterministic, same with and without the backward
}

TEST(GpuCrossEntropy, SmallOdd) {
  DSA_REQUIRE_GPU();
  check_ce(7, 13, 37, 100);
  check_ce(64, 96, 1001, 110);
}

TEST(GpuCrossEntropy, Tokens2048Hidden1024Vocab129280) {  // bench-small's LM head
  DSA_REQUIRE_GPU();
  check_ce(2048, 1024, 129280, 120);  // 4 chunks of 519 rows
}

// ----------------------------------------------------------------------------------------- adamw
// Bitwise by construction: both sides round every operation in the same order (the kernel's _rn
// intrinsics; adamw.cpp compiled with -ffp-contract=off, kernels/CMakeLists.txt), from the same f32
// coefficients computed on the host.
TEST(GpuAdamW, BitwiseEqualToCpu) {
  DSA_REQUIRE_GPU();
  for (double wd : {0.1, 0.0})
    for (int64_t n : {int64_t(1037), int64_t(4096)}) {
      SCOPED_TRACE(strcat_("wd ", wd, " n ", n));
      ops::AdamWConfig cfg;
      cfg.lr = 3e-4;
      cfg.weight_decay = wd;
      Tensor p = randn({n}, 130, 1.0, DType::F32), m = Tensor::zeros({n}, DType::F32), v = m.clone();
      Tensor pg = p.to(Device::CUDA), mg = m.to(Device::CUDA), vg = v.to(Device::CUDA);
      for (int64_t step = 1; step <= 3; ++step) {
        const Tensor g = randn({n}, 131 + step, 1.0, DType::F32);
        ops::adamw_step_(p, g, m, v, cfg, step);
        ops::adamw_step_(pg, g.to(Device::CUDA), mg, vg, cfg, step);
      }
      const Tensor ph = pg.to(Device::CPU), mh = mg.to(Device::CPU), vh = vg.to(Device::CPU);
      int64_t diff = 0;
      for (int64_t i = 0; i < n; ++i)
        diff += ph.data<float>()[i] != p.data<float>()[i] || mh.data<float>()[i] != m.data<float>()[i] ||
                vh.data<float>()[i] != v.data<float>()[i];
      EXPECT_EQ(diff, 0);
    }
}

TEST(GpuAdamW, GlobalNormAndClip) {
  DSA_REQUIRE_GPU();
  std::vector<In> gs;
  for (int i = 0; i < 5; ++i) gs.push_back(rnd({13 + 100 * i, 7}, 140 + i, DType::F32));
  std::vector<const Tensor*> cg, gg;
  std::vector<Tensor*> cm, gm;
  for (In& g : gs) {
    cg.push_back(&g.cpu);
    gg.push_back(&g.gpu);
    cm.push_back(&g.cpu);
    gm.push_back(&g.gpu);
  }
  Tensor undefined;
  gg.push_back(&undefined);
  gg.push_back(nullptr);
  const double norm_ref = ops::global_grad_norm(cg), norm = ops::global_grad_norm(gg);
  EXPECT_NEAR(norm, norm_ref, 1e-12 * norm_ref);
  EXPECT_EQ(ops::global_grad_norm(gg), norm);
  ops::clip_grads_(cm, 1.0, norm_ref);
  ops::clip_grads_(gm, 1.0, norm);
  for (In& g : gs) EXPECT_TRUE(rel_close(g.gpu, g.cpu, kF32));
  EXPECT_NEAR(ops::global_grad_norm(gg), 1.0, 1e-5);
}

}  // namespace
}  // namespace dsa
