// dsa-eval's evaluation loop, JSON and table (see evaluate.h).
#include "eval/evaluate.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "data/doc_stream.h"

namespace dsa::eval {

namespace {

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Held-out windows of T+1 tokens (inputs: the first T, targets: the last T).
std::vector<std::vector<int32_t>> held_out_windows(const std::string& dir, int64_t T, int64_t want) {
  DocStream s(dir, "val", 0, false);
  const int64_t avail = (s.framed_tokens() - 1) / T;
  DSA_CHECK(avail >= 1, "[eval] ", dir, ": the val split holds ", s.framed_tokens(), " tokens, fewer than one window of ",
            T + 1, " (prepare a larger val split, or a shorter --seq-len)");
  std::vector<std::vector<int32_t>> out;
  std::vector<int32_t> in(static_cast<size_t>(T)), tg(static_cast<size_t>(T));
  for (int64_t i = 0; i < std::min(want, avail); ++i) {
    s.next(T, in.data(), tg.data());
    std::vector<int32_t> w(in);
    w.push_back(tg.back());
    out.push_back(std::move(w));
  }
  return out;
}

// "[eval] 16384 sparse | loss 2/4 | needles 6/20 | 1m05s" on stderr: redrawn on a terminal, every 15 s
// otherwise.
class Progress {
 public:
  explicit Progress(bool on) : on_(on), tty_(::isatty(2) != 0), t0_(now_s()) {}
  void show(const std::string& what, bool force = false) {
    if (!on_) return;
    const double t = now_s();
    if (!force && t - last_ < (tty_ ? 0.5 : 15.0)) return;
    last_ = t;
    const long s = std::lround(t - t0_);
    std::fprintf(stderr, "%s[eval] %s | %ldm%02lds%s", tty_ ? "\r" : "", what.c_str(), s / 60, s % 60, tty_ ? "   " : "\n");
    if (force && tty_) std::fprintf(stderr, "\n");
  }

 private:
  bool on_, tty_;
  double t0_, last_ = -1e9;
};

}  // namespace

const char* mode_name(AttentionMode m) { return m == AttentionMode::Sparse ? "sparse" : "dense"; }

EvalReport evaluate(Model& model, const RetrievalFormat* fmt, const EvalConfig& cfg) {
  EvalReport rep;
  rep.config = cfg;
  Runner runner(model);
  PassOptions base;
  base.topk = cfg.topk;
  base.fp8 = cfg.fp8;
  rep.topk = runner.topk(base);
  const double t0 = now_s();
  auto time_up = [&] { return cfg.time_limit_s > 0 && now_s() - t0 >= cfg.time_limit_s; };
  Progress progress(cfg.progress);
  for (int64_t T : cfg.seq_lens) {
    const int64_t trials = fmt ? cfg.needle_trials : 0;
    const auto windows = held_out_windows(cfg.data, T, std::max<int64_t>({cfg.sequences, trials, 1}));
    for (AttentionMode mode : cfg.modes) {
      ModeResult m;
      m.seq_len = T;
      m.attention = mode;
      m.extrapolation = cfg.training_seq_len > 0 && T > cfg.training_seq_len;
      const double m0 = now_s();
      PassOptions o = base;
      o.attention = mode;
      const std::string head = std::to_string(T) + " " + mode_name(mode);
      const int64_t n_seq = std::min<int64_t>(cfg.sequences, static_cast<int64_t>(windows.size()));
      for (int64_t i = 0; i < n_seq && m.complete; ++i) {
        if (time_up()) {
          m.complete = false;
          break;
        }
        progress.show(head + " | loss " + std::to_string(i) + "/" + std::to_string(n_seq));
        const std::vector<int32_t> in(windows[i].begin(), windows[i].end() - 1), tg(windows[i].begin() + 1, windows[i].end());
        o.quality_rows = i < cfg.quality_sequences ? cfg.quality_rows : 0;
        const PassResult r = runner.pass(in, tg, o);
        add_buckets(m.buckets, r.buckets);
        m.loss_sum += r.loss_sum;
        m.tokens += r.tokens;
        if (m.layers.empty()) m.layers.resize(r.layers.size());
        for (size_t l = 0; l < r.layers.size(); ++l) m.layers[l].add(r.layers[l]);
        m.model_recall_sum += r.model_recall_sum;
        m.model_recall_rows += r.model_recall_rows;
        ++m.sequences;
      }
      o.quality_rows = 0;
      const NextTokenFn next = runner.next_token(o);
      m.correct.assign(cfg.depths.size(), 0);
      m.trials.assign(cfg.depths.size(), 0);
      for (int64_t t = 0; t < trials && m.complete; ++t)
        for (size_t d = 0; d < cfg.depths.size(); ++d) {
          if (time_up()) {
            m.complete = false;
            break;
          }
          progress.show(head + " | needles " + std::to_string(t * cfg.depths.size() + d) + "/" +
                        std::to_string(trials * static_cast<int64_t>(cfg.depths.size())));
          const uint64_t seed = mix(cfg.seed ^ mix(static_cast<uint64_t>(T) * 1000003ull + d * 7919ull + t));
          const Needle n = make_needle(*fmt, windows[t % windows.size()], T, cfg.depths[d], seed);
          m.correct[d] += needle_correct(n, next) ? 1 : 0;
          ++m.trials[d];
        }
      m.seconds = now_s() - m0;
      progress.show(head + (m.complete ? " done" : " stopped by the time limit"), true);
      rep.results.push_back(std::move(m));
      if (time_up()) break;
    }
    if (time_up()) break;
  }
  return rep;
}

nlohmann::json report_json(const EvalReport& r) {
  using nlohmann::json;
  json out = {{"format", "dsa-eval-1"},
              {"data", r.config.data},
              {"topk", r.topk},
              {"indexer_precision", r.config.fp8 ? "fp8" : "bf16"},
              {"training_seq_len", r.config.training_seq_len},
              {"needle_depths", r.config.depths},
              {"seed", r.config.seed}};
  json results = json::array();
  for (const ModeResult& m : r.results) {
    json buckets = json::array();
    for (const Bucket& b : m.buckets)
      buckets.push_back({{"begin", b.begin}, {"end", b.end}, {"tokens", b.tokens}, {"loss", b.mean()}});
    json layers = json::array();
    Quality all;
    for (size_t l = 0; l < m.layers.size(); ++l) {
      const Quality q = m.layers[l].mean();
      all.add(m.layers[l]);
      layers.push_back({{"layer", l}, {"rows", q.rows}, {"recall", q.recall}, {"oracle_recall", q.oracle},
                        {"overlap", q.overlap}, {"kl", q.kl}});
    }
    const Quality a = all.mean();
    json needle = {{"correct", m.correct}, {"trials", m.trials}};
    int64_t c = 0, n = 0;
    json acc = json::array();
    for (size_t d = 0; d < m.trials.size(); ++d) {
      c += m.correct[d], n += m.trials[d];
      acc.push_back(m.trials[d] ? static_cast<double>(m.correct[d]) / static_cast<double>(m.trials[d]) : 0.0);
    }
    needle["accuracy_by_depth"] = acc;
    needle["accuracy"] = n ? json(static_cast<double>(c) / static_cast<double>(n)) : json(nullptr);
    json res = {{"seq_len", m.seq_len},
                {"attention", mode_name(m.attention)},
                {"extrapolation", m.extrapolation},
                {"complete", m.complete},
                {"sequences", m.sequences},
                {"tokens", m.tokens},
                {"loss", m.tokens ? json(m.loss_sum / static_cast<double>(m.tokens)) : json(nullptr)},
                {"loss_by_position", buckets},
                {"needle", needle},
                {"seconds", m.seconds}};
    if (a.rows > 0)
      res["indexer"] = {{"rows_per_layer", m.layers.front().rows}, {"recall", a.recall}, {"oracle_recall", a.oracle},
                        {"overlap", a.overlap}, {"kl", a.kl}, {"layers", layers},
                        {"model_recall_all_rows",
                         m.model_recall_rows ? json(m.model_recall_sum / static_cast<double>(m.model_recall_rows))
                                             : json(nullptr)}};
    results.push_back(res);
  }
  out["results"] = results;
  return out;
}

std::string report_table(const EvalReport& r) {
  // Columns: the nominal position buckets [0, 512), [512, 2K), ... (a context's last bucket is cut at it).
  static const char* kNames[] = {"0-512", "512-2K", "2K-8K", "8K-32K", "32K-128K", "128K-512K", "512K-2M", "2M-8M"};
  auto index = [](const Bucket& b) {
    int i = 0;
    for (int64_t end = 512; b.begin >= end; end *= 4) ++i;
    return i;
  };
  int n = 0;
  for (const ModeResult& m : r.results)
    for (const Bucket& b : m.buckets) n = std::max(n, index(b) + 1);
  n = std::min(n, 8);
  auto num = [](double v, int digits) {
    char b[32];
    std::snprintf(b, sizeof b, "%.*f", digits, v);
    return std::string(b);
  };
  std::ostringstream o;
  o << "| context | attention | loss |";
  for (int i = 0; i < n; ++i) o << " loss " << kNames[i] << " |";
  o << " needle | recall | oracle | overlap | KL |\n|---|---|---|";
  for (int i = 0; i < n; ++i) o << "---|";
  o << "---|---|---|---|---|\n";
  for (const ModeResult& m : r.results) {
    o << "| " << m.seq_len << (m.extrapolation ? " (extrapolation)" : "") << " | " << mode_name(m.attention)
      << (m.complete ? "" : " (cut by the time limit)") << " | "
      << (m.tokens ? num(m.loss_sum / static_cast<double>(m.tokens), 4) : "-") << " |";
    for (int i = 0; i < n; ++i) {
      std::string cell = "-";
      for (const Bucket& b : m.buckets)
        if (index(b) == i && b.tokens > 0) cell = num(b.mean(), 4);
      o << " " << cell << " |";
    }
    int64_t c = 0, t = 0;
    for (size_t d = 0; d < m.trials.size(); ++d) c += m.correct[d], t += m.trials[d];
    o << " " << (t ? num(static_cast<double>(c) / static_cast<double>(t), 3) : "-") << " |";
    Quality all;
    for (const Quality& q : m.layers) all.add(q);
    const Quality a = all.mean();
    if (a.rows > 0)
      o << " " << num(a.recall, 3) << " | " << num(a.oracle, 3) << " | " << num(a.overlap, 3) << " | " << num(a.kl, 3)
        << " |\n";
    else
      o << " - | - | - | - |\n";
  }
  return o.str();
}

}  // namespace dsa::eval
