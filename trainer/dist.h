// Process group: MPI for launch, bootstrap and CPU collectives (NCCL joins for GPU tensors).
// Every rank runs the same program; rank 0 logs and writes checkpoints. A rank that fails calls
// abort_job(), which ends every rank through MPI_Abort instead of leaving the others waiting.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsa {

class Dist {
 public:
  static void init(int* argc, char*** argv);  // idempotent; also works without mpirun (world 1)
  static void finalize();
  static int rank();
  static int world();
  static int local_rank();  // rank among the processes of this node (GPU index)
  static int local_size();  // processes on this node
  static bool is_root() { return rank() == 0; }

  static void allreduce_sum(float* data, int64_t n);
  static void allreduce_sum(double* data, int64_t n);
  static void allreduce_sum(int64_t* data, int64_t n);
  static double allreduce_max(double v);
  static void barrier();
  // Every rank's string, in rank order (on every rank).
  static std::vector<std::string> allgather(const std::string& s);
  // Root's string on every rank.
  static std::string broadcast(const std::string& s);
  // Ends the whole job with a message naming this rank. Never returns.
  [[noreturn]] static void abort_job(const std::string& message, int code = 1);
};

}  // namespace dsa
