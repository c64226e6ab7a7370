// The collectives data parallelism and ZeRO run over one replica set (the ranks that hold copies of
// the same tensors: every rank, or the replicas of one expert slice). Two transports implement it:
// MPI on the CPU backend (trainer/data_parallel.cpp; synchronous) and NCCL on the GPU
// (trainer/nccl_comm.h; asynchronous on a communication stream, each call ordered after the work
// queued so far on the compute stream).
#pragma once

#include <cstdint>

#include "kernels/tensor.h"

namespace dsa {

class ReplicaComm {
 public:
  virtual ~ReplicaComm() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // Sum over the set, in place. flat: f32.
  virtual void allreduce(Tensor& flat) = 0;
  // full [size * c] f32 -> chunk [c]: the sum over the set of elements [rank * c, (rank + 1) * c).
  virtual void reduce_scatter(const Tensor& full, Tensor& chunk) = 0;
  // flat [size * c] (f32 or bf16): every member's chunk [r * c, (r + 1) * c) to every member, in place.
  virtual void allgather(Tensor& flat) = 0;
  // A token for the collectives launched so far; wait_for(token) makes later compute work (and the
  // host's reuse of their buffers) follow them. wait() is wait_for(mark()). No-ops where synchronous.
  virtual int64_t mark() = 0;
  virtual void wait_for(int64_t token) = 0;
  void wait() { wait_for(mark()); }
};

}  // namespace dsa
