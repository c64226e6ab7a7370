#include "trainer/zero.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <unordered_map>

#include "model/model.h"

namespace dsa {

namespace {

int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Elements per row of a tensor's full shape (a 1-D tensor's row is one element).
int64_t row_size(const Param& p) {
  return p.full_shape.empty() || p.full_shape[0] == 0 ? 1 : shape_numel(p.full_shape) / p.full_shape[0];
}

}  // namespace

struct ZeroState::Bucket {
  int64_t group = 0;
  bool experts = false;  // expert slices, reduced over their replicas
  ReplicaComm* comm = nullptr;
  std::vector<Member> members;
  int64_t n = 1, r = 0, chunk = 0;
  Tensor weights;      // [n chunk] what the ops read (bf16 GPU, f32 CPU)
  Tensor master;       // [chunk] f32, GPU only
  Tensor grad;         // [n chunk] f32 (ZeRO-2: only while a backward fills it)
  Tensor grad_shard;   // [chunk] f32, ZeRO-2 while the bucket trains
  Tensor scatter_tmp;  // [chunk] f32, ZeRO-2: a later micro-batch's shard, added after the wait
  Tensor m, v;         // [chunk] f32 while the bucket trains
  bool trains = false, launched = false;
  int64_t token = -1;  // ZeRO-2: comm->mark() after its last reduce-scatter
  int64_t lo() const { return r * chunk; }
  // This rank's part [a, e) of member k (a >= e: none), in flat coordinates.
  std::pair<int64_t, int64_t> piece(const Member& k) const {
    return {std::max(lo(), k.offset), std::min(lo() + chunk, k.offset + k.numel)};
  }
};

std::vector<ZeroBucketShape> zero_buckets(const std::vector<std::pair<std::string, int64_t>>& tensors,
                                          bool split_experts) {
  std::vector<ZeroBucketShape> out;
  std::map<std::pair<int64_t, bool>, size_t> by_key;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const bool ex = split_experts && is_routed_expert(tensors[i].first);
    const std::pair<int64_t, bool> key{Model::grad_group(tensors[i].first), ex};
    auto it = by_key.find(key);
    if (it == by_key.end()) {
      it = by_key.emplace(key, out.size()).first;
      out.push_back({key.first, ex, {}, {}, 0});
    }
    ZeroBucketShape& b = out[it->second];
    const int64_t at = round_up(b.total, ZeroState::kAlign);
    b.members.push_back(i);
    b.offsets.push_back(at);
    b.total = at + tensors[i].second;
  }
  return out;
}

int64_t zero_chunk(int64_t total, int64_t n) { return round_up((total + n - 1) / n, ZeroState::kAlign); }

ZeroState::ZeroState(int stage, ParamStore& ps, Device device, ReplicaComm& all, ReplicaComm* experts)
    : stage_(stage), device_(device), ps_(ps), all_(all) {
  DSA_CHECK(stage == 1 || stage == 2, "[zero] stage must be 1 or 2, got ", stage);
  const bool gpu = device == Device::CUDA;
  std::vector<Param*> sharded;
  std::vector<std::pair<std::string, int64_t>> list;
  for (Param& p : ps.all()) {
    if (p.group == ParamGroup::Buffer) continue;
    DSA_CHECK(!p.value.defined() && !p.grad.defined(), "[zero] ", p.name,
              " already has storage: the model must be made with ParamLayout::external_storage");
    if (gpu && Model::reads_master(p.name)) {
      p.value = Tensor::zeros(p.shape, DType::F32, device);
      p.grad = Tensor::zeros(p.shape, DType::F32, device);
      replicated_.push_back(&p);
      continue;
    }
    sharded.push_back(&p);
    list.emplace_back(p.name, shape_numel(p.shape));
  }
  for (const ZeroBucketShape& shape : zero_buckets(list, experts != nullptr)) {
    buckets_.push_back(std::make_unique<Bucket>());
    Bucket& b = *buckets_.back();
    b.group = shape.group;
    b.experts = shape.experts;
    b.comm = shape.experts ? experts : &all;
    b.n = b.comm->size();
    b.r = b.comm->rank();
    b.chunk = zero_chunk(shape.total, b.n);
    DSA_CHECK(b.chunk < INT_MAX, "[zero] a bucket's chunk of ", b.chunk, " elements exceeds 2^31 (group ", b.group, ")");
    b.weights = Tensor::zeros({b.n * b.chunk}, gpu ? DType::BF16 : DType::F32, device);
    if (gpu) b.master = Tensor::zeros({b.chunk}, DType::F32, device);
    for (size_t k = 0; k < shape.members.size(); ++k) {
      Param* p = sharded[shape.members[k]];
      b.members.push_back({p, shape.offsets[k], shape_numel(p->shape)});
      Tensor view = b.weights.slice_rows(shape.offsets[k], shape.offsets[k] + shape_numel(p->shape)).view(p->shape);
      (gpu ? p->compute : p->value) = view;
      index_[p] = {&b, k};
    }
    if (stage_ == 1) allocate_grads(b);
  }
  if (stage_ == 2) ps_.set_grad_provider([this](Param& p) { allocate_grads(bucket_of(p)); });
}

ZeroState::~ZeroState() {
  ps_.set_grad_provider(nullptr);
  for (auto& b : buckets_)
    for (const Member& m : b->members) {
      m.p->grad = Tensor();
      m.p->value = Tensor();
      m.p->compute = Tensor();
    }
}

ZeroState::Bucket& ZeroState::bucket_of(const Param& p) {
  auto it = index_.find(&p);
  DSA_CHECK(it != index_.end(), "[zero] ", p.name, " is in no bucket");
  return *it->second.first;
}

void ZeroState::allocate_grads(Bucket& b) {
  if (b.grad.defined()) return;
  b.grad = Tensor::zeros({b.n * b.chunk}, DType::F32, device_);
  for (const Member& m : b.members) m.p->grad = b.grad.slice_rows(m.offset, m.offset + m.numel).view(m.p->shape);
}

void ZeroState::release_grads(Bucket& b) {
  b.grad = Tensor();
  for (const Member& m : b.members) m.p->grad = Tensor();
}

void ZeroState::set_value(Param& p, const Tensor& host) {
  DSA_CHECK(host.is_cpu() && host.dtype() == DType::F32 && host.shape() == p.shape, "[zero] set_value(", p.name,
            "): f32 host ", shape_str(p.shape), " expected, got ", host.desc());
  if (std::find(replicated_.begin(), replicated_.end(), &p) != replicated_.end()) {
    p.value.copy_from(host);
    return;
  }
  const auto [bp, k] = index_.at(&p);
  const Bucket& b = *bp;
  const Member& m = b.members[k];
  if (device_ != Device::CUDA) {
    p.value.copy_from(host);
    return;
  }
  // The bf16 weights by the device cast refresh_compute uses, so both paths round alike.
  ops::copy_cast_(p.compute, host.to(Device::CUDA));
  const auto [a, e] = b.piece(m);
  if (a < e) {
    Tensor dst = b.master.slice_rows(a - b.lo(), e - b.lo());
    dst.copy_from(host.view({-1}).slice_rows(a - m.offset, e - m.offset));
  }
}

void ZeroState::begin_stage(const std::vector<Param*>& trained, const CheckpointSource* src) {
  trained_.clear();
  for (Param* p : trained) trained_.insert(p);
  for (auto& up : buckets_) {
    Bucket& b = *up;
    b.trains = false;
    for (const Member& m : b.members) b.trains = b.trains || is_trained(m.p);
    b.m = b.v = b.grad_shard = b.scatter_tmp = Tensor();
    if (!b.trains) continue;
    b.m = Tensor::zeros({b.chunk}, DType::F32, device_);
    b.v = Tensor::zeros({b.chunk}, DType::F32, device_);
    if (stage_ == 2) b.grad_shard = Tensor::zeros({b.chunk}, DType::F32, device_);
    if (!src) continue;
    for (const Member& m : b.members) {
      const auto [a, e] = b.piece(m);
      if (!is_trained(m.p) || a >= e) continue;
      const int64_t base = m.p->row0 * row_size(*m.p) - m.offset;  // flat element of the full tensor = base + a
      for (auto [kind, dst] : {std::pair<const char*, Tensor*>{"optim/m/", &b.m}, {"optim/v/", &b.v}}) {
        const std::string key = kind + m.p->name;
        if (!src->has(key)) continue;
        Tensor part = dst->slice_rows(a - b.lo(), e - b.lo());
        part.copy_from(src->read(key, base + a, base + e));
      }
    }
  }
  replicated_moments_.clear();
  for (Param* p : replicated_) {
    if (!is_trained(p)) continue;
    for (const char* kind : {"optim/m/", "optim/v/"}) {
      const std::string key = kind + p->name;
      Tensor& t = replicated_moments_[key] = Tensor::zeros(p->shape, DType::F32, device_);
      if (src && src->has(key)) t.copy_from(src->read(key, 0, t.numel()).view(p->shape));
    }
  }
  first_micro_ = true;
}

void ZeroState::launch(Bucket& b, bool first_micro) {
  b.launched = true;
  if (stage_ == 1) {
    b.comm->allreduce(b.grad);
    return;
  }
  allocate_grads(b);  // a trained bucket no gradient reached on this rank still joins the collective
  Tensor* out = &b.grad_shard;
  if (!first_micro) {
    b.scatter_tmp = Tensor::empty({b.chunk}, DType::F32, device_);
    out = &b.scatter_tmp;
  }
  b.comm->reduce_scatter(b.grad, *out);
  b.token = b.comm->mark();
}

void ZeroState::reduce_group(int64_t group, bool last_micro) {
  if (stage_ == 1 && !last_micro) return;
  std::vector<Bucket*> now;
  for (auto& up : buckets_) {
    Bucket& b = *up;
    if (b.group != group || !b.trains || b.launched) continue;
    launch(b, first_micro_);
    now.push_back(&b);
  }
  if (last_micro)
    for (Param* p : replicated_)
      if (is_trained(p) && Model::grad_group(p->name) == group && replicated_sent_.insert(p).second)
        all_.allreduce(p->grad);
  if (stage_ == 1 || now.empty()) return;
  // ZeRO-2: the full gradients of the groups reduced before this one are released once their
  // reduce-scatter is done: at most this group's (in flight) and the next group's (being computed)
  // are held at a time.
  for (auto& up : buckets_) {
    Bucket& b = *up;
    if (!b.grad.defined() || !b.launched || std::find(now.begin(), now.end(), &b) != now.end()) continue;
    b.comm->wait_for(b.token);
    release_grads(b);
  }
}

void ZeroState::finish_micro_batch(bool last_micro) {
  for (auto& up : buckets_)
    if (up->trains && !up->launched && (stage_ == 2 || last_micro)) launch(*up, first_micro_);
  if (last_micro) {
    // Replicated tensors whose group no hook reported are reduced here, in the same order on every rank.
    for (Param* p : replicated_)
      if (is_trained(p) && replicated_sent_.insert(p).second) all_.allreduce(p->grad);
    replicated_sent_.clear();
  }
  all_.wait();
  for (auto& up : buckets_)
    if (up->experts) up->comm->wait();
  for (auto& up : buckets_) {
    Bucket& b = *up;
    b.launched = false;
    if (stage_ != 2) continue;
    release_grads(b);
    if (b.scatter_tmp.defined()) {
      ops::add_(b.grad_shard, b.scatter_tmp);
      b.scatter_tmp = Tensor();
    }
  }
  first_micro_ = last_micro;
}

Tensor ZeroState::master_piece(const Bucket& b, int64_t a, int64_t e) const {
  return device_ == Device::CUDA ? b.master.slice_rows(a - b.lo(), e - b.lo()) : b.weights.slice_rows(a, e);
}

Tensor ZeroState::grad_piece(const Bucket& b, int64_t a, int64_t e) const {
  return stage_ == 1 ? b.grad.slice_rows(a, e) : b.grad_shard.slice_rows(a - b.lo(), e - b.lo());
}

double ZeroState::shard_sum_squares(const std::vector<Param*>& of) const {
  const std::unordered_set<const Param*> want(of.begin(), of.end());
  std::vector<Tensor> parts;
  for (const auto& up : buckets_) {
    const Bucket& b = *up;
    if (!b.trains) continue;
    for (const Member& m : b.members) {
      const auto [a, e] = b.piece(m);
      if (is_trained(m.p) && want.count(m.p) && a < e) parts.push_back(grad_piece(b, a, e));
    }
  }
  std::vector<const Tensor*> ptrs;
  for (const Tensor& t : parts) ptrs.push_back(&t);
  const double n = ops::global_grad_norm(ptrs);
  return n * n;
}

double ZeroState::replicated_sum_squares(const std::vector<Param*>& of) const {
  const std::unordered_set<const Param*> want(of.begin(), of.end());
  std::vector<const Tensor*> ptrs;
  for (Param* p : replicated_)
    if (is_trained(p) && want.count(p)) ptrs.push_back(&p->grad);
  const double n = ops::global_grad_norm(ptrs);
  return n * n;
}

void ZeroState::scale_grads(const std::vector<Param*>& of, double coef) {
  const std::unordered_set<const Param*> want(of.begin(), of.end());
  for (auto& up : buckets_) {
    Bucket& b = *up;
    if (!b.trains) continue;
    for (const Member& m : b.members) {
      const auto [a, e] = b.piece(m);
      if (!is_trained(m.p) || !want.count(m.p) || a >= e) continue;
      Tensor g = grad_piece(b, a, e);
      ops::scale_(g, coef);
    }
  }
  for (Param* p : replicated_)
    if (is_trained(p) && want.count(p)) ops::scale_(p->grad, coef);
}

void ZeroState::step(const std::function<ops::AdamWConfig(const Param&)>& config, int64_t step) {
  for (auto& up : buckets_) {
    Bucket& b = *up;
    if (!b.trains) continue;
    for (const Member& m : b.members) {
      const auto [a, e] = b.piece(m);
      if (!is_trained(m.p) || a >= e) continue;
      Tensor value = master_piece(b, a, e), grad = grad_piece(b, a, e);
      Tensor ms = b.m.slice_rows(a - b.lo(), e - b.lo()), vs = b.v.slice_rows(a - b.lo(), e - b.lo());
      ops::adamw_step_(value, grad, ms, vs, config(*m.p), step);
    }
    if (device_ == Device::CUDA) {
      Tensor own = b.weights.slice_rows(b.lo(), b.lo() + b.chunk);
      ops::copy_cast_(own, b.master);
    }
    b.comm->allgather(b.weights);
  }
  for (Param* p : replicated_) {
    if (!is_trained(p)) continue;
    ops::adamw_step_(p->value, p->grad, replicated_moments_.at("optim/m/" + p->name),
                     replicated_moments_.at("optim/v/" + p->name), config(*p), step);
  }
  all_.wait();
  for (auto& up : buckets_)
    if (up->experts) up->comm->wait();
}

std::vector<StatePiece> ZeroState::pieces(bool root) const {
  std::vector<StatePiece> out;
  for (const auto& up : buckets_) {
    const Bucket& b = *up;
    for (const Member& m : b.members) {
      const auto [a, e] = b.piece(m);
      if (a >= e) continue;
      const Param& p = *m.p;
      const int64_t base = p.row0 * row_size(p) - m.offset;
      out.push_back({"params/" + p.name, p.full_shape, param_group_name(p.group), base + a, master_piece(b, a, e)});
      if (!b.trains || !is_trained(&p)) continue;
      out.push_back({"optim/m/" + p.name, p.full_shape, "", base + a, b.m.slice_rows(a - b.lo(), e - b.lo())});
      out.push_back({"optim/v/" + p.name, p.full_shape, "", base + a, b.v.slice_rows(a - b.lo(), e - b.lo())});
    }
  }
  if (!root) return out;
  for (Param* p : replicated_) {
    out.push_back({"params/" + p->name, p->full_shape, param_group_name(p->group), 0, p->value.view({-1})});
    for (const char* kind : {"optim/m/", "optim/v/"}) {
      auto it = replicated_moments_.find(kind + p->name);
      if (it != replicated_moments_.end()) out.push_back({it->first, p->full_shape, "", 0, it->second.view({-1})});
    }
  }
  return out;
}

ZeroState::Bytes ZeroState::bytes() const {
  Bytes r;
  auto nb = [](const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t(0); };
  for (const auto& up : buckets_) {
    const Bucket& b = *up;
    r.weights += nb(b.weights);
    r.master += nb(b.master);
    r.grads += nb(b.grad) + nb(b.grad_shard) + nb(b.scatter_tmp);
    r.moments += nb(b.m) + nb(b.v);
  }
  for (Param* p : replicated_) {
    r.master += nb(p->value);
    r.grads += nb(p->grad);
  }
  for (const auto& kv : replicated_moments_) r.moments += nb(kv.second);
  return r;
}

}  // namespace dsa
