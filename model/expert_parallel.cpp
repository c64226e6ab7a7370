// Routed experts split over an expert-parallel group (see expert_parallel.h): token rows travel to the
// rank owning their expert and back by all-to-all.
#include "model/expert_parallel.h"


namespace dsa {

namespace {

size_t row_bytes_of(const Tensor& t) { return static_cast<size_t>(t.size(1)) * dtype_size(t.dtype()); }

// dst row i = src row idx[i], on the rows' device (moe_permute with one slot per row is that gather).
Tensor gather_rows(const Tensor& src, const std::vector<int64_t>& idx) {
  const int64_t R = static_cast<int64_t>(idx.size());
  if (R == 0) return Tensor::empty({0, src.size(1)}, src.dtype(), src.device());
  std::vector<int32_t> rows(idx.begin(), idx.end());
  ops::MoePermutation p;
  p.rows = Tensor::from_vector(rows, {R}).to(src.device());
  p.counts = {R};
  p.offsets = {0, R};
  return ops::moe_permute(src, p, 1);
}

// dst row idx[i] = src row i: the gather by the inverse permutation.
Tensor scatter_rows(const Tensor& src, const std::vector<int64_t>& idx) {
  std::vector<int64_t> inv(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) inv[static_cast<size_t>(idx[i])] = static_cast<int64_t>(i);
  return gather_rows(src, inv);
}

int64_t total(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

Tensor exchange(ExpertParallel& ep, const Tensor& rows, const std::vector<int64_t>& send_rows,
                const std::vector<int64_t>& recv_rows) {
  Tensor out = Tensor::empty({total(recv_rows), rows.size(1)}, rows.dtype(), rows.device());
  ep.alltoallv(rows.raw(), send_rows, out.raw(), recv_rows, row_bytes_of(rows));
  return out;
}

}  // namespace

Tensor ep_experts_forward(ExpertParallel& ep, const Tensor& xp, const ops::MoePermutation& perm,
                          const Tensor& gate_up, const Tensor& down, int64_t moe_I, EpCache& c) {
  const char* op = "ep_experts_forward";
  const int P = ep.size(), me = ep.rank();
  const int64_t E = static_cast<int64_t>(perm.counts.size());
  DSA_CHECK(P > 0 && E % P == 0, "[", op, "] ", E, " experts do not split over ", P, " ranks");
  const int64_t El = E / P;
  DSA_CHECK(gate_up.size(0) == El && down.size(0) == El, "[", op, "] this rank's expert tensors must hold ", El,
            " of the ", E, " experts, got gate_up ", gate_up.desc(), ", down ", down.desc());
  EpPlan& pl = c.plan;
  pl = EpPlan{};
  pl.e0 = me * El;
  pl.e1 = pl.e0 + El;
  // Row counts per (rank, expert): what I send is my permutation's counts, sliced by owner.
  std::vector<int64_t> recv_counts(static_cast<size_t>(P * El));  // [P, El] from source s for my expert j
  ep.alltoall(perm.counts.data(), recv_counts.data(), El);
  pl.send_rows.assign(P, 0);
  pl.recv_rows.assign(P, 0);
  for (int q = 0; q < P; ++q)
    for (int64_t j = 0; j < El; ++j) {
      pl.send_rows[q] += perm.counts[q * El + j];
      pl.recv_rows[q] += recv_counts[q * El + j];
    }
  // Received rows are source-major (then expert); the grouped GEMM wants expert-major (then source).
  std::vector<int64_t> src_off(static_cast<size_t>(P * El));
  int64_t off = 0;
  for (int64_t i = 0; i < P * El; ++i) {
    src_off[i] = off;
    off += recv_counts[i];
  }
  const int64_t R = off;
  pl.gather.reserve(static_cast<size_t>(R));
  pl.local.counts.assign(El, 0);
  pl.local.offsets.assign(El + 1, 0);
  for (int64_t j = 0; j < El; ++j) {
    for (int s = 0; s < P; ++s)
      for (int64_t k = 0; k < recv_counts[s * El + j]; ++k) pl.gather.push_back(src_off[s * El + j] + k);
    pl.local.counts[j] = static_cast<int64_t>(pl.gather.size()) - pl.local.offsets[j];
    pl.local.offsets[j + 1] = static_cast<int64_t>(pl.gather.size());
  }
  // The grouped GEMMs read counts and offsets only; rows is the identity over the R local rows.
  Tensor identity = Tensor::empty({R}, DType::I32);
  for (int64_t i = 0; i < R; ++i) identity.data<int32_t>()[i] = static_cast<int32_t>(i);
  pl.local.rows = identity.to(xp.device());

  Tensor xr = exchange(ep, xp, pl.send_rows, pl.recv_rows);
  c.xe = gather_rows(xr, pl.gather);
  c.gu = ops::grouped_linear_forward(c.xe, gate_up, pl.local);
  c.h = ops::swiglu_forward(ops::slice_last(c.gu, 0, moe_I), ops::slice_last(c.gu, moe_I, 2 * moe_I));
  Tensor ye = ops::grouped_linear_forward(c.h, down, pl.local);
  return exchange(ep, scatter_rows(ye, pl.gather), pl.recv_rows, pl.send_rows);
}

Tensor ep_experts_backward(ExpertParallel& ep, const Tensor& dyp, const Tensor& gate_up, const Tensor& down,
                           int64_t moe_I, const EpCache& c, Tensor& dgate_up, Tensor& ddown) {
  const EpPlan& pl = c.plan;
  Tensor dye = gather_rows(exchange(ep, dyp, pl.send_rows, pl.recv_rows), pl.gather);
  Tensor dh = ops::grouped_linear_backward(dye, c.h, down, pl.local, &ddown);
  Tensor dgate, dup;
  ops::swiglu_backward(dh, ops::slice_last(c.gu, 0, moe_I), ops::slice_last(c.gu, moe_I, 2 * moe_I), &dgate, &dup);
  Tensor dgu = ops::concat_last(dgate, dup);
  Tensor dxe = ops::grouped_linear_backward(dgu, c.xe, gate_up, pl.local, &dgate_up);
  return exchange(ep, scatter_rows(dxe, pl.gather), pl.recv_rows, pl.send_rows);
}

}  // namespace dsa
