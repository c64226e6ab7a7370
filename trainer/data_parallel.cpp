#include "trainer/data_parallel.h"

#include "trainer/nccl_comm.h"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "trainer/checkpoint_sharded.h"
#include "trainer/dist.h"
#include "trainer/expert_parallel.h"
#include "trainer/replica_comm.h"
#include "trainer/zero.h"

namespace fs = std::filesystem;

namespace dsa {

namespace {

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) Dist::abort_job(std::string("[data_parallel] MPI call failed: ") + what);
}

uint64_t fnv1a(const std::string& s, uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string hex(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

struct Segment {
  float* p;
  int64_t n;
};

// Sums segments over comm through one reusable flat buffer of at most cap floats.
void bucket_allreduce(MPI_Comm comm, const std::vector<Segment>& segs, int64_t cap) {
  int64_t total = 0;
  for (const Segment& s : segs) total += s.n;
  if (total == 0) return;
  std::vector<float> buf(static_cast<size_t>(std::min(cap, total)));
  // Pending pieces of the current bucket: (segment, offset in it, length).
  struct Piece {
    size_t seg;
    int64_t off, n;
  };
  std::vector<Piece> pieces;
  int64_t fill = 0;
  auto flush = [&] {
    if (fill == 0) return;
    check(MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(fill), MPI_FLOAT, MPI_SUM, comm), "MPI_Allreduce");
    int64_t at = 0;
    for (const Piece& pc : pieces) {
      std::copy(buf.data() + at, buf.data() + at + pc.n, segs[pc.seg].p + pc.off);
      at += pc.n;
    }
    pieces.clear();
    fill = 0;
  };
  for (size_t i = 0; i < segs.size(); ++i) {
    int64_t off = 0;
    while (off < segs[i].n) {
      const int64_t n = std::min(segs[i].n - off, static_cast<int64_t>(buf.size()) - fill);
      std::copy(segs[i].p + off, segs[i].p + off + n, buf.data() + fill);
      pieces.push_back({i, off, n});
      fill += n;
      off += n;
      if (fill == static_cast<int64_t>(buf.size())) flush();
    }
  }
  flush();
}

// The CPU transport of ZeRO: MPI collectives over one communicator, synchronous. MPI_COMM_NULL stands
// for a set of one rank (a job without mpirun need not initialize MPI).
class MpiReplicaComm : public ReplicaComm {
 public:
  explicit MpiReplicaComm(MPI_Comm comm) : comm_(comm) {
    if (comm == MPI_COMM_NULL) return;
    MPI_Comm_size(comm, &size_);
    MPI_Comm_rank(comm, &rank_);
  }
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void allreduce(Tensor& flat) override {
    if (size_ == 1) return;
    float* p = host_f32(flat, "all-reduce");
    for (int64_t off = 0; off < flat.numel(); off += kMaxCount) {
      const int n = static_cast<int>(std::min(kMaxCount, flat.numel() - off));
      check(MPI_Allreduce(MPI_IN_PLACE, p + off, n, MPI_FLOAT, MPI_SUM, comm_), "MPI_Allreduce");
    }
  }
  void reduce_scatter(const Tensor& full, Tensor& chunk) override {
    DSA_CHECK(full.numel() == chunk.numel() * size_ && chunk.numel() < kMaxCount, "[data_parallel] reduce-scatter of ",
              full.desc(), " into ", chunk.desc(), " over ", size_, " ranks");
    if (size_ == 1) return chunk.copy_from(full);
    check(MPI_Reduce_scatter_block(host_f32(full, "reduce-scatter"), host_f32(chunk, "reduce-scatter"),
                                   static_cast<int>(chunk.numel()), MPI_FLOAT, MPI_SUM, comm_),
          "MPI_Reduce_scatter_block");
  }
  void allgather(Tensor& flat) override {
    const int64_t c = flat.numel() / size_;
    DSA_CHECK(flat.numel() == c * size_ && c < kMaxCount, "[data_parallel] all-gather of ", flat.desc(), " over ",
              size_, " ranks");
    if (size_ == 1) return;
    check(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, host_f32(flat, "all-gather"), static_cast<int>(c),
                        MPI_FLOAT, comm_),
          "MPI_Allgather");
  }
  int64_t mark() override { return 0; }
  void wait_for(int64_t) override {}

 private:
  static constexpr int64_t kMaxCount = (1ll << 31) - 1;
  static float* host_f32(const Tensor& t, const char* what) {
    DSA_CHECK(t.is_cpu() && t.dtype() == DType::F32, "[data_parallel] MPI ", what, " needs f32 host tensors, got ",
              t.desc());
    return const_cast<float*>(t.data<float>());
  }
  MPI_Comm comm_;
  int size_ = 1, rank_ = 0;
};

// Elements per row of a tensor's full shape (a 1-D tensor's row is one element).
int64_t row_size(const Param& p) {
  return p.full_shape.empty() || p.full_shape[0] == 0 ? 1 : shape_numel(p.full_shape) / p.full_shape[0];
}

}  // namespace

struct DataParallel::Comms {
  MPI_Comm replicas = MPI_COMM_NULL;  // ranks holding the same expert slice (rank % ep equal)
  MPI_Comm group = MPI_COMM_NULL;     // the expert-parallel group (rank / ep equal)
  int n_replicas = 1;
};

std::string directory_fingerprint(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "missing";
  std::vector<std::string> entries;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec))
    if (e.is_regular_file()) entries.push_back(fs::relative(e.path(), dir).string() + ":" + std::to_string(e.file_size()));
  std::sort(entries.begin(), entries.end());
  uint64_t h = fnv1a("");
  for (const std::string& s : entries) h = fnv1a(s + "\n", h);
  return hex(h);
}

ParamLayout DataParallel::param_layout(const Recipe& recipe, Device device) {
  const int world = Dist::world(), rank = Dist::rank();
  const int64_t ep = recipe.parallel.ep, E = recipe.model.n_routed_experts;
  DSA_CHECK(recipe.parallel.dp == 0 || recipe.parallel.dp == world, "[data_parallel] parallelism.dp = ",
            recipe.parallel.dp, " but the job has ", world,
            " ranks (dp is 0 or the world size: every rank is data-parallel, expert groups sit inside)");
  DSA_CHECK(world % ep == 0, "[data_parallel] parallelism.ep = ", ep, " does not divide the ", world,
            " ranks of the job");
  DSA_CHECK(E == 0 || E % ep == 0, "[data_parallel] parallelism.ep = ", ep, " does not divide n_routed_experts = ", E);
  ParamLayout l;
  if (ep > 1) {
    l.expert_begin = E / ep * (rank % ep);
    l.expert_end = l.expert_begin + E / ep;
  }
  l.external_storage = recipe.parallel.zero > 0;
  (void)device;
  return l;
}

DataParallel::DataParallel(const Recipe& recipe, Model& model) : model_(model), comms_(std::make_unique<Comms>()) {
  const ParamLayout layout = param_layout(recipe, model.device());
  world_ = Dist::world();
  rank_ = Dist::rank();
  ep_ = static_cast<int>(recipe.parallel.ep);
  zero_level_ = static_cast<int>(recipe.parallel.zero);
  overlap_ = recipe.parallel.overlap;
  const int64_t E = recipe.model.n_routed_experts;
  e0_ = ep_ > 1 ? layout.expert_begin : 0;
  e1_ = ep_ > 1 ? layout.expert_end : E;
  if (world_ > 1) {
    check(MPI_Comm_split(MPI_COMM_WORLD, rank_ % ep_, rank_, &comms_->replicas), "MPI_Comm_split");
    check(MPI_Comm_split(MPI_COMM_WORLD, rank_ / ep_, rank_, &comms_->group), "MPI_Comm_split");
    MPI_Comm_set_errhandler(comms_->replicas, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(comms_->group, MPI_ERRORS_RETURN);
    MPI_Comm_size(comms_->replicas, &comms_->n_replicas);
  }
  const bool gpu = model.device() == Device::CUDA;
  if (gpu && (world_ > 1 || zero_level_ > 0)) {
    nccl_ = std::make_unique<NcclComm>();
    if (ep_ > 1) nccl_replicas_ = nccl_->split(rank_ % ep_, rank_);
  }
  if (zero_level_ > 0) {
    ReplicaComm* all = nccl_.get();
    ReplicaComm* experts = nccl_replicas_.get();
    if (!gpu) {
      mpi_all_ = std::make_unique<MpiReplicaComm>(world_ > 1 ? MPI_COMM_WORLD : MPI_COMM_NULL);
      all = mpi_all_.get();
      if (ep_ > 1) {
        mpi_replicas_ = std::make_unique<MpiReplicaComm>(world_ > 1 ? comms_->replicas : MPI_COMM_NULL);
        experts = mpi_replicas_.get();
      }
    }
    zero_ = std::make_unique<ZeroState>(zero_level_, model.params(), model.device(), *all, experts);
  }
  if (zero_ || (nccl_ && world_ > 1)) model.set_grad_ready_hook([this](int64_t group) { on_grads_ready(group); });
  if (ep_ > 1) {
    if (nccl_)
      expert_ = nccl_->make_expert_parallel(ep_);
    else
      expert_ = std::make_unique<MpiExpertParallel>(ep_);
    model.set_expert_parallel(expert_.get());
  }
  if (Dist::is_root() && (world_ > 1 || zero_))
    std::printf("[dist] %d rank%s: data parallel over all, expert groups of %d (%lld routed experts per rank), "
                "gradient buckets of %lld MiB%s\n", world_, world_ > 1 ? "s" : "", ep_,
                static_cast<long long>(e1_ - e0_), static_cast<long long>(kBucketBytes >> 20),
                zero_level_ == 1   ? ", ZeRO-1 optimizer shards (AdamW moments and fp32 master weights)"
                : zero_level_ == 2 ? ", ZeRO-2 shards (gradients, AdamW moments and fp32 master weights)"
                                   : "");
}

DataParallel::~DataParallel() {
  model_.set_grad_ready_hook(nullptr);
  zero_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (comms_->replicas != MPI_COMM_NULL) MPI_Comm_free(&comms_->replicas);
  if (comms_->group != MPI_COMM_NULL) MPI_Comm_free(&comms_->group);
}

void DataParallel::check_agreement(const Recipe& recipe) const {
  if (world_ == 1) return;
  std::string data;
  for (const std::string& d : recipe.data.shards) data += directory_fingerprint(d) + ";";
  const std::string recipe_hash = hex(fnv1a(recipe.resolved_yaml));
  const std::string data_hash = hex(fnv1a(data));
  const std::vector<std::string> all = Dist::allgather(recipe_hash + " " + data_hash);
  std::ostringstream msg;
  std::vector<int> bad_recipe, bad_data;
  for (int r = 1; r < world_; ++r) {
    if (all[r].substr(0, 16) != all[0].substr(0, 16)) bad_recipe.push_back(r);
    if (all[r].substr(17) != all[0].substr(17)) bad_data.push_back(r);
  }
  if (bad_recipe.empty() && bad_data.empty()) return;
  msg << "[data_parallel] ranks disagree at start:";
  auto list = [&](const std::vector<int>& v, const char* what) {
    if (v.empty()) return;
    msg << " the " << what << " of rank" << (v.size() > 1 ? "s" : "");
    for (size_t i = 0; i < v.size(); ++i) msg << (i ? ", " : " ") << v[i];
    msg << " differ" << (v.size() > 1 ? "" : "s") << " from rank 0's;";
  };
  list(bad_recipe, "resolved recipe (model included)");
  list(bad_data, "data directory (file names and sizes)");
  msg << " every rank must run the same recipe, overrides and data";
  // Rank 0 ends the job; the others wait for it (MPI_Abort ends them).
  if (rank_ != 0) Dist::barrier();
  Dist::abort_job(msg.str());
}

// ---------------------------------------------------------------------------------------- state

void DataParallel::assign(Param& p, const Tensor& host) {
  if (zero_ && p.group != ParamGroup::Buffer) {
    zero_->set_value(p, host);
    return;
  }
  p.value.copy_from(host.dtype() == p.value.dtype() ? host : host.to(p.value.dtype()));
}

void DataParallel::init_params(uint64_t seed) {
  for (Param& p : model_.params().all()) assign(p, initial_value(p, model_.config(), seed, DType::F32));
  model_.params().refresh_compute();
}

void DataParallel::load_params(const std::string& checkpoint, TrainState* state) {
  CheckpointSource src(checkpoint);
  ParamStore& ps = model_.params();
  for (Param& p : ps.all()) {
    const std::string key = "params/" + p.name;
    DSA_CHECK(src.has(key), "[checkpoint] ", src.path(), ": missing tensor '", p.name, "' (", shape_str(p.full_shape),
              ")");
    DSA_CHECK(src.shape(key) == p.full_shape, "[checkpoint] ", src.path(), ": tensor '", p.name, "' has shape ",
              shape_str(src.shape(key)), " but the model config needs ", shape_str(p.full_shape));
    const int64_t rs = row_size(p), begin = p.row0 * rs;
    assign(p, src.read(key, begin, begin + shape_numel(p.shape)).view(p.shape));
  }
  for (const std::string& key : src.keys())
    DSA_CHECK(key.rfind("params/", 0) != 0 || ps.has(key.substr(7)), "[checkpoint] ", src.path(), ": tensor '",
              key.substr(7), "' is not a parameter of the model");
  ps.refresh_compute();
  if (state) *state = src.state();
}

std::string DataParallel::save(const std::string& dir, const TrainState& state,
                               const std::map<std::string, Tensor>& moments, int keep_last) {
  ParamStore& ps = model_.params();
  if (!sharded_checkpoints()) {
    // Every rank holds everything: rank 0 writes one file.
    std::string path;
    if (Dist::is_root()) path = save_checkpoint(dir, state, ps, moments, keep_last);
    return Dist::broadcast(path);
  }
  std::vector<StatePiece> mine;
  if (zero_) mine = zero_->pieces(Dist::is_root());
  for (Param& p : ps.all()) {
    if (zero_ && p.group != ParamGroup::Buffer) continue;  // in the shards
    // Expert slices are written by their first replica (ranks [0, ep)), everything else by rank 0.
    const bool expert = ep_ > 1 && is_routed_expert(p.name);
    if (expert ? rank_ >= ep_ : !Dist::is_root()) continue;
    const int64_t begin = p.row0 * row_size(p);
    mine.push_back({"params/" + p.name, p.full_shape, param_group_name(p.group), begin, p.value.view({-1})});
    for (const char* kind : {"optim/m/", "optim/v/"}) {
      auto it = moments.find(kind + p.name);
      if (it != moments.end()) mine.push_back({it->first, p.full_shape, "", begin, it->second.view({-1})});
    }
  }
  return save_sharded_checkpoint(dir, state, mine, keep_last);
}

void DataParallel::begin_stage(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments,
                               const std::string& resume_from) {
  std::unique_ptr<CheckpointSource> src;
  if (!resume_from.empty()) src = std::make_unique<CheckpointSource>(resume_from);
  moments.clear();
  if (zero_) {
    zero_->begin_stage(trained, src.get());
    return;
  }
  for (Param* p : trained)
    for (const char* kind : {"optim/m/", "optim/v/"}) {
      const std::string key = kind + p->name;
      Tensor t = Tensor::zeros(p->shape, DType::F32, model_.device());
      if (src && src->has(key)) {
        const int64_t begin = p->row0 * row_size(*p);
        t.copy_from(src->read(key, begin, begin + t.numel()).view(p->shape));
      }
      moments[key] = t;
    }
}

// ---------------------------------------------------------------------------------------- gradients

void DataParallel::arm_overlap(const std::vector<Param*>& trained, bool last) {
  if (zero_) {
    // ZeRO-2 reduces every micro-batch: the previous one's reductions finish before this one starts.
    if (armed_ && !armed_last_) zero_->finish_micro_batch(false);
    armed_ = true;
    armed_last_ = last;
    return;
  }
  if (!nccl_ || world_ == 1 || !last) return;
  armed_ = true;
  armed_last_ = true;
  armed_params_ = trained;
  reduced_.assign(trained.size(), false);
}

void DataParallel::on_grads_ready(int64_t group) {
  if (!armed_ || !overlap_) return;  // without overlap, finish_micro_batch / allreduce_grads reduce it all
  if (zero_) {
    zero_->reduce_group(group, armed_last_);
    return;
  }
  std::vector<Param*> ready;
  for (size_t i = 0; i < armed_params_.size(); ++i) {
    if (reduced_[i] || Model::grad_group(armed_params_[i]->name) != group) continue;
    reduced_[i] = true;
    ready.push_back(armed_params_[i]);
  }
  nccl_reduce(ready);
}

// Non-expert gradients over every rank; expert slices over their replicas only.
void DataParallel::nccl_reduce(const std::vector<Param*>& params) {
  std::vector<Tensor*> all, experts;
  for (Param* p : params) (ep_ > 1 && is_routed_expert(p->name) ? experts : all).push_back(&p->grad);
  nccl_->allreduce_async(all);
  if (comms_->n_replicas > 1) nccl_replicas_->allreduce_async(experts);
}

void DataParallel::allreduce_grads(const std::vector<Param*>& trained) {
  if (zero_) {
    zero_->finish_micro_batch(true);
    armed_ = false;
    return;
  }
  if (world_ == 1) return;
  if (nccl_) {
    std::vector<Param*> rest;
    for (size_t i = 0; i < trained.size(); ++i) {
      const bool done = armed_ && i < reduced_.size() && armed_params_[i] == trained[i] && reduced_[i];
      if (!done) rest.push_back(trained[i]);
    }
    nccl_reduce(rest);
    nccl_->wait();
    if (nccl_replicas_) nccl_replicas_->wait();
    armed_ = false;
    return;
  }
  std::vector<Segment> all, experts;
  for (Param* p : trained) {
    DSA_CHECK(p->grad.is_cpu() && p->grad.dtype() == DType::F32, "[data_parallel] CPU all-reduce needs f32 host "
              "gradients, got ", p->name, " ", p->grad.desc());
    (ep_ > 1 && is_routed_expert(p->name) ? experts : all).push_back({p->grad.data<float>(), p->grad.numel()});
  }
  const int64_t cap = kBucketBytes / static_cast<int64_t>(sizeof(float));
  bucket_allreduce(MPI_COMM_WORLD, all, cap);
  if (comms_->n_replicas > 1) bucket_allreduce(comms_->replicas, experts, cap);
}

double DataParallel::grad_norm(const std::vector<Param*>& trained) const {
  if (zero_level_ == 2) {
    double s = zero_->shard_sum_squares(trained);
    if (world_ > 1) check(MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce(norm)");
    return std::sqrt(s + zero_->replicated_sum_squares(trained));
  }
  // Every rank holds the summed gradients of what it holds: the non-expert ones are the same everywhere,
  // the expert slices are summed over the expert-parallel group.
  std::vector<const Tensor*> common, local;
  for (Param* p : trained) (ep_ > 1 && is_routed_expert(p->name) ? local : common).push_back(&p->grad);
  if (local.empty()) return ops::global_grad_norm(common);
  const double c = ops::global_grad_norm(common);
  double l = ops::global_grad_norm(local);
  l *= l;
  if (world_ > 1) check(MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, comms_->group), "MPI_Allreduce(norm)");
  return std::sqrt(c * c + l);
}

void DataParallel::clip_grads(const std::vector<Param*>& trained, double max_norm, double norm) {
  if (zero_level_ == 2) {
    // ops::clip_grads_'s rule, applied to the shards AdamW reads.
    DSA_CHECK(max_norm > 0, "[data_parallel] max_norm must be positive, got ", max_norm);
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) zero_->scale_grads(trained, coef);
    return;
  }
  std::vector<Tensor*> grads;
  for (Param* p : trained) grads.push_back(&p->grad);
  ops::clip_grads_(grads, max_norm, norm);
}

void DataParallel::adamw_step(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments,
                              const std::function<ops::AdamWConfig(const Param&)>& config, int64_t step) {
  if (zero_) {
    zero_->step(config, step);
    return;
  }
  for (Param* p : trained)
    ops::adamw_step_(p->value, p->grad, moments.at("optim/m/" + p->name), moments.at("optim/v/" + p->name),
                     config(*p), step);
}

void DataParallel::fail_hook(int64_t step) {
  static const char* at = std::getenv("DSA_FAIL_AT_STEP");
  if (!at) return;
  static const int64_t fail_step = std::atoll(at);
  static const char* r = std::getenv("DSA_FAIL_RANK");
  static const int fail_rank = r ? std::atoi(r) : 0;
  if (step != fail_step || Dist::rank() != fail_rank) return;
  const char* mode = std::getenv("DSA_FAIL_MODE");
  if (mode && std::string(mode) == "throw")
    throw std::runtime_error("[train] injected failure before step " + std::to_string(step + 1) +
                             " (DSA_FAIL_AT_STEP)");
  std::fprintf(stderr, "[rank %d] injected SIGKILL before step %lld (DSA_FAIL_AT_STEP)\n", Dist::rank(),
               static_cast<long long>(step + 1));
  std::fflush(stderr);
  std::raise(SIGKILL);
}

}  // namespace dsa
