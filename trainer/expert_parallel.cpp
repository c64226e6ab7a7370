#include "trainer/expert_parallel.h"

#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels/tensor.h"
#include "trainer/dist.h"

namespace dsa {

struct MpiExpertParallel::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
};

namespace {
void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) Dist::abort_job(std::string("[expert_parallel] MPI call failed: ") + what);
}
}  // namespace

MpiExpertParallel::MpiExpertParallel(int ep) : impl_(std::make_unique<Impl>()) {
  const int world = Dist::world(), rank = Dist::rank();
  DSA_CHECK(ep >= 1 && world % ep == 0, "[expert_parallel] parallelism.ep = ", ep, " does not divide the ", world,
            " ranks of the job");
  size_ = ep;
  rank_ = rank % ep;
  if (world > 1) {
    check(MPI_Comm_split(MPI_COMM_WORLD, rank / ep, rank, &impl_->comm), "MPI_Comm_split");
    MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN);
  }
}

MpiExpertParallel::~MpiExpertParallel() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (impl_->comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&impl_->comm);
}

void MpiExpertParallel::alltoallv(const void* send, const std::vector<int64_t>& send_rows, void* recv,
                                  const std::vector<int64_t>& recv_rows, size_t row_bytes) {
  DSA_CHECK(static_cast<int>(send_rows.size()) == size_ && static_cast<int>(recv_rows.size()) == size_,
            "[expert_parallel] alltoallv needs ", size_, " counts per direction");
  if (size_ == 1) {
    if (send_rows[0] > 0) std::memcpy(recv, send, static_cast<size_t>(send_rows[0]) * row_bytes);
    return;
  }
  // NOTES: one row is one contiguous MPI datatype, so counts and displacements are rows (int) and a
  // layer's exchange can pass 2^31 bytes.
  MPI_Datatype row;
  check(MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &row), "MPI_Type_contiguous");
  check(MPI_Type_commit(&row), "MPI_Type_commit");
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t so = 0, ro = 0;
  for (int q = 0; q < size_; ++q) {
    DSA_CHECK(so + send_rows[q] <= std::numeric_limits<int>::max() && ro + recv_rows[q] <= std::numeric_limits<int>::max(),
              "[expert_parallel] alltoallv: more than 2^31 rows");
    sc[q] = static_cast<int>(send_rows[q]);
    sd[q] = static_cast<int>(so);
    rc[q] = static_cast<int>(recv_rows[q]);
    rd[q] = static_cast<int>(ro);
    so += send_rows[q];
    ro += recv_rows[q];
  }
  check(MPI_Alltoallv(send, sc.data(), sd.data(), row, recv, rc.data(), rd.data(), row, impl_->comm),
        "MPI_Alltoallv");
  MPI_Type_free(&row);
}

void MpiExpertParallel::alltoall(const int64_t* send, int64_t* recv, int64_t n) {
  if (size_ == 1) {
    std::copy(send, send + n, recv);
    return;
  }
  check(MPI_Alltoall(send, static_cast<int>(n), MPI_INT64_T, recv, static_cast<int>(n), MPI_INT64_T, impl_->comm),
        "MPI_Alltoall");
}

}  // namespace dsa
