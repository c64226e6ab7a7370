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
#include <map>
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
  int size = 1, rank = 0;
  int64_t next_mark = 0;
  std::map<int64_t, cudaEvent_t> marks;  // mark() tokens not yet waited for

  // Orders the communication stream after the compute stream's work so far.
  void follow_compute() {
    cudaEvent_t ready;
    cuda_ok(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(ready, cuda::stream()), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(comm_stream, ready, 0), "cudaStreamWaitEvent");
    cudaEventDestroy(ready);
  }
  // Registers the work launched so far on the communication stream with the watchdog.
  void watch_launch() {
    cudaEvent_t done;
    cuda_ok(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(done, comm_stream), "cudaEventRecord");
    std::lock_guard<std::mutex> lock(mu);
    pending.emplace_back(done, now_s());
  }

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
  nccl_ok(ncclCommCount(impl_->comm, &impl_->size), "ncclCommCount");
  nccl_ok(ncclCommUserRank(impl_->comm, &impl_->rank), "ncclCommUserRank");
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
  impl_->size = Dist::world();
  impl_->rank = Dist::rank();
  cuda_ok(cudaStreamCreateWithFlags(&impl_->comm_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  impl_->watchdog = std::thread([this] { impl_->watch(); });
}

NcclComm::~NcclComm() {
  impl_->stop.store(true);
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
  cudaStreamSynchronize(impl_->comm_stream);
  for (auto& [e, t] : impl_->pending) cudaEventDestroy(e);
  for (auto& [m, e] : impl_->marks) cudaEventDestroy(e);
  ncclCommDestroy(impl_->comm);
  cudaStreamDestroy(impl_->comm_stream);
}

void NcclComm::allreduce_async(const std::vector<Tensor*>& tensors) {
  if (tensors.empty()) return;
  impl_->follow_compute();
  nccl_ok(ncclGroupStart(), "ncclGroupStart");
  for (Tensor* t : tensors) {
    DSA_CHECK(!t->is_cpu() && t->dtype() == DType::F32, "[nccl] all-reduce needs f32 device tensors, got ",
              t->desc());
    nccl_ok(ncclAllReduce(t->raw(), t->raw(), static_cast<size_t>(t->numel()), ncclFloat, ncclSum, impl_->comm,
                          impl_->comm_stream),
            "ncclAllReduce");
  }
  nccl_ok(ncclGroupEnd(), "ncclGroupEnd");
  impl_->watch_launch();
}

int NcclComm::size() const { return impl_->size; }
int NcclComm::rank() const { return impl_->rank; }

void NcclComm::reduce_scatter(const Tensor& full, Tensor& chunk) {
  DSA_CHECK(!full.is_cpu() && !chunk.is_cpu() && full.dtype() == DType::F32 && chunk.dtype() == DType::F32 &&
                full.numel() == chunk.numel() * impl_->size,
            "[nccl] reduce-scatter needs f32 device tensors of ", impl_->size, " x the chunk, got ", full.desc(), " -> ",
            chunk.desc());
  impl_->follow_compute();
  nccl_ok(ncclReduceScatter(full.raw(), chunk.raw(), static_cast<size_t>(chunk.numel()), ncclFloat, ncclSum,
                            impl_->comm, impl_->comm_stream),
          "ncclReduceScatter");
  impl_->watch_launch();
}

void NcclComm::allgather(Tensor& flat) {
  const int64_t n = impl_->size;
  DSA_CHECK(!flat.is_cpu() && (flat.dtype() == DType::F32 || flat.dtype() == DType::BF16) && flat.numel() % n == 0,
            "[nccl] all-gather needs an f32 or bf16 device tensor of ", n, " equal chunks, got ", flat.desc());
  const int64_t c = flat.numel() / n;
  const size_t esz = static_cast<size_t>(dtype_size(flat.dtype()));
  impl_->follow_compute();
  // In place: the send buffer is this rank's chunk of the receive buffer.
  char* base = static_cast<char*>(flat.raw());
  nccl_ok(ncclAllGather(base + static_cast<size_t>(impl_->rank) * c * esz, base, static_cast<size_t>(c),
                        flat.dtype() == DType::F32 ? ncclFloat : ncclBfloat16, impl_->comm, impl_->comm_stream),
          "ncclAllGather");
  impl_->watch_launch();
}

int64_t NcclComm::mark() {
  cudaEvent_t e;
  cuda_ok(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventRecord(e, impl_->comm_stream), "cudaEventRecord");
  const int64_t token = impl_->next_mark++;
  impl_->marks[token] = e;
  return token;
}

void NcclComm::wait_for(int64_t token) {
  DSA_CHECK(token >= 0 && token < impl_->next_mark, "[nccl] wait_for: token ", token, " was never handed out");
  auto it = impl_->marks.find(token);
  if (it == impl_->marks.end()) return;  // covered by a later token already waited for
  cuda_ok(cudaStreamWaitEvent(cuda::stream(), it->second, 0), "cudaStreamWaitEvent");
  // Every older token is covered by this one (the communication stream runs in order).
  for (auto e = impl_->marks.begin(); e != std::next(it); ++e) cudaEventDestroy(e->second);
  impl_->marks.erase(impl_->marks.begin(), std::next(it));
}

}  // namespace dsa

#else  // no NCCL

namespace dsa {
struct NcclComm::Impl {};
bool NcclComm::available() { return false; }
NcclComm::NcclComm() { fail("[nccl] this build has no NCCL (GPU data parallelism needs CUDA and NCCL)"); }
NcclComm::~NcclComm() = default;
void NcclComm::allreduce_async(const std::vector<Tensor*>&) {}
int NcclComm::size() const { return 1; }
int NcclComm::rank() const { return 0; }
void NcclComm::reduce_scatter(const Tensor&, Tensor&) {}
void NcclComm::allgather(Tensor&) {}
int64_t NcclComm::mark() { return 0; }
void NcclComm::wait_for(int64_t) {}
NcclComm::NcclComm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
std::unique_ptr<NcclComm> NcclComm::split(int, int) { return nullptr; }
std::unique_ptr<ExpertParallel> NcclComm::make_expert_parallel(int) { return nullptr; }
}  // namespace dsa

#endif
