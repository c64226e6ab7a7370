// Expert parallelism as the MoE layer sees it: a group of P ranks among which the routed experts are
// split in consecutive slices (group rank r owns experts [r*E/P, (r+1)*E/P)). The transport is
// abstract (model/ knows nothing of MPI); trainer/expert_parallel.h implements it over MPI.
//
// Forward of one MoE layer with P > 1 (every rank routes its own tokens):
//   xp [M, D]  local rows sorted by expert  --alltoallv-->  rows for my experts, by source rank
//   reorder to expert-major, grouped GEMMs on my expert slices, reorder back  --alltoallv-->  yp [M, D]
// The backward sends dyp the same way, runs the grouped GEMM backwards (accumulating into my slices of
// the expert gradients only) and returns dxp along the reverse path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/ops.h"

namespace dsa {

struct ExpertParallel {
  virtual ~ExpertParallel() = default;
  virtual int size() const = 0;  // ranks in the expert-parallel group
  virtual int rank() const = 0;  // this rank's place in the group
  // send_rows[q] rows (row_bytes each, consecutive in send, ordered by q) go to group rank q; recv gets
  // recv_rows[q] rows from rank q, ordered by q. Collective over the group. The buffers live where the
  // model's tensors live (host memory for the MPI transport, device memory for NCCL).
  virtual void alltoallv(const void* send, const std::vector<int64_t>& send_rows, void* recv,
                         const std::vector<int64_t>& recv_rows, size_t row_bytes) = 0;
  // send [size*n]: n values for each rank; recv [size*n]: n values from each rank.
  virtual void alltoall(const int64_t* send, int64_t* recv, int64_t n) = 0;
};

// One MoE layer's exchange with the group, kept for the backward.
struct EpPlan {
  int64_t e0 = 0, e1 = 0;              // my experts [e0, e1)
  std::vector<int64_t> send_rows;      // [P] rows of xp sent to each rank
  std::vector<int64_t> recv_rows;      // [P] rows received from each rank
  std::vector<int64_t> gather;         // [R] expert-major row i = source-major received row gather[i]
  ops::MoePermutation local;           // [e1-e0] experts over the R received rows, expert-major
};

struct EpCache {
  EpPlan plan;
  Tensor xe;  // [R, D]   received rows, expert-major
  Tensor gu;  // [R, 2I]
  Tensor h;   // [R, I]
};

// Routed-expert part of the MoE under expert parallelism: yp [M, D] for xp [M, D] sorted by expert
// under perm (counts over all E experts). gate_up [E/P, 2I, D] and down [E/P, D, I] are this rank's
// experts [e0, e1) only: a rank holds (and trains) nothing of the other ranks' experts.
Tensor ep_experts_forward(ExpertParallel& ep, const Tensor& xp, const ops::MoePermutation& perm,
                          const Tensor& gate_up, const Tensor& down, int64_t moe_I, EpCache& c);
// dxp [M, D] for dyp [M, D]; gradients accumulate into dgate_up [E/P, 2I, D] and ddown [E/P, D, I].
Tensor ep_experts_backward(ExpertParallel& ep, const Tensor& dyp, const Tensor& gate_up, const Tensor& down,
                           int64_t moe_I, const EpCache& c, Tensor& dgate_up, Tensor& ddown);

}  // namespace dsa
