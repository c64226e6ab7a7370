#include "trainer/nccl_comm.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "trainer/dist.h"

#if defined(DSA_HAVE_CUDA) && defined(DSA_HAVE_NCCL)
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <thread>

#include "kernels/cuda/context.h"
#include "trainer/expert_parallel.h"

namespace dsa {

namespace {
void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) Dist::abort_job(std::string("[nccl] ") + what + ": " + cudaGetErrorString(e));
}
void nccl_ok(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) Dist::abort_job(std::string("[nccl] ") + what + ": " + ncclGetErrorString(r));
}
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

struct NcclComm::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t comm_stream = nullptr;
  std::mutex mu;
  std::deque<std::pair<cudaEvent_t, double>> pending;  // completion event, launch time
  std::atomic<bool> stop{false};
  std::thread watchdog;
  double timeout_s = 300;

  void watch() {
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess)
        Dist::abort_job(std::string("[nccl] asynchronous error: ") + ncclGetErrorString(async) +
                        " (a peer rank failed or the network broke)");
      std::lock_guard<std::mutex> lock(mu);
      while (!pending.empty()) {
        cudaError_t q = cudaEventQuery(pending.front().first);
        if (q == cudaSuccess) {
          cudaEventDestroy(pending.front().first);
          pending.pop_front();
          continue;
        }
        if (q != cudaErrorNotReady) Dist::abort_job(std::string("[nccl] all-reduce failed: ") + cudaGetErrorString(q));
        if (now_s() - pending.front().second > timeout_s)
          Dist::abort_job("[nccl] an all-reduce has not completed in " + std::to_string(static_cast<int>(timeout_s)) +
                          " s: a peer rank is gone or stuck (DSA_NCCL_TIMEOUT_S sets the bound)");
        break;
      }
    }
  }
};

bool NcclComm::available() { return true; }

NcclComm::NcclComm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {
  cuda_ok(cudaStreamCreateWithFlags(&impl_->comm_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  impl_->watchdog = std::thread([this] { impl_->watch(); });
}

std::unique_ptr<NcclComm> NcclComm::split(int color, int key) {
  auto impl = std::make_unique<Impl>();
  impl->timeout_s = impl_->timeout_s;
  nccl_ok(ncclCommSplit(impl_->comm, color, key, &impl->comm, nullptr), "ncclCommSplit");
  return std::unique_ptr<NcclComm>(new NcclComm(std::move(impl)));
}

namespace {
// Token rows of the MoE layers between the ranks of an expert group.
class NcclExpertParallel : public ExpertParallel {
 public:
  NcclExpertParallel(int ep, std::unique_ptr<NcclComm> group, ncclComm_t comm)
      : counts_(ep), group_(std::move(group)), comm_(comm) {}
  int size() const override { return counts_.size(); }
  int rank() const override { return counts_.rank(); }
  void alltoallv(const void* send, const std::vector<int64_t>& send_rows, void* recv,
                 const std::vector<int64_t>& recv_rows, size_t row_bytes) override {
    const int P = size();
    DSA_CHECK(static_cast<int>(send_rows.size()) == P && static_cast<int>(recv_rows.size()) == P,
              "[expert_parallel] alltoallv needs ", P, " counts per direction");
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    int64_t so = 0, ro = 0;
    nccl_ok(ncclGroupStart(), "ncclGroupStart");
    for (int q = 0; q < P; ++q) {
      if (send_rows[q] > 0)
        nccl_ok(ncclSend(s + so * row_bytes, static_cast<size_t>(send_rows[q]) * row_bytes, ncclInt8, q, comm_,
                         cuda::stream()),
                "ncclSend");
      if (recv_rows[q] > 0)
        nccl_ok(ncclRecv(r + ro * row_bytes, static_cast<size_t>(recv_rows[q]) * row_bytes, ncclInt8, q, comm_,
                         cuda::stream()),
                "ncclRecv");
      so += send_rows[q];
      ro += recv_rows[q];
    }
    nccl_ok(ncclGroupEnd(), "ncclGroupEnd");
  }
  void alltoall(const int64_t* send, int64_t* recv, int64_t n) override { counts_.alltoall(send, recv, n); }

 private:
  MpiExpertParallel counts_;         // row counts: host values over the MPI group communicator
  std::unique_ptr<NcclComm> group_;  // owns comm_
  ncclComm_t comm_;
};
}  // namespace

std::unique_ptr<ExpertParallel> NcclComm::make_expert_parallel(int ep) {
  std::unique_ptr<NcclComm> group = split(Dist::rank() / ep, Dist::rank());
  ncclComm_t c = group->impl_->comm;
  return std::make_unique<NcclExpertParallel>(ep, std::move(group), c);
}

NcclComm::NcclComm() : impl_(std::make_unique<Impl>()) {
  if (const char* t = std::getenv("DSA_NCCL_TIMEOUT_S")) impl_->timeout_s = std::atof(t);
  ncclUniqueId id;
  if (Dist::rank() == 0) nccl_ok(ncclGetUniqueId(&id), "ncclGetUniqueId");
  if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
    Dist::abort_job("[nccl] MPI_Bcast of the NCCL unique id failed");
  nccl_ok(ncclCommInitRank(&impl_->comm, Dist::world(), id, Dist::rank()), "ncclCommInitRank");
  cuda_ok(cudaStreamCreateWithFlags(&impl_->comm_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  impl_->watchdog = std::thread([this] { impl_->watch(); });
}

NcclComm::~NcclComm() {
  impl_->stop.store(true);
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
  cudaStreamSynchronize(impl_->comm_stream);
  for (auto& [e, t] : impl_->pending) cudaEventDestroy(e);
  ncclCommDestroy(impl_->comm);
  cudaStreamDestroy(impl_->comm_stream);
}

void NcclComm::allreduce_async(const std::vector<Tensor*>& tensors) {
  if (tensors.empty()) return;
  cudaEvent_t ready;
  cuda_ok(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventRecord(ready, cuda::stream()), "cudaEventRecord");
  cuda_ok(cudaStreamWaitEvent(impl_->comm_stream, ready, 0), "cudaStreamWaitEvent");
  cudaEventDestroy(ready);
  nccl_ok(ncclGroupStart(), "ncclGroupStart");
  for (Tensor* t : tensors) {
    DSA_CHECK(!t->is_cpu() && t->dtype() == DType::F32, "[nccl] all-reduce needs f32 device tensors, got ",
              t->desc());
    nccl_ok(ncclAllReduce(t->raw(), t->raw(), static_cast<size_t>(t->numel()), ncclFloat, ncclSum, impl_->comm,
                          impl_->comm_stream),
            "ncclAllReduce");
  }
  nccl_ok(ncclGroupEnd(), "ncclGroupEnd");
  cudaEvent_t done;
  cuda_ok(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventRecord(done, impl_->comm_stream), "cudaEventRecord");
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->pending.emplace_back(done, now_s());
}

void NcclComm::wait() {
  cudaEvent_t all;
  cuda_ok(cudaEventCreateWithFlags(&all, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventRecord(all, impl_->comm_stream), "cudaEventRecord");
  cuda_ok(cudaStreamWaitEvent(cuda::stream(), all, 0), "cudaStreamWaitEvent");
  cudaEventDestroy(all);
}

}  // namespace dsa

#else  // no NCCL

namespace dsa {
struct NcclComm::Impl {};
bool NcclComm::available() { return false; }
NcclComm::NcclComm() { fail("[nccl] this build has no NCCL (GPU data parallelism needs CUDA and NCCL)"); }
NcclComm::~NcclComm() = default;
void NcclComm::allreduce_async(const std::vector<Tensor*>&) {}
void NcclComm::wait() {}
NcclComm::NcclComm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
std::unique_ptr<NcclComm> NcclComm::split(int, int) { return nullptr; }
std::unique_ptr<ExpertParallel> NcclComm::make_expert_parallel(int) { return nullptr; }
}  // namespace dsa

#endif
