// dsa-eval's figures from plain inputs (definitions in metrics.h).
#include "eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "kernels/cpu_blas.h"
#include "kernels/dsa_ops.h"

namespace dsa::eval {

std::vector<Bucket> position_buckets(int64_t T) {
  std::vector<Bucket> out;
  for (int64_t begin = 0, end = 512; begin < T; begin = end, end *= 4) out.push_back({begin, std::min(end, T)});
  return out;
}

void add_buckets(std::vector<Bucket>& into, const std::vector<Bucket>& b) {
  if (into.empty()) into = std::vector<Bucket>(b.size());
  DSA_CHECK(into.size() == b.size(), "[eval] adding position buckets of different sequence lengths");
  for (size_t i = 0; i < b.size(); ++i) {
    into[i].begin = b[i].begin;
    into[i].end = b[i].end;
    into[i].loss_sum += b[i].loss_sum;
    into[i].tokens += b[i].tokens;
  }
}

void Quality::add(const Quality& o) {
  recall += o.recall, oracle += o.oracle, overlap += o.overlap, kl += o.kl, rows += o.rows;
}

Quality Quality::mean() const {
  if (rows == 0) return {};
  const double n = static_cast<double>(rows);
  return {recall / n, oracle / n, overlap / n, kl / n, rows};
}

std::vector<int64_t> quality_rows(int64_t T, int64_t K, int64_t n, int64_t block) {
  std::vector<int64_t> rows;
  const int64_t first = std::min(std::max<int64_t>(K, 0), T), avail = T - first;
  if (avail <= 0 || n <= 0) return rows;
  if (n >= avail) {
    for (int64_t t = first; t < T; ++t) rows.push_back(t);
    return rows;
  }
  block = std::max<int64_t>(1, std::min(block, n));
  const int64_t blocks = (n + block - 1) / block;
  std::set<int64_t> s;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t size = std::min(block, n - i * block);
    const int64_t start = first + (blocks > 1 ? i * (avail - size) / (blocks - 1) : (avail - size) / 2);
    for (int64_t t = start; t < start + size; ++t) s.insert(t);
  }
  return {s.begin(), s.end()};
}

namespace {

// The quality figures of one row t from p [t+1] (the dense target), I [t+1] and the selection S [K].
Quality row_quality(const float* p, const float* I, int64_t t, const int32_t* sel, int64_t K) {
  const int64_t n = t + 1;
  Quality q;
  q.rows = 1;
  std::vector<int32_t> s(sel, sel + K);
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());  // each key's mass counts once
  s.erase(std::remove_if(s.begin(), s.end(), [&](int32_t v) { return v < 0 || v > t; }), s.end());
  for (int32_t v : s) q.recall += static_cast<double>(p[v]);
  const int64_t k = std::min(K, n);
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
  int64_t common = 0;
  for (int64_t i = 0; i < k; ++i) {
    q.oracle += static_cast<double>(p[order[i]]);
    common += std::binary_search(s.begin(), s.end(), order[i]);
  }
  q.overlap = static_cast<double>(common) / static_cast<double>(k);
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(I[i]));
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(static_cast<double>(I[i]) - m);
  const double log_z = m + std::log(z);
  for (int64_t i = 0; i < n; ++i)
    if (p[i] > 0) q.kl += static_cast<double>(p[i]) * (std::log(static_cast<double>(p[i])) - (I[i] - log_z));
  return q;
}

}  // namespace

Quality indexer_quality(const Tensor& q, const Tensor& k, double scale, const Tensor& qI, const Tensor& kI,
                        const Tensor& wI, bool fp8, const Tensor& indices, const std::vector<int64_t>& rows) {
  const char* op = "[eval] indexer_quality";
  for (const Tensor* t : {&q, &k, &qI, &kI, &wI})
    DSA_CHECK(t->is_cpu() && t->dtype() == DType::F32, op, ": inputs must be f32 on the CPU, got ", t->desc());
  DSA_CHECK(q.ndim() == 3 && k.shape() == q.shape(), op, ": q and k must be [T, H, dk] alike, got ", q.desc(), " and ",
            k.desc());
  const int64_t T = q.size(0), H = q.size(1), dk = q.size(2);
  DSA_CHECK(qI.ndim() == 3 && qI.size(0) == T, op, ": qI must be [T, Hi, di], got ", qI.desc());
  const int64_t Hi = qI.size(1), di = qI.size(2);
  expect_shape(op, "kI", kI, {T, di});
  expect_shape(op, "wI", wI, {T, Hi});
  DSA_CHECK(indices.is_cpu() && indices.dtype() == DType::I32 && indices.ndim() == 2 && indices.size(0) == T, op,
            ": indices must be i32 [T, K] on the CPU, got ", indices.desc());
  const int64_t K = indices.size(1);
  DSA_CHECK(std::is_sorted(rows.begin(), rows.end()) && (rows.empty() || (rows.front() >= 0 && rows.back() < T)), op,
            ": rows must be sorted positions in [0, ", T, ")");
  // The indexer's scoring operands as the selection saw them.
  const Tensor q4 = qI.view({1, T, Hi, di}), k3 = kI.view({1, T, di}), w3 = wI.view({1, T, Hi});
  Tensor qs = q4, ks = k3;
  if (fp8) ops::indexer_fp8_operands(q4, k3, &qs, &ks);
  Quality total;
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const int32_t* ip = indices.data<int32_t>();
  for (size_t i = 0; i < rows.size();) {
    // A run of consecutive rows [t0, t1): one GEMM per head against the keys [0, t1).
    size_t j = i + 1;
    while (j < rows.size() && rows[j] == rows[j - 1] + 1 && j - i < 64) ++j;
    const int64_t t0 = rows[i], t1 = rows[j - 1] + 1, R = t1 - t0;
    std::vector<float> P(static_cast<size_t>(R * t1), 0.0f), S(static_cast<size_t>(R * t1));
    for (int64_t h = 0; h < H; ++h) {
      ops::detail::gemm_rm(false, true, R, t1, dk, scale, qp + (t0 * H + h) * dk, H * dk, kp + h * dk, H * dk, 0.0,
                           S.data(), t1);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = t0 + r;
        float* sr = S.data() + r * t1;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s <= t; ++s) m = std::max(m, sr[s]);
        double z = 0;
        for (int64_t s = 0; s <= t; ++s) z += std::exp(static_cast<double>(sr[s] - m));
        float* pr = P.data() + r * t1;
        for (int64_t s = 0; s <= t; ++s) pr[s] += static_cast<float>(std::exp(static_cast<double>(sr[s] - m)) / z / H);
      }
    }
    const Tensor I = ops::indexer_scores_forward(qs, ks, w3, t0, t1);  // [1, R, T], -inf past the diagonal
    std::vector<Quality> per(static_cast<size_t>(R));
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r)
      per[r] = row_quality(P.data() + r * t1, I.data<float>() + r * T, t0 + r, ip + (t0 + r) * K, K);
    for (const Quality& x : per) total.add(x);
    i = j;
  }
  return total;
}

Needle make_needle(const RetrievalFormat& fmt, const std::vector<int32_t>& haystack, int64_t T, double depth,
                   uint64_t seed) {
  Needle n;
  uint64_t st = seed;
  n.key = RetrievalFormat::random_digits(st, fmt.key_digits());
  n.value = RetrievalFormat::random_digits(st, fmt.value_digits());
  const std::vector<int32_t> fact = fmt.fact(n.key, n.value), prompt = fmt.query_prompt(n.key), ans = fmt.answer(n.value);
  const int64_t hay = T + 1 - static_cast<int64_t>(fact.size() + prompt.size() + ans.size());
  DSA_CHECK(hay >= 0, "[eval] a needle needs more than ", T, " tokens (fact, query and answer take ", T + 1 - hay, ")");
  DSA_CHECK(static_cast<int64_t>(haystack.size()) >= hay, "[eval] needle haystack of ", haystack.size(),
            " tokens, ", hay, " needed");
  DSA_CHECK(depth >= 0 && depth <= 1, "[eval] needle depth must be in [0, 1], got ", depth);
  n.fact_at = std::llround(depth * static_cast<double>(hay));
  n.tokens.assign(haystack.begin(), haystack.begin() + n.fact_at);
  n.tokens.insert(n.tokens.end(), fact.begin(), fact.end());
  n.tokens.insert(n.tokens.end(), haystack.begin() + n.fact_at, haystack.begin() + hay);
  n.tokens.insert(n.tokens.end(), prompt.begin(), prompt.end());
  n.answer_at = static_cast<int64_t>(n.tokens.size());
  n.tokens.insert(n.tokens.end(), ans.begin(), ans.end());
  return n;
}

bool needle_correct(const Needle& n, const NextTokenFn& next_token) {
  const int64_t T = static_cast<int64_t>(n.tokens.size()) - 1;
  std::vector<int64_t> pos;
  for (int64_t a = n.answer_at; a <= T; ++a) pos.push_back(a - 1);  // the input position predicting token a
  const std::vector<int32_t> inputs(n.tokens.begin(), n.tokens.end() - 1);
  const std::vector<int32_t> pred = next_token(inputs, pos);
  DSA_CHECK(pred.size() == pos.size(), "[eval] next-token predictions: ", pred.size(), " for ", pos.size(), " positions");
  for (size_t i = 0; i < pos.size(); ++i)
    if (pred[i] != n.tokens[static_cast<size_t>(pos[i] + 1)]) return false;
  return true;
}

}  // namespace dsa::eval
