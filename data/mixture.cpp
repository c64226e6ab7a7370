// The mixed training stream (selection, rank layout and state described in mixture.h).
#include "data/mixture.h"

#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "data/data_util.h"

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  data_util::fail("[data]", parts...);
}

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_str(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return mix64(h ^ s.size());
}

constexpr const char* kFormat = "dsa-data-2";

}  // namespace

Mixture::Mixture(const MixtureConfig& cfg) : cfg_(cfg) {
  if (cfg.sources.empty()) fail("a data mixture needs at least one source");
  double total = 0;
  for (size_t i = 0; i < cfg.sources.size(); ++i) {
    const SourceSpec& s = cfg.sources[i];
    if (!(s.weight > 0)) fail("source '", s.name, "' (", s.dir, "): weight must be > 0, got ", s.weight);
    for (size_t j = 0; j < i; ++j)
      if (cfg.sources[j].name == s.name) fail("two sources are named '", s.name, "'");
    total += s.weight;
  }
  uint64_t id = hash_str(0xcbf29ce484222325ull, kFormat);
  id = mix64(id ^ cfg.seed) ^ (cfg.keep_documents_contiguous ? 0x5bd1e995ull : 0);
  double acc = 0;
  for (const SourceSpec& s : cfg.sources) {
    streams_.emplace_back(s.dir, "train", hash_str(cfg.seed * 0x9e3779b97f4a7c15ull, s.name), cfg.keep_documents_contiguous);
    const DocStream& d = streams_.back();
    if (d.bos_id() != streams_.front().bos_id() || d.eos_id() != streams_.front().eos_id())
      fail(s.dir, ": BOS/EOS (", d.bos_id(), "/", d.eos_id(), ") differ from ", cfg.sources.front().dir, " (",
           streams_.front().bos_id(), "/", streams_.front().eos_id(), "): tokenize every source with one tokenizer");
    acc += s.weight / total;
    cumulative_.push_back(acc);
    char w[40];
    std::snprintf(w, sizeof w, "%.17g", s.weight);
    id = hash_str(id, s.name + "|" + w + "|" + std::to_string(d.n_docs()) + "|" + std::to_string(d.n_tokens()));
  }
  cumulative_.back() = 1.0;
  pick_seed_ = mix64(cfg.seed ^ 0x6a09e667f3bcc909ull);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(id));
  id_ = hex;
}

int Mixture::source_of(int64_t n) const {
  if (cumulative_.size() == 1) return 0;
  const double u = static_cast<double>(mix64(pick_seed_ + static_cast<uint64_t>(n) * 0x9e3779b97f4a7c15ull) >> 11) *
                   (1.0 / 9007199254740992.0);  // 53 bits -> [0, 1)
  for (size_t s = 0; s < cumulative_.size(); ++s)
    if (u < cumulative_[s]) return static_cast<int>(s);
  return static_cast<int>(cumulative_.size()) - 1;
}

void Mixture::next(int64_t T, int64_t global, int64_t first, int64_t count, std::vector<int32_t>& in,
                   std::vector<int32_t>& tg, std::vector<int>* from) {
  if (first < 0 || count < 0 || first + count > global)
    fail("windows [", first, ", ", first + count, ") outside the ", global, " of this step");
  in.resize(static_cast<size_t>(count * T));
  tg.resize(in.size());
  if (from) from->assign(static_cast<size_t>(count), 0);
  for (int64_t i = 0; i < global; ++i) {
    const int s = source_of(sequences_ + i);
    const int64_t mine = i - first;
    if (mine >= 0 && mine < count) {
      streams_[s].next(T, in.data() + mine * T, tg.data() + mine * T);
      if (from) (*from)[mine] = s;
    } else {
      streams_[s].next(T, nullptr, nullptr);
    }
  }
  sequences_ += global;
}

void Mixture::skip(int64_t T, int64_t global) {
  std::vector<int32_t> none;
  next(T, global, 0, 0, none, none);
}

void Mixture::rewind() {
  for (DocStream& d : streams_) d.seek({0, 0, 0});
  sequences_ = 0;
}

std::string Mixture::state() const {
  nlohmann::json src = nlohmann::json::array();
  for (size_t s = 0; s < streams_.size(); ++s) {
    const StreamPosition p = streams_[s].position();
    src.push_back({{"name", cfg_.sources[s].name}, {"epoch", p.epoch}, {"doc", p.doc}, {"offset", p.offset}});
  }
  return nlohmann::json{{"format", kFormat}, {"stream", id_}, {"sequences", sequences_}, {"sources", src}}.dump();
}

int64_t Mixture::sequences_in(const std::string& state) const {
  try {
    const nlohmann::json j = nlohmann::json::parse(state);
    if (j.value("format", "") != kFormat || j.value("stream", "") != id_) return -1;
    return j.at("sequences").get<int64_t>();
  } catch (const nlohmann::json::exception&) {
    return -1;
  }
}

void Mixture::restore(const std::string& state) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(state);
  } catch (const nlohmann::json::exception& e) {
    fail("restore: the data position is not JSON (", e.what(), "): '", state.substr(0, 80), "'");
  }
  try {
    const std::string format = j.value("format", "");
    if (format != kFormat)
      fail("restore: data position format '", format, "' (this build reads ", kFormat,
           "; a checkpoint of an older build resumes only at a stage boundary)");
    const std::string stream = j.at("stream").get<std::string>();
    if (stream != id_)
      fail("restore: the position belongs to data stream ", stream, ", this recipe's stream is ", id_,
           " (the data sources, their weights, the packing mode or the seed differ)");
    const auto& src = j.at("sources");
    if (src.size() != streams_.size()) fail("restore: ", src.size(), " sources in the position, ", streams_.size(), " here");
    std::vector<StreamPosition> pos(streams_.size());
    for (size_t s = 0; s < streams_.size(); ++s) {
      if (src[s].at("name").get<std::string>() != cfg_.sources[s].name)
        fail("restore: source ", s, " is '", src[s].at("name").get<std::string>(), "' in the position, '",
             cfg_.sources[s].name, "' here");
      pos[s] = {src[s].at("epoch").get<int64_t>(), src[s].at("doc").get<int64_t>(), src[s].at("offset").get<int64_t>()};
    }
    const int64_t n = j.at("sequences").get<int64_t>();
    if (n < 0) fail("restore: negative sequence count ", n);
    for (size_t s = 0; s < streams_.size(); ++s) streams_[s].seek(pos[s]);
    sequences_ = n;
  } catch (const nlohmann::json::exception& e) {
    fail("restore: malformed data position (", e.what(), "): '", state.substr(0, 120), "'");
  }
}

void Mixture::check_vocab(int64_t model_vocab) const {
  for (const DocStream& d : streams_) d.check_vocab(model_vocab);
}

}  // namespace dsa
