// The MPI side of expert parallelism (model/expert_parallel.h): the expert-parallel group of a rank is
// `ep` consecutive world ranks, [rank/ep*ep, rank/ep*ep + ep); its place in the group is rank % ep.
#pragma once

#include <memory>

#include "model/expert_parallel.h"

namespace dsa {

class MpiExpertParallel : public ExpertParallel {
 public:
  explicit MpiExpertParallel(int ep);  // collective over the world; ep divides the world size
  ~MpiExpertParallel() override;
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void alltoallv(const void* send, const std::vector<int64_t>& send_rows, void* recv,
                 const std::vector<int64_t>& recv_rows, size_t row_bytes) override;
  void alltoall(const int64_t* send, int64_t* recv, int64_t n) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int size_ = 1, rank_ = 0;
};

}  // namespace dsa
