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

#include "trainer/dist.h"
#include "trainer/expert_parallel.h"

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

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
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

}  // namespace

struct DataParallel::Comms {
  MPI_Comm replicas = MPI_COMM_NULL;  // ranks holding the same expert slice (rank % ep equal)
  MPI_Comm group = MPI_COMM_NULL;     // the expert-parallel group (rank / ep equal)
  int n_replicas = 1;
};

// One replica set's flat space under ZeRO-1.
struct DataParallel::ZeroGroup {
  MPI_Comm comm = MPI_COMM_NULL;
  int n = 1, me = 0;
  std::vector<Param*> params;
  std::vector<int64_t> begin;  // [params] offset of each tensor (or expert slice) in the flat space
  int64_t total = 0, lo = 0, hi = 0;  // my shard [lo, hi)
  Tensor m, v;                        // [hi - lo] f32
  std::vector<int> counts, displs;    // every member's shard, for the all-gather
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

DataParallel::DataParallel(const Recipe& recipe, Model& model) : comms_(std::make_unique<Comms>()) {
  world_ = Dist::world();
  rank_ = Dist::rank();
  ep_ = static_cast<int>(recipe.parallel.ep);
  DSA_CHECK(recipe.parallel.dp == 0 || recipe.parallel.dp == world_, "[data_parallel] parallelism.dp = ",
            recipe.parallel.dp, " but the job has ", world_,
            " ranks (dp is 0 or the world size: every rank is data-parallel, expert groups sit inside)");
  DSA_CHECK(world_ % ep_ == 0, "[data_parallel] parallelism.ep = ", ep_, " does not divide the ", world_,
            " ranks of the job");
  const int64_t E = recipe.model.n_routed_experts;
  DSA_CHECK(E == 0 || E % ep_ == 0, "[data_parallel] parallelism.ep = ", ep_, " does not divide n_routed_experts = ", E);
  zero1_ = recipe.parallel.zero1 && world_ > 1;
  e0_ = E / ep_ * (rank_ % ep_);
  e1_ = e0_ + E / ep_;
  if (world_ > 1) {
    check(MPI_Comm_split(MPI_COMM_WORLD, rank_ % ep_, rank_, &comms_->replicas), "MPI_Comm_split");
    check(MPI_Comm_split(MPI_COMM_WORLD, rank_ / ep_, rank_, &comms_->group), "MPI_Comm_split");
    MPI_Comm_set_errhandler(comms_->replicas, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(comms_->group, MPI_ERRORS_RETURN);
    MPI_Comm_size(comms_->replicas, &comms_->n_replicas);
  }
  if (world_ > 1 && model.device() == Device::CUDA) {
    DSA_CHECK(!zero1_, "[data_parallel] ZeRO-1 runs on the CPU backend only so far");
    nccl_ = std::make_unique<NcclComm>();
    if (ep_ > 1 && comms_->n_replicas > 1) nccl_replicas_ = nccl_->split(rank_ % ep_, rank_);
    model.set_grad_ready_hook([this](int64_t group) { on_grads_ready(group); });
  }
  if (ep_ > 1) {
    if (nccl_)
      expert_ = nccl_->make_expert_parallel(ep_);
    else
      expert_ = std::make_unique<MpiExpertParallel>(ep_);
    model.set_expert_parallel(expert_.get());
  }
  if (world_ > 1 && rank_ == 0)
    std::printf("[dist] %d ranks: data parallel over all, expert groups of %d (%lld routed experts per rank), "
                "gradient buckets of %lld MiB%s\n", world_, ep_, static_cast<long long>(e1_ - e0_),
                static_cast<long long>(kBucketBytes >> 20), zero1_ ? ", ZeRO-1 optimizer shards" : "");
}

DataParallel::~DataParallel() {
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

bool DataParallel::sharded(const Param& p) const {
  return ep_ > 1 && (ends_with(p.name, "mlp.experts.gate_up_proj") || ends_with(p.name, "mlp.experts.down_proj"));
}

void DataParallel::arm_overlap(const std::vector<Param*>& trained) {
  if (!nccl_) return;
  armed_ = true;
  armed_params_ = trained;
  reduced_.assign(trained.size(), false);
}

void DataParallel::on_grads_ready(int64_t group) {
  if (!armed_) return;
  std::vector<Param*> ready;
  for (size_t i = 0; i < armed_params_.size(); ++i) {
    if (reduced_[i] || Model::grad_group(armed_params_[i]->name) != group) continue;
    reduced_[i] = true;
    ready.push_back(armed_params_[i]);
  }
  nccl_reduce(ready);
}

// Non-expert gradients over every rank; expert slices over their shard's replicas only.
void DataParallel::nccl_reduce(const std::vector<Param*>& params) {
  std::vector<Tensor*> all, experts;
  std::vector<Tensor> slices;
  slices.reserve(params.size());
  for (Param* p : params) {
    if (sharded(*p)) {
      slices.push_back(p->grad.slice_rows(e0_, e1_));
      experts.push_back(&slices.back());
    } else {
      all.push_back(&p->grad);
    }
  }
  nccl_->allreduce_async(all);
  if (nccl_replicas_) nccl_replicas_->allreduce_async(experts);
}

void DataParallel::allreduce_grads(const std::vector<Param*>& trained) {
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
    if (sharded(*p)) {
      Tensor s = p->grad.slice_rows(e0_, e1_);
      experts.push_back({s.data<float>(), s.numel()});
    } else {
      all.push_back({p->grad.data<float>(), p->grad.numel()});
    }
  }
  const int64_t cap = kBucketBytes / static_cast<int64_t>(sizeof(float));
  bucket_allreduce(MPI_COMM_WORLD, all, cap);
  if (comms_->n_replicas > 1) bucket_allreduce(comms_->replicas, experts, cap);
}

double DataParallel::grad_norm(const std::vector<Param*>& trained) const {
  std::vector<const Tensor*> common, local;
  std::vector<Tensor> slices;
  slices.reserve(trained.size());
  for (Param* p : trained) {
    if (sharded(*p)) {
      slices.push_back(p->grad.slice_rows(e0_, e1_));
      local.push_back(&slices.back());
    } else {
      common.push_back(&p->grad);
    }
  }
  if (local.empty()) return ops::global_grad_norm(common);
  const double c = ops::global_grad_norm(common);
  double l = ops::global_grad_norm(local);
  l *= l;
  check(MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, comms_->group), "MPI_Allreduce(norm)");
  return std::sqrt(c * c + l);
}

namespace {

// The flat f32 view of what a rank trains of p's tensor t (its expert slice when sharded).
Tensor flat_part(const Tensor& t, bool sharded, int64_t e0, int64_t e1) {
  return (sharded ? t.slice_rows(e0, e1) : t).view({-1});
}

}  // namespace

void DataParallel::begin_stage(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments) {
  if (!zero1_) return;
  zero_.clear();
  zero_.resize(2);
  zero_[0].comm = MPI_COMM_WORLD;
  zero_[1].comm = comms_->replicas;
  for (ZeroGroup& g : zero_) {
    MPI_Comm_size(g.comm, &g.n);
    MPI_Comm_rank(g.comm, &g.me);
  }
  for (Param* p : trained) {
    ZeroGroup& g = zero_[sharded(*p) ? 1 : 0];
    g.params.push_back(p);
    g.begin.push_back(g.total);
    g.total += flat_part(p->value, sharded(*p), e0_, e1_).numel();
  }
  for (ZeroGroup& g : zero_) {
    DSA_CHECK(g.total < (1ll << 31), "[data_parallel] ZeRO-1 flat space of ", g.total, " elements exceeds 2^31");
    auto bound = [&](int64_t i) { return g.total * i / g.n; };
    g.lo = bound(g.me);
    g.hi = bound(g.me + 1);
    for (int i = 0; i < g.n; ++i) {
      g.counts.push_back(static_cast<int>(bound(i + 1) - bound(i)));
      g.displs.push_back(static_cast<int>(bound(i)));
    }
    g.m = Tensor::zeros({g.hi - g.lo}, DType::F32);
    g.v = Tensor::zeros({g.hi - g.lo}, DType::F32);
    for (size_t k = 0; k < g.params.size(); ++k) {
      Param* p = g.params[k];
      const int64_t len = flat_part(p->value, sharded(*p), e0_, e1_).numel();
      const int64_t a = std::max(g.lo, g.begin[k]), b = std::min(g.hi, g.begin[k] + len);
      for (auto [kind, dst] : {std::pair<const char*, Tensor*>{"optim/m/", &g.m}, {"optim/v/", &g.v}}) {
        auto it = moments.find(kind + p->name);
        if (a >= b || it == moments.end()) continue;
        Tensor src = flat_part(it->second, sharded(*p), e0_, e1_);
        dst->slice_rows(a - g.lo, b - g.lo).copy_from(src.slice_rows(a - g.begin[k], b - g.begin[k]));
      }
    }
  }
  release_moments(moments);
}

void DataParallel::release_moments(std::map<std::string, Tensor>& moments) const {
  if (zero1_) moments.clear();
}

void DataParallel::adamw_step(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments,
                              const std::function<ops::AdamWConfig(const Param&)>& config, int64_t step) {
  if (zero1_) {
    DSA_CHECK(!zero_.empty(), "[data_parallel] ZeRO-1: begin_stage() was not called");
    for (ZeroGroup& g : zero_) {
      for (size_t k = 0; k < g.params.size(); ++k) {
        Param* p = g.params[k];
        const bool sh = sharded(*p);
        Tensor value = flat_part(p->value, sh, e0_, e1_);
        const int64_t a = std::max(g.lo, g.begin[k]), b = std::min(g.hi, g.begin[k] + value.numel());
        if (a >= b) continue;
        Tensor pv = value.slice_rows(a - g.begin[k], b - g.begin[k]);
        Tensor ms = g.m.slice_rows(a - g.lo, b - g.lo), vs = g.v.slice_rows(a - g.lo, b - g.lo);
        ops::adamw_step_(pv, flat_part(p->grad, sh, e0_, e1_).slice_rows(a - g.begin[k], b - g.begin[k]), ms, vs,
                         config(*p), step);
      }
      if (g.n == 1 || g.total == 0) continue;
      // Every member's updated shard to every member: pack, all-gather, unpack.
      std::vector<float> flat(static_cast<size_t>(g.total));
      for (size_t k = 0; k < g.params.size(); ++k) {
        Tensor value = flat_part(g.params[k]->value, sharded(*g.params[k]), e0_, e1_);
        std::memcpy(flat.data() + g.begin[k], value.data<float>(), static_cast<size_t>(value.numel()) * sizeof(float));
      }
      check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, flat.data(), g.counts.data(), g.displs.data(),
                           MPI_FLOAT, g.comm),
            "MPI_Allgatherv");
      for (size_t k = 0; k < g.params.size(); ++k) {
        Tensor value = flat_part(g.params[k]->value, sharded(*g.params[k]), e0_, e1_);
        std::memcpy(value.data<float>(), flat.data() + g.begin[k], static_cast<size_t>(value.numel()) * sizeof(float));
      }
    }
    return;
  }
  for (Param* p : trained) {
    const ops::AdamWConfig ac = config(*p);
    Tensor& m = moments.at("optim/m/" + p->name);
    Tensor& v = moments.at("optim/v/" + p->name);
    if (sharded(*p)) {
      Tensor value = p->value.slice_rows(e0_, e1_), ms = m.slice_rows(e0_, e1_), vs = v.slice_rows(e0_, e1_);
      ops::adamw_step_(value, p->grad.slice_rows(e0_, e1_), ms, vs, ac, step);
    } else {
      ops::adamw_step_(p->value, p->grad, m, v, ac, step);
    }
  }
}

void DataParallel::gather_to_root(ParamStore& params, std::map<std::string, Tensor>& moments) {
  // ZeRO-1: each replica set's moment shards to its first member (world rank 0, or for expert slice q
  // world rank q < ep, whose slice the loop below forwards to rank 0).
  for (ZeroGroup& g : zero_) {
    if (g.total == 0) continue;
    std::vector<float> fm(g.me == 0 ? static_cast<size_t>(g.total) : 0), fv(fm.size());
    check(MPI_Gatherv(g.m.data<float>(), static_cast<int>(g.hi - g.lo), MPI_FLOAT, fm.data(), g.counts.data(),
                      g.displs.data(), MPI_FLOAT, 0, g.comm),
          "MPI_Gatherv");
    check(MPI_Gatherv(g.v.data<float>(), static_cast<int>(g.hi - g.lo), MPI_FLOAT, fv.data(), g.counts.data(),
                      g.displs.data(), MPI_FLOAT, 0, g.comm),
          "MPI_Gatherv");
    if (g.me != 0) continue;
    for (size_t k = 0; k < g.params.size(); ++k) {
      Param* p = g.params[k];
      for (auto [kind, src] : {std::pair<const char*, const float*>{"optim/m/", fm.data()}, {"optim/v/", fv.data()}}) {
        Tensor& full = moments[kind + p->name];
        if (!full.defined()) full = Tensor::zeros(p->value.shape(), DType::F32);
        Tensor part = flat_part(full, sharded(*p), e0_, e1_);
        std::memcpy(part.data<float>(), src + g.begin[k], static_cast<size_t>(part.numel()) * sizeof(float));
      }
    }
  }
  if (ep_ == 1 || rank_ >= ep_) return;  // rank 0's group is world ranks [0, ep)
  const int64_t E = e1_ - e0_;
  for (Param& p : params.all()) {
    if (!sharded(p)) continue;
    std::vector<Tensor*> parts = {&p.value};
    for (const char* kind : {"optim/m/", "optim/v/"}) {
      auto it = moments.find(kind + p.name);
      if (it != moments.end()) parts.push_back(&it->second);
    }
    for (Tensor* t : parts) {
      DSA_CHECK(t->dtype() == DType::F32, "[data_parallel] gather of ", p.name, ": f32 tensor expected");
      const int64_t row = t->numel() / t->size(0);
      const int count = static_cast<int>(E * row);
      // Device tensors travel through host memory (a checkpoint is rare; MPI is the transport here).
      if (rank_ == 0) {
        for (int q = 1; q < ep_; ++q) {
          Tensor dst = t->slice_rows(q * E, (q + 1) * E);
          Tensor host = dst.is_cpu() ? dst : Tensor::empty(dst.shape(), DType::F32);
          check(MPI_Recv(host.data<float>(), count, MPI_FLOAT, q, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv");
          if (!dst.is_cpu()) dst.copy_from(host);
        }
      } else {
        Tensor host = t->slice_rows(e0_, e1_).to(Device::CPU);
        check(MPI_Send(host.data<float>(), count, MPI_FLOAT, 0, 7, MPI_COMM_WORLD), "MPI_Send");
      }
    }
  }
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
