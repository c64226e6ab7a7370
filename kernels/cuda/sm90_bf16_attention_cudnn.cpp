// Dense causal attention through cuDNN's fused flash attention (backend graph API; the header-only
// frontend is not a dependency). Same semantics and layouts as the own kernels (ops_attention.h), which
// stay the fallback and the tests' second reference.
//
// Each direction is one cuDNN operation graph in the composite form cuDNN's SDPA engines match on Hopper
// (the form cudnn-frontend's sdpa node lowers to for cuDNN 9):
//   fwd: S = Q K^T (f32); S *= scale; causal mask (gen_index row >= col, else -inf);
//        stats = max + log(sum exp(S - max)); P = exp(S - max) / sum (bf16); O = P V.
//   bwd: softmax_sum = rowsum(dO * O); P = exp(scale S - stats) under the mask; dV = P^T dO;
//        dS = scale * P * (dO V^T - softmax_sum); dK = dS^T Q; dQ_accum (f32) = dS K; dQ = dQ_accum.
// Token-major tensors [B, T, H, D] become cuDNN's [b, h, s, d] dims through strides: nothing is copied.
// stats is exactly the own kernels' lse [B, H, T], so either backward takes either forward's lse.
//
// NOTES:
//  - One plan per (direction, B, T, H, Dk, Dv), built on first use and kept for the process; the scale
//    is a by-value operand, so one plan serves every scale. Building a plan can take a second (cuDNN
//    compiles the fused kernel at run time); the trainer sees each shape once.
//  - The entries return false (and the own kernel runs) where the build has no cuDNN, it is switched off
//    (ops::set_attention_cudnn, DSA_ATTN_CUDNN=0), the shape is outside what is asked of it (Hk != H,
//    head dims not multiples of 8 or over 256, operands not 16-byte aligned) or cuDNN refuses the graph;
//    a refusal is reported once per shape on stderr with cuDNN's reason. A failure to run a plan that
//    cuDNN accepted is an error, not a fallback.
//  - GQA/MQA (Hk < H) stays on the own kernels: cuDNN's backward would need per-query-head dK/dV
//    buffers and a head reduction, which the own backward does without.
//  - The backward's scratch is the caller's: softmax_sum in p.delta [B, H, T] (cuDNN's [b, h, s, 1]
//    layout exactly), dQ_accum in p.dq_accum (B*T*H*Dk floats, used by cuDNN as [b, h, s, dk]).
#include "kernels/cuda/ops_attention.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/context.h"
#include "kernels/device_memory.h"
#include "kernels/ops.h"

#if DSA_HAVE_CUDNN
#include <cudnn.h>
#endif

namespace dsa::cuda {

namespace {
int64_t g_forward_calls = 0, g_backward_calls = 0;
}  // namespace

#if DSA_HAVE_CUDNN
namespace {

using Td = cudnnBackendDescriptor_t;
using Dims = std::vector<int64_t>;

// A graph cuDNN would not take: the caller falls back to the own kernel.
struct Refused {
  std::string why;
};

std::string last_cudnn_error() {
  char msg[1024] = {0};
  cudnnGetLastErrorString(msg, sizeof(msg));
  return msg;
}

std::string status_text(const char* what, cudnnStatus_t s) {
  std::string m = std::string(what) + ": " + cudnnGetErrorString(s);
  const std::string last = last_cudnn_error();
  if (!last.empty()) m += " (" + last + ")";
  return m;
}

#define DSA_CUDNN_BUILD(expr)                                            \
  do {                                                                   \
    const cudnnStatus_t s_ = (expr);                                     \
    if (s_ != CUDNN_STATUS_SUCCESS) throw Refused{status_text(#expr, s_)}; \
  } while (0)

// Every descriptor of one graph and its plan; destroyed together, in reverse order of creation.
class Graph {
 public:
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    for (auto it = owned_.rbegin(); it != owned_.rend(); ++it) cudnnBackendDestroyDescriptor(*it);
  }

  Td make(cudnnBackendDescriptorType_t type) {
    Td d = nullptr;
    DSA_CUDNN_BUILD(cudnnBackendCreateDescriptor(type, &d));
    owned_.push_back(d);
    return d;
  }
  template <class T>
  static void set(Td d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t n, const T* v) {
    DSA_CUDNN_BUILD(cudnnBackendSetAttribute(d, name, type, n, v));
  }
  static void finalize(Td d) { DSA_CUDNN_BUILD(cudnnBackendFinalize(d)); }

  // A tensor; uid > 0 names an operand of the variant pack, virtual tensors get fresh uids.
  Td tensor(cudnnDataType_t dt, const Dims& dims, const Dims& strides, int64_t uid, bool by_value = false) {
    const bool is_virtual = uid <= 0;
    if (is_virtual) uid = next_virtual_uid_++;
    const int64_t align = 16;
    Td t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, int64_t(dims.size()), dims.data());
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, int64_t(strides.size()), strides.data());
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    finalize(t);
    return t;
  }
  Td virt(cudnnDataType_t dt, const Dims& dims, const Dims& strides) { return tensor(dt, dims, strides, 0); }
  // f32 passed by value, of the rank of the tensors it meets (cuDNN wants equal ranks in pointwise ops)
  Td scalar(int64_t uid) { return tensor(CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, uid, true); }

  // y = mode(x [, b [, t]]) elementwise, broadcasting size-1 dims.
  void pointwise(cudnnPointwiseMode_t mode, Td x, Td b, Td t, Td y, cudnnDataType_t prec = CUDNN_DATA_FLOAT,
                 int64_t axis = -1) {
    Td pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0) set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    finalize(pw);
    operation(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
              {{CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw}, {CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x},
               {CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b}, {CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t},
               {CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y}});
  }
  void unary(cudnnPointwiseMode_t mode, Td x, Td y) { pointwise(mode, x, nullptr, nullptr, y); }
  void binary(cudnnPointwiseMode_t mode, Td x, Td b, Td y) { pointwise(mode, x, b, nullptr, y); }

  // y = reduce(x) over the dims where y has size 1.
  void reduction(cudnnReduceTensorOp_t mode, Td x, Td y) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    Td r = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    set(r, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    set(r, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
    finalize(r);
    operation(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, {{CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x},
                                                              {CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y},
                                                              {CUDNN_ATTR_OPERATION_REDUCTION_DESC, r}});
  }

  // c = a b over the last two dims, batched over the first two; f32 accumulation.
  void matmul(Td a, Td b, Td c) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    Td m = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    set(m, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
    finalize(m);
    operation(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR,
              {{CUDNN_ATTR_OPERATION_MATMUL_ADESC, a}, {CUDNN_ATTR_OPERATION_MATMUL_BDESC, b},
               {CUDNN_ATTR_OPERATION_MATMUL_CDESC, c}, {CUDNN_ATTR_OPERATION_MATMUL_DESC, m}});
  }

  // y = x seen through y's dims and strides (a transpose here).
  void reshape(Td x, Td y) {
    operation(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR,
              {{CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x}, {CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y}});
  }

  // The operation graph, the heuristics' engine configs in order, and the first plan cuDNN finalizes.
  void build_plan(cudnnHandle_t handle) {
    Td og = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    set(og, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(ops_.size()), ops_.data());
    set(og, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    finalize(og);
    Td heur = make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    set(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &og);
    set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    finalize(heur);
    int64_t n = 0;
    DSA_CUDNN_BUILD(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                             &n, nullptr));
    if (n <= 0) throw Refused{"the heuristics return no engine config for the graph (" + last_cudnn_error() + ")"};
    std::vector<Td> cfgs(static_cast<size_t>(n));
    for (Td& c : cfgs) c = make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    int64_t got = 0;
    DSA_CUDNN_BUILD(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, n,
                                             &got, cfgs.data()));
    std::string why;
    for (int64_t i = 0; i < got; ++i) {
      Td plan = make(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
      set(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfgs[size_t(i)]);
      const cudnnStatus_t s = cudnnBackendFinalize(plan);
      if (s != CUDNN_STATUS_SUCCESS) {
        why = status_text("finalize the execution plan", s);
        continue;
      }
      int64_t ws = 0, cnt = 0;
      DSA_CUDNN_BUILD(cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                               &cnt, &ws));
      plan_ = plan;
      workspace_ = ws;
      return;
    }
    throw Refused{"none of " + std::to_string(got) + " engine configs gives a plan: " + why};
  }

  Td plan() const { return plan_; }
  int64_t workspace() const { return workspace_; }

 private:
  // A graph node: an operation descriptor with its descriptor-valued attributes (null ones left unset, in
  // the order given), finalized and appended.
  void operation(cudnnBackendDescriptorType_t type,
                 std::initializer_list<std::pair<cudnnBackendAttributeName_t, Td>> attrs) {
    Td op = make(type);
    for (const auto& [name, d] : attrs)
      if (d) set(op, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &d);
    finalize(op);
    ops_.push_back(op);
  }
  std::vector<Td> owned_, ops_;
  int64_t next_virtual_uid_ = 1000;
  Td plan_ = nullptr;
  int64_t workspace_ = 0;
};

// Variant-pack uids of the graphs' operands.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kDO, kOne, kSoftmaxSum, kDQAccum, kDQ, kDK, kDV
};

struct Shape5 {
  int64_t b, h, s, dk, dv;
  // Token-major [b, s, h, d] storage seen as [b, h, s, d] (and its transpose [b, h, d, s]).
  Dims bhsd(int64_t d) const { return {b, h, s, d}; }
  Dims bhsd_strides(int64_t d) const { return {s * h * d, d, h * d, 1}; }
  Dims bhds(int64_t d) const { return {b, h, d, s}; }
  Dims bhds_strides(int64_t d) const { return {s * h * d, d, 1, h * d}; }
  Dims scores() const { return {b, h, s, s}; }
  Dims scores_strides() const { return {h * s * s, s * s, s, 1}; }
  Dims scores_t_strides() const { return {h * s * s, s * s, 1, s}; }
  Dims rows() const { return {b, h, s, 1}; }
  Dims rows_strides() const { return {h * s, s, 1, 1}; }
};

// y = x where key <= query (gen_index row >= col), -inf elsewhere.
Td causal_mask(Graph& g, const Shape5& z, Td x, Td neg_inf) {
  const Dims d = z.scores(), st = z.scores_strides();
  Td row = g.virt(CUDNN_DATA_INT32, d, st), col = g.virt(CUDNN_DATA_INT32, d, st);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, row, CUDNN_DATA_FLOAT, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, col, CUDNN_DATA_FLOAT, 3);
  Td keep = g.virt(CUDNN_DATA_BOOLEAN, d, st);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  Td y = g.virt(CUDNN_DATA_FLOAT, d, st);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, x, neg_inf, keep, y);
  return y;
}

// A token-major bf16 operand [B, T, H, d] of the variant pack seen as [b, h, s, d] (or transposed, [b, h, d, s]).
Td operand(Graph& g, const Shape5& z, int64_t d, int64_t uid, bool transposed = false) {
  return transposed ? g.tensor(CUDNN_DATA_BFLOAT16, z.bhds(d), z.bhds_strides(d), uid)
                    : g.tensor(CUDNN_DATA_BFLOAT16, z.bhsd(d), z.bhsd_strides(d), uid);
}

void forward_graph(Graph& g, const Shape5& z) {
  const cudnnDataType_t bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  Td q = operand(g, z, z.dk, kQ);
  Td kt = operand(g, z, z.dk, kK, true);
  Td v = operand(g, z, z.dv, kV);
  Td o = operand(g, z, z.dv, kO);
  Td stats = g.tensor(f32, z.rows(), z.rows_strides(), kStats);
  Td scale = g.scalar(kScale), neg_inf = g.scalar(kNegInf);
  const Dims sd = z.scores(), ss = z.scores_strides(), rd = z.rows(), rs = z.rows_strides();
  Td s0 = g.virt(f32, sd, ss), s1 = g.virt(f32, sd, ss);
  g.matmul(q, kt, s0);
  g.binary(CUDNN_POINTWISE_MUL, s0, scale, s1);
  Td s2 = causal_mask(g, z, s1, neg_inf);
  Td mx = g.virt(f32, rd, rs), sub = g.virt(f32, sd, ss), ex = g.virt(f32, sd, ss);
  Td sum = g.virt(f32, rd, rs), lg = g.virt(f32, rd, rs), p = g.virt(bf16, sd, ss);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s2, mx);
  g.binary(CUDNN_POINTWISE_SUB, s2, mx, sub);
  g.unary(CUDNN_POINTWISE_EXP, sub, ex);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, ex, sum);
  g.unary(CUDNN_POINTWISE_LOG, sum, lg);
  g.binary(CUDNN_POINTWISE_ADD, mx, lg, stats);
  g.binary(CUDNN_POINTWISE_DIV, ex, sum, p);
  g.matmul(p, v, o);
}

void backward_graph(Graph& g, const Shape5& z) {
  const cudnnDataType_t bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  Td q = operand(g, z, z.dk, kQ);
  Td kt = operand(g, z, z.dk, kK, true);
  Td vt = operand(g, z, z.dv, kV, true);
  Td o = operand(g, z, z.dv, kO);
  Td d_o = operand(g, z, z.dv, kDO);
  Td stats = g.tensor(f32, z.rows(), z.rows_strides(), kStats);
  Td scale = g.scalar(kScale), neg_inf = g.scalar(kNegInf), one = g.scalar(kOne);
  Td softmax_sum = g.tensor(f32, z.rows(), z.rows_strides(), kSoftmaxSum);
  Td dq_accum = g.tensor(f32, z.bhsd(z.dk), {z.h * z.s * z.dk, z.s * z.dk, z.dk, 1}, kDQAccum);
  Td dq = operand(g, z, z.dk, kDQ);
  Td dk = operand(g, z, z.dk, kDK);
  Td dv = operand(g, z, z.dv, kDV);
  const Dims sd = z.scores(), ss = z.scores_strides(), rd = z.rows(), rs = z.rows_strides();
  const Dims sdt = {z.b, z.h, z.s, z.s}, sst = z.scores_t_strides();  // [b, h, key, query]

  // softmax_sum = rowsum(dO * O)
  Td d_o_o = g.virt(f32, z.bhsd(z.dv), {z.h * z.s * z.dv, z.s * z.dv, z.h * z.dv, 1});
  Td rowsum = g.virt(f32, rd, rs);
  g.binary(CUDNN_POINTWISE_MUL, d_o, o, d_o_o);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, d_o_o, rowsum);
  g.binary(CUDNN_POINTWISE_MUL, rowsum, one, softmax_sum);

  // P = exp(scale Q K^T - stats) under the mask; dV = P^T dO
  Td s0 = g.virt(f32, sd, ss), s1 = g.virt(f32, sd, ss), s2 = g.virt(f32, sd, ss);
  g.matmul(q, kt, s0);
  g.binary(CUDNN_POINTWISE_MUL, s0, scale, s1);
  g.binary(CUDNN_POINTWISE_SUB, s1, stats, s2);
  Td s3 = causal_mask(g, z, s2, neg_inf);
  Td p = g.virt(f32, sd, ss), pt = g.virt(bf16, sdt, sst);
  g.unary(CUDNN_POINTWISE_EXP, s3, p);
  g.reshape(p, pt);
  g.matmul(pt, d_o, dv);

  // dS = scale * P * (dO V^T - softmax_sum); dK = dS^T Q
  Td dp = g.virt(f32, sd, ss), dp1 = g.virt(f32, sd, ss), ds0 = g.virt(f32, sd, ss), ds = g.virt(f32, sd, ss);
  g.matmul(d_o, vt, dp);
  g.binary(CUDNN_POINTWISE_SUB, dp, softmax_sum, dp1);
  g.binary(CUDNN_POINTWISE_MUL, dp1, p, ds0);
  g.binary(CUDNN_POINTWISE_MUL, ds0, scale, ds);
  Td dst = g.virt(bf16, sdt, sst);
  g.reshape(ds, dst);
  g.matmul(dst, q, dk);

  // dQ_accum = dS K (f32), dQ = dQ_accum
  Td k = g.virt(bf16, z.bhsd(z.dk), z.bhsd_strides(z.dk));
  g.reshape(kt, k);
  g.matmul(ds, k, dq_accum);
  g.unary(CUDNN_POINTWISE_IDENTITY, dq_accum, dq);
}

struct Cudnn {
  cudnnHandle_t handle = nullptr;
  std::string unavailable;  // why no handle could be made ("" when there is one)
  std::map<std::vector<int64_t>, std::unique_ptr<Graph>> plans;  // nullptr: refused
};

Cudnn& state() {
  static Cudnn c = [] {
    Cudnn s;
    const cudnnStatus_t st = cudnnCreate(&s.handle);
    if (st != CUDNN_STATUS_SUCCESS) {
      s.handle = nullptr;
      s.unavailable = status_text("cudnnCreate", st);
      std::fprintf(stderr, "[attention] cuDNN unavailable (%s): the own kernels run\n", s.unavailable.c_str());
    } else if (cudnnGetVersion() / 10000 != CUDNN_MAJOR) {
      s.unavailable = "built against cuDNN " + std::to_string(CUDNN_VERSION) + ", loaded " +
                      std::to_string(cudnnGetVersion());
      std::fprintf(stderr, "[attention] cuDNN unavailable (%s): the own kernels run\n", s.unavailable.c_str());
    }
    return s;
  }();
  return c;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The cached plan for this direction and shape, nullptr where cuDNN is not to be used.
Graph* plan_for(bool backward, const AttentionParams& p) {
  if (!ops::attention_cudnn_enabled()) return nullptr;
  if (p.H != p.Hk || p.Dk % 8 != 0 || p.Dv % 8 != 0 || p.Dk > 256 || p.Dv > 256 || p.B * p.T <= 0) return nullptr;
  for (const void* ptr : {p.q, p.k, p.v})
    if (!aligned16(ptr)) return nullptr;
  Cudnn& c = state();
  if (!c.unavailable.empty()) return nullptr;
  const std::vector<int64_t> key{backward, p.B, p.T, p.H, p.Dk, p.Dv, current_device()};
  auto it = c.plans.find(key);
  if (it == c.plans.end()) {
    auto g = std::make_unique<Graph>();
    const Shape5 z{p.B, p.H, p.T, p.Dk, p.Dv};
    try {
      if (backward) backward_graph(*g, z);
      else forward_graph(*g, z);
      g->build_plan(c.handle);
    } catch (const Refused& r) {
      std::fprintf(stderr, "[attention] cuDNN refused the %s for B=%d T=%d H=%d Dk=%d Dv=%d: %s; the own kernel runs\n",
                   backward ? "backward" : "forward", p.B, p.T, p.H, p.Dk, p.Dv, r.why.c_str());
      g.reset();
    }
    it = c.plans.emplace(key, std::move(g)).first;
  }
  return it->second.get();
}

void execute(const char* op, Graph& g, const std::vector<int64_t>& uids, const std::vector<void*>& ptrs) {
  Cudnn& c = state();
  Tensor workspace;
  if (g.workspace() > 0) workspace = Tensor::empty({g.workspace()}, DType::U8, Device::CUDA);
  auto check = [&](cudnnStatus_t s, const char* what) {
    if (s != CUDNN_STATUS_SUCCESS) fail(std::string("[") + op + "] cuDNN " + status_text(what, s));
  };
  check(cudnnSetStream(c.handle, stream()), "cudnnSetStream");
  Td pack = nullptr;
  check(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack), "variant pack");
  void* ws = workspace.defined() ? workspace.raw() : nullptr;
  cudnnStatus_t s = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                                             int64_t(uids.size()), uids.data());
  if (s == CUDNN_STATUS_SUCCESS)
    s = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                 int64_t(ptrs.size()), ptrs.data());
  if (s == CUDNN_STATUS_SUCCESS)
    s = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(pack);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendExecute(c.handle, g.plan(), pack);
  cudnnBackendDestroyDescriptor(pack);
  check(s, "cudnnBackendExecute");
}

}  // namespace

bool attention_forward_cudnn(const AttentionParams& p) {
  Graph* g = plan_for(false, p);
  if (!g) return false;
  float scale = p.scale, neg_inf = -INFINITY;
  execute("attention_forward", *g, {kQ, kK, kV, kO, kStats, kScale, kNegInf},
          {const_cast<void*>(p.q), const_cast<void*>(p.k), const_cast<void*>(p.v), p.out, p.lse, &scale, &neg_inf});
  ++g_forward_calls;
  return true;
}

bool attention_backward_cudnn(const AttentionParams& p) {
  if (!aligned16(p.dout) || !aligned16(p.o)) return false;
  Graph* g = plan_for(true, p);
  if (!g) return false;
  // NOTES: cuDNN clears dQ_accum itself from 9.6 on; earlier versions need it zeroed.
  if (cudnnGetVersion() < 90600) memset_zero(p.dq_accum, sizeof(float) * size_t(p.B) * p.T * p.H * p.Dk);
  float scale = p.scale, neg_inf = -INFINITY, one = 1.0f;
  execute("attention_backward", *g,
          {kQ, kK, kV, kO, kDO, kStats, kScale, kNegInf, kOne, kSoftmaxSum, kDQAccum, kDQ, kDK, kDV},
          {const_cast<void*>(p.q), const_cast<void*>(p.k), const_cast<void*>(p.v), const_cast<void*>(p.o),
           const_cast<void*>(p.dout), p.lse, &scale, &neg_inf, &one, p.delta, p.dq_accum, p.dq, p.dk, p.dv});
  ++g_backward_calls;
  return true;
}

std::string attention_cudnn_version() {
  const size_t v = cudnnGetVersion();
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

#else  // no cuDNN in this build: the own kernels serve every call

bool attention_forward_cudnn(const AttentionParams&) { return false; }
bool attention_backward_cudnn(const AttentionParams&) { return false; }
std::string attention_cudnn_version() { return ""; }

#endif

void attention_cudnn_calls(int64_t* forward, int64_t* backward) {
  *forward = g_forward_calls;
  *backward = g_backward_calls;
}

}  // namespace dsa::cuda
