#include "trainer/recipe.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "trainer/checkpoint.h"
#include "trainer/recipe_tree.h"

namespace dsa {

const char* to_string(StageKind v) {
  return v == StageKind::dense ? "dense" : v == StageKind::indexer_warmup ? "indexer_warmup" : "sparse";
}
const char* to_string(Schedule v) { return v == Schedule::constant ? "constant" : "cosine"; }
const char* to_string(Attention v) { return v == Attention::dense ? "dense" : "sparse"; }
const char* to_string(IndexerLoss v) {
  return v == IndexerLoss::none ? "none" : v == IndexerLoss::dense ? "dense" : "sparse";
}
const char* to_string(IndexerPrecision v) { return v == IndexerPrecision::fp8 ? "fp8" : "bf16"; }
const char* to_string(TopkOrder v) { return v == TopkOrder::score ? "score" : "index"; }
const char* to_string(OnNonfinite v) { return v == OnNonfinite::skip ? "skip" : "stop"; }
const char* to_string(RunDevice v) { return v == RunDevice::auto_ ? "auto" : v == RunDevice::cpu ? "cpu" : "cuda"; }

namespace {

[[noreturn]] void fail(const std::string& where, const std::string& key, const std::string& msg) {
  throw std::runtime_error("[recipe] " + where + ": key '" + key + "': " + msg);
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string got(const RNode& v) { return v.kind == RNode::Scalar ? "'" + v.scalar + "'" : v.kind_name(); }

int64_t as_int(const RNode& v, const std::string& key) {
  if (v.kind == RNode::Scalar && !v.scalar.empty()) {
    errno = 0;
    char* end = nullptr;
    const long long x = std::strtoll(v.scalar.c_str(), &end, 10);
    if (*end == '\0' && errno == 0) return x;
  }
  fail(v.where, key, "must be an integer, got " + got(v));
}

double as_num(const RNode& v, const std::string& key) {
  if (v.kind == RNode::Scalar && !v.scalar.empty()) {
    char* end = nullptr;
    const double x = std::strtod(v.scalar.c_str(), &end);
    if (*end == '\0' && std::isfinite(x)) return x;
  }
  fail(v.where, key, "must be a number, got " + got(v));
}

bool as_bool(const RNode& v, const std::string& key) {
  if (v.kind == RNode::Scalar) {
    static const std::set<std::string> yes = {"true", "True", "TRUE", "yes", "on"};
    static const std::set<std::string> no = {"false", "False", "FALSE", "no", "off"};
    if (yes.count(v.scalar)) return true;
    if (no.count(v.scalar)) return false;
  }
  fail(v.where, key, "must be true or false, got " + got(v));
}

std::string as_str(const RNode& v, const std::string& key) {
  if (v.kind != RNode::Scalar) fail(v.where, key, "must be a string, got " + got(v));
  return v.scalar;
}

std::vector<std::string> as_str_list(const RNode& v, const std::string& key) {
  if (v.kind == RNode::Scalar) return {v.scalar};
  if (v.kind != RNode::Seq) fail(v.where, key, "must be a path or a list of paths, got " + got(v));
  std::vector<std::string> out;
  for (size_t i = 0; i < v.seq.size(); ++i) out.push_back(as_str(v.seq[i], key + "." + std::to_string(i)));
  return out;
}

template <class E>
E as_enum(const RNode& v, const std::string& key, const std::vector<std::pair<std::string, E>>& options) {
  std::vector<std::string> names;
  for (const auto& [name, value] : options) {
    if (v.kind == RNode::Scalar && v.scalar == name) return value;
    names.push_back(name);
  }
  fail(v.where, key, "must be one of " + join(names) + ", got " + got(v));
}

const std::vector<std::pair<std::string, StageKind>> kKinds = {
    {"dense", StageKind::dense}, {"indexer_warmup", StageKind::indexer_warmup}, {"sparse", StageKind::sparse}};

// A checkpoint file (*.h5) or a checkpoint directory (with `latest` or ckpt-*.h5 files).
bool is_checkpoint_path(const std::string& p) {
  namespace fs = std::filesystem;
  if (p.size() >= 3 && p.compare(p.size() - 3, 3, ".h5") == 0) return true;
  std::error_code ec;
  return fs::is_directory(p, ec) && (fs::exists(fs::path(p) / "latest", ec) || !list_checkpoints(p).empty());
}

std::string sub(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

// Rejects keys outside `allowed`, naming the allowed ones.
void check_keys(const RNode& m, const std::string& path, const std::vector<std::string>& allowed) {
  for (const auto& e : m.map) {
    bool ok = false;
    for (const auto& a : allowed) ok = ok || a == e.key;
    if (!ok) fail(e.key_where, sub(path, e.key), "unknown key; allowed keys: " + join(allowed));
  }
}

const RNode& need_map(const RNode& n, const std::string& key, const std::string& what) {
  if (n.kind != RNode::Map) fail(n.where, key, "must be a mapping (" + what + "), got " + got(n));
  return n;
}

const std::vector<std::string> kStageKeys = {
    "name",        "kind",          "steps",          "seq_len",
    "global_batch", "grad_accum",   "lr_main",        "lr_indexer",
    "warmup_steps", "schedule",     "min_lr_ratio",   "train_main",
    "train_indexer", "attention",   "topk",           "indexer_loss",
    "indexer_loss_coef", "detach_indexer_input", "indexer_precision", "topk_order", "moe_bias_update_rate",
    "seq_balance_loss_alpha", "eval_interval", "eval_batches", "log_interval",
    "init_from", "recompute", "seq_aux", "mtp_loss_weight", "data_stage", "remove"};

bool valid_name(const std::string& n) {
  return !n.empty() &&
         n.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == std::string::npos;
}

// What each kind does (SPEC.md §2) before the stage's own keys apply.
void kind_defaults(StageSpec& s) {
  switch (s.kind) {
    case StageKind::dense:
      s.train_main = true, s.train_indexer = false, s.attention = Attention::dense;
      s.indexer_loss = IndexerLoss::none, s.lr_main = 3e-4, s.lr_indexer = 1e-3;
      break;
    case StageKind::indexer_warmup:
      s.train_main = false, s.train_indexer = true, s.attention = Attention::dense;
      s.indexer_loss = IndexerLoss::dense, s.lr_main = 0, s.lr_indexer = 1e-3;
      s.moe_bias_update_rate = 0, s.seq_balance_loss_alpha = 0;
      break;
    case StageKind::sparse:
      s.train_main = true, s.train_indexer = true, s.attention = Attention::sparse;
      s.indexer_loss = IndexerLoss::sparse, s.lr_main = 7.3e-6, s.lr_indexer = 7.3e-6;
      break;
  }
  s.detach_indexer_input = true;
}

StageSpec read_stage(const RNode& own, const RNode* defaults, int64_t index, const Recipe& r) {
  const std::string path = "stages." + std::to_string(index);
  need_map(own, path, "a stage: name, kind, steps, seq_len, global_batch, ...");
  check_keys(own, path, kStageKeys);
  RNode m = defaults ? *defaults : RNode{};  // stage_defaults first, the stage's own keys win
  m.kind = RNode::Map;
  for (const auto& e : own.map) m.set(e.key, e.value, e.key_where);
  auto key = [&](const char* k) { return path + "." + k; };
  auto where = [&](const char* k) {
    const RNode::Entry* e = m.entry(k);
    return e ? e->key_where : own.where;
  };
  auto required = [&](const char* k) -> const RNode& {
    const RNode* v = m.find(k);
    if (!v) fail(own.where, key(k), "missing (every stage needs name, kind, steps, seq_len, global_batch; "
                                    "set it in the stage or in stage_defaults)");
    return *v;
  };
  StageSpec s;
  s.name = as_str(required("name"), key("name"));
  if (!valid_name(s.name))
    fail(where("name"), key("name"), "must be letters, digits, '_' or '-' (it names folders), got '" + s.name + "'");
  s.kind = as_enum(required("kind"), key("kind"), kKinds);
  kind_defaults(s);
  s.topk = r.model.index_topk;
  s.log_interval = r.logging.log_interval;

  s.steps = as_int(required("steps"), key("steps"));
  s.seq_len = as_int(required("seq_len"), key("seq_len"));
  s.global_batch = as_int(required("global_batch"), key("global_batch"));
  if (auto* v = m.find("grad_accum")) s.grad_accum = as_int(*v, key("grad_accum"));
  if (auto* v = m.find("lr_main")) s.lr_main = as_num(*v, key("lr_main"));
  if (auto* v = m.find("lr_indexer")) s.lr_indexer = as_num(*v, key("lr_indexer"));
  if (auto* v = m.find("warmup_steps")) s.warmup_steps = as_int(*v, key("warmup_steps"));
  if (auto* v = m.find("schedule"))
    s.schedule = as_enum<Schedule>(*v, key("schedule"), {{"constant", Schedule::constant}, {"cosine", Schedule::cosine}});
  if (auto* v = m.find("min_lr_ratio")) s.min_lr_ratio = as_num(*v, key("min_lr_ratio"));
  if (auto* v = m.find("train_main")) s.train_main = as_bool(*v, key("train_main"));
  if (auto* v = m.find("train_indexer")) s.train_indexer = as_bool(*v, key("train_indexer"));
  if (auto* v = m.find("attention"))
    s.attention = as_enum<Attention>(*v, key("attention"), {{"dense", Attention::dense}, {"sparse", Attention::sparse}});
  if (auto* v = m.find("topk")) s.topk = as_int(*v, key("topk"));
  if (auto* v = m.find("indexer_loss"))
    s.indexer_loss = as_enum<IndexerLoss>(
        *v, key("indexer_loss"), {{"none", IndexerLoss::none}, {"dense", IndexerLoss::dense}, {"sparse", IndexerLoss::sparse}});
  if (auto* v = m.find("indexer_loss_coef")) s.indexer_loss_coef = as_num(*v, key("indexer_loss_coef"));
  if (auto* v = m.find("detach_indexer_input")) s.detach_indexer_input = as_bool(*v, key("detach_indexer_input"));
  if (auto* v = m.find("recompute")) s.recompute = as_bool(*v, key("recompute"));
  if (auto* v = m.find("indexer_precision"))
    s.indexer_precision = as_enum<IndexerPrecision>(*v, key("indexer_precision"),
                                                    {{"fp8", IndexerPrecision::fp8}, {"bf16", IndexerPrecision::bf16}});
  if (auto* v = m.find("topk_order"))
    s.topk_order = as_enum<TopkOrder>(*v, key("topk_order"), {{"score", TopkOrder::score}, {"index", TopkOrder::index}});
  // Softmax routing has no correction bias to update: the rate defaults to 0 and any other value is refused.
  const bool softmax = r.model.scoring_func == "softmax";
  if (softmax) s.moe_bias_update_rate = 0;
  if (auto* v = m.find("moe_bias_update_rate")) {
    s.moe_bias_update_rate = as_num(*v, key("moe_bias_update_rate"));
    if (softmax && s.moe_bias_update_rate != 0)
      fail(where("moe_bias_update_rate"), key("moe_bias_update_rate"),
           "must be 0: the model routes with softmax (scoring_func softmax) and has no correction bias to update");
  }
  if (auto* v = m.find("seq_aux")) s.seq_aux = as_bool(*v, key("seq_aux"));
  if (auto* v = m.find("mtp_loss_weight")) {
    s.mtp_loss_weight = as_num(*v, key("mtp_loss_weight"));
    if (s.mtp_loss_weight > 0 && r.model.num_nextn_predict_layers == 0)
      fail(where("mtp_loss_weight"), key("mtp_loss_weight"),
           "must be 0: the model has no MTP layer (num_nextn_predict_layers = 0)");
  }
  if (auto* v = m.find("seq_balance_loss_alpha")) s.seq_balance_loss_alpha = as_num(*v, key("seq_balance_loss_alpha"));
  if (auto* v = m.find("eval_interval")) s.eval_interval = as_int(*v, key("eval_interval"));
  if (auto* v = m.find("eval_batches")) s.eval_batches = as_int(*v, key("eval_batches"));
  if (auto* v = m.find("log_interval")) s.log_interval = as_int(*v, key("log_interval"));
  if (auto* v = m.find("init_from")) s.init_from = as_str(*v, key("init_from"));
  if (auto* v = m.find("data_stage")) s.data_stage = as_str(*v, key("data_stage"));
  if (auto* v = m.find("remove")) s.removed = as_bool(*v, key("remove"));

  // Ranges.
  auto positive = [&](const char* k, int64_t v) {
    if (v <= 0) fail(where(k), key(k), "must be > 0, got " + std::to_string(v));
  };
  auto nonneg = [&](const char* k, double v) {
    if (v < 0) fail(where(k), key(k), "must be >= 0, got " + std::to_string(v));
  };
  positive("steps", s.steps);
  positive("seq_len", s.seq_len);
  positive("global_batch", s.global_batch);
  positive("grad_accum", s.grad_accum);
  positive("log_interval", s.log_interval);
  nonneg("lr_main", s.lr_main);
  nonneg("lr_indexer", s.lr_indexer);
  nonneg("warmup_steps", static_cast<double>(s.warmup_steps));
  nonneg("topk", static_cast<double>(s.topk));
  nonneg("indexer_loss_coef", s.indexer_loss_coef);
  nonneg("moe_bias_update_rate", s.moe_bias_update_rate);
  nonneg("seq_balance_loss_alpha", s.seq_balance_loss_alpha);
  nonneg("mtp_loss_weight", s.mtp_loss_weight);
  nonneg("eval_interval", static_cast<double>(s.eval_interval));
  nonneg("eval_batches", static_cast<double>(s.eval_batches));
  if (s.min_lr_ratio < 0 || s.min_lr_ratio > 1)
    fail(where("min_lr_ratio"), key("min_lr_ratio"), "must be in [0, 1], got " + std::to_string(s.min_lr_ratio));

  // Impossible combinations.
  if (s.seq_len > r.model.max_position_embeddings)
    fail(where("seq_len"), key("seq_len"),
         std::to_string(s.seq_len) + " is longer than the model allows (max_position_embeddings = " +
             std::to_string(r.model.max_position_embeddings) + ")");
  if (s.warmup_steps > s.steps)
    fail(where("warmup_steps"), key("warmup_steps"),
         std::to_string(s.warmup_steps) + " exceeds the stage's steps (" + std::to_string(s.steps) + ")");
  if (s.global_batch % s.grad_accum)
    fail(where("global_batch"), key("global_batch"),
         std::to_string(s.global_batch) + " sequences do not split into grad_accum = " + std::to_string(s.grad_accum) +
             " equal micro-batches");
  if (s.attention == Attention::sparse && s.topk <= 0)
    fail(where("topk"), key("topk"), "must be > 0 with attention: sparse (keys kept per query), got " +
                                         std::to_string(s.topk));
  if (!s.train_main && !s.train_indexer)
    fail(where(s.kind == StageKind::indexer_warmup ? "train_indexer" : "train_main"),
         key(s.kind == StageKind::indexer_warmup ? "train_indexer" : "train_main"),
         "nothing would train: train_main and train_indexer are both false (a " + std::string(to_string(s.kind)) +
             " stage needs at least one of them true)");
  if (s.train_main && s.lr_main <= 0)
    fail(where("lr_main"), key("lr_main"), "must be > 0 when train_main is true, got " + std::to_string(s.lr_main));
  if (s.train_indexer && s.lr_indexer <= 0)
    fail(where("lr_indexer"), key("lr_indexer"),
         "must be > 0 when train_indexer is true, got " + std::to_string(s.lr_indexer));
  if (s.indexer_loss == IndexerLoss::sparse && s.attention != Attention::sparse)
    fail(where("indexer_loss"), key("indexer_loss"),
         "sparse needs attention: sparse (its KL runs over the selected top-k); with attention: dense the allowed "
         "values are none, dense");
  if (s.train_indexer && s.indexer_loss == IndexerLoss::none)
    fail(where("indexer_loss"), key("indexer_loss"),
         "none leaves the indexer without gradients while train_indexer is true; allowed: dense, sparse");
  if (s.train_indexer && s.indexer_loss_coef <= 0)
    fail(where("indexer_loss_coef"), key("indexer_loss_coef"), "must be > 0 when train_indexer is true");
  return s;
}

std::string num(double v) {
  char buf[64];
  for (int prec = 6; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string quote(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

// data: `shards: DIR` (one source named "data") or `sources: [{name, shards, weight}, ...]` (a mixture).
void read_data(const RNode& d, DataSpec& data) {
  check_keys(d, "data", {"shards", "sources", "tokenizer", "keep_documents_contiguous"});
  const RNode* shards = d.find("shards");
  const RNode* sources = d.find("sources");
  if (shards && sources)
    fail(sources->where, "data.sources", "give either data.shards (one corpus) or data.sources (a mixture), not both");
  if (!shards && !sources)
    fail(d.where, "data.shards",
         "missing (the training corpus directory, or data.sources: a list of {name, shards, weight} for a mixture)");
  if (shards) {
    const std::vector<std::string> dirs = as_str_list(*shards, "data.shards");
    if (dirs.empty()) fail(shards->where, "data.shards", "must name at least one directory");
    if (dirs.size() > 1)
      fail(shards->where, "data.shards",
           "must name one corpus directory (several corpora: data.sources, a list of {name, shards, weight})");
    data.sources.push_back({"data", dirs[0], 1.0});
  } else {
    if (sources->kind != RNode::Seq || sources->seq.empty())
      fail(sources->where, "data.sources", "must be a non-empty list of {name, shards, weight}, got " + got(*sources));
    for (size_t i = 0; i < sources->seq.size(); ++i) {
      const std::string path = "data.sources." + std::to_string(i);
      const RNode& e = need_map(sources->seq[i], path, "name, shards, weight");
      check_keys(e, path, {"name", "shards", "weight"});
      DataSource src;
      const RNode* name = e.find("name");
      const RNode* dir = e.find("shards");
      if (!name) fail(e.where, path + ".name", "missing (names the source's validation loss)");
      if (!dir) fail(e.where, path + ".shards", "missing (the source's corpus directory)");
      src.name = as_str(*name, path + ".name");
      if (!valid_name(src.name)) fail(name->where, path + ".name", "must be letters, digits, '_' or '-', got '" + src.name + "'");
      for (const DataSource& o : data.sources)
        if (o.name == src.name) fail(name->where, path + ".name", "'" + src.name + "' names an earlier source too");
      src.shards = as_str(*dir, path + ".shards");
      if (src.shards.empty()) fail(dir->where, path + ".shards", "must not be empty");
      if (const RNode* w = e.find("weight")) {
        src.weight = as_num(*w, path + ".weight");
        if (!(src.weight > 0)) fail(w->where, path + ".weight", "must be > 0, got " + w->scalar);
      }
      data.sources.push_back(src);
    }
  }
  for (const DataSource& src : data.sources) data.shards.push_back(src.shards);
  if (auto* v = d.find("tokenizer")) data.tokenizer = as_str(*v, "data.tokenizer");
  if (auto* v = d.find("keep_documents_contiguous"))
    data.keep_documents_contiguous = as_bool(*v, "data.keep_documents_contiguous");
}

Recipe build_recipe(const RNode& root, const std::string& source, const std::vector<std::string>& overrides) {
  if (root.kind != RNode::Map)
    fail(root.where, "(top level)", "a recipe is a mapping with keys model, data, stages, output_dir, ...");
  check_keys(root, "", {"model", "data", "stages", "stage_defaults", "optimizer", "parallelism", "checkpointing",
                        "logging", "output_dir", "seed", "device"});
  auto required = [&](const char* k) -> const RNode& {
    const RNode* v = root.find(k);
    if (!v) fail(root.where, k, "missing (a recipe needs model, data, stages and output_dir)");
    return *v;
  };
  Recipe r;
  r.source = source;
  r.overrides = overrides;

  // model: inline keys, or the path of a config.json / YAML file, or of a checkpoint (its stored model).
  const RNode& m = required("model");
  if (m.kind == RNode::Scalar) {
    r.model_source = m.scalar;
    try {
      r.model = is_checkpoint_path(m.scalar) ? ModelConfig::from_yaml(YAML::Load(read_train_state(m.scalar).model_config_yaml),
                                                                      m.scalar + ":/meta/model_config_yaml", true)
                                             : ModelConfig::from_file(m.scalar);
    } catch (const std::exception& e) {
      fail(m.where, "model", e.what());
    }
  } else if (m.kind == RNode::Map) {
    r.model_source = "inline";
    try {
      r.model = ModelConfig::from_yaml(to_yaml_node(m), "model", /*strict=*/true);
    } catch (const std::exception& e) {
      // "[config] model: key 'K' ..." -> "[recipe] FILE:LINE: key 'model.K': ..." at K's own line.
      std::string msg = e.what();
      const std::string prefix = "[config] model: ";
      if (msg.compare(0, prefix.size(), prefix) == 0) msg = msg.substr(prefix.size());
      std::string k;
      const auto q = msg.find("key '");
      if (q != std::string::npos) k = msg.substr(q + 5, msg.find('\'', q + 5) - q - 5);
      std::string loc = m.where;
      const RNode* cur = &m;
      std::stringstream ks(k);
      for (std::string seg; cur && std::getline(ks, seg, '.');) {
        const RNode::Entry* en = cur->kind == RNode::Map ? cur->entry(seg) : nullptr;
        if (en) loc = en->key_where;
        cur = en ? &en->value : nullptr;
      }
      fail(loc, k.empty() ? "model" : "model." + k, msg);
    }
  } else {
    fail(m.where, "model", "must be a mapping of model keys or the path of a config.json, got " + got(m));
  }

  // data
  read_data(need_map(required("data"), "data", "shards or sources, tokenizer, keep_documents_contiguous"), r.data);

  // optimizer
  if (auto* o = root.find("optimizer")) {
    need_map(*o, "optimizer", "AdamW settings");
    check_keys(*o, "optimizer",
               {"beta1", "beta2", "eps", "weight_decay", "weight_decay_indexer", "grad_clip", "on_nonfinite"});
    OptimizerSpec& op = r.optimizer;
    auto rd = [&](const char* k, double* dst, double lo, double hi, bool hi_open) {
      const RNode* v = o->find(k);
      if (!v) return;
      *dst = as_num(*v, std::string("optimizer.") + k);
      if (*dst < lo || (hi_open ? *dst >= hi : *dst > hi))
        fail(v->where, std::string("optimizer.") + k,
             "must be in [" + num(lo) + ", " + num(hi) + (hi_open ? ")" : "]") + ", got " + v->scalar);
    };
    rd("beta1", &op.beta1, 0, 1, true);
    rd("beta2", &op.beta2, 0, 1, true);
    rd("eps", &op.eps, 0, 1, false);
    rd("weight_decay", &op.weight_decay, 0, 1e9, false);
    rd("weight_decay_indexer", &op.weight_decay_indexer, 0, 1e9, false);
    rd("grad_clip", &op.grad_clip, 0, 1e30, false);
    if (op.eps <= 0) fail(o->find("eps")->where, "optimizer.eps", "must be > 0");
    if (auto* v = o->find("on_nonfinite"))
      op.on_nonfinite = as_enum<OnNonfinite>(*v, "optimizer.on_nonfinite",
                                             {{"skip", OnNonfinite::skip}, {"stop", OnNonfinite::stop}});
  }

  // parallelism
  if (auto* p = root.find("parallelism")) {
    need_map(*p, "parallelism", "dp, ep, zero, overlap");
    check_keys(*p, "parallelism", {"dp", "ep", "zero", "zero1", "overlap"});
    if (auto* v = p->find("overlap")) r.parallel.overlap = as_bool(*v, "parallelism.overlap");
    if (auto* v = p->find("zero")) {
      r.parallel.zero = as_int(*v, "parallelism.zero");
      if (r.parallel.zero < 0 || r.parallel.zero > 2)
        fail(v->where, "parallelism.zero",
             "must be 0 (off), 1 (optimizer state and fp32 master sharded) or 2 (gradients too), got " +
                 std::to_string(r.parallel.zero));
    }
    if (auto* v = p->find("zero1")) {
      // NOTES: the key of the first ZeRO version, kept so that its recipes and overrides still run.
      const bool z1 = as_bool(*v, "parallelism.zero1");
      if (p->find("zero") && z1 != (r.parallel.zero == 1))
        fail(v->where, "parallelism.zero1",
             std::string(z1 ? "true" : "false") + " contradicts parallelism.zero = " +
                 std::to_string(r.parallel.zero) + " (zero1: true means zero: 1; set one of them)");
      if (z1) r.parallel.zero = 1;
    }
    if (auto* v = p->find("dp")) {
      r.parallel.dp = as_int(*v, "parallelism.dp");
      if (r.parallel.dp < 0) fail(v->where, "parallelism.dp", "must be >= 0 (0: every MPI rank)");
    }
    if (auto* v = p->find("ep")) {
      r.parallel.ep = as_int(*v, "parallelism.ep");
      if (r.parallel.ep < 1) fail(v->where, "parallelism.ep", "must be >= 1");
      if (r.parallel.ep > 1 && r.model.n_routed_experts == 0)
        fail(v->where, "parallelism.ep", "is " + std::to_string(r.parallel.ep) +
                                             " but the model has no routed experts (n_routed_experts = 0)");
      if (r.model.n_routed_experts % r.parallel.ep)
        fail(v->where, "parallelism.ep",
             std::to_string(r.parallel.ep) + " does not divide n_routed_experts = " +
                 std::to_string(r.model.n_routed_experts));
      if (r.parallel.dp > 0 && r.parallel.dp % r.parallel.ep)
        fail(v->where, "parallelism.ep",
             std::to_string(r.parallel.ep) + " does not divide parallelism.dp = " + std::to_string(r.parallel.dp));
    }
  }

  // output_dir, seed, device
  r.output_dir = as_str(required("output_dir"), "output_dir");
  if (r.output_dir.empty()) fail(root.find("output_dir")->where, "output_dir", "must not be empty");
  if (auto* v = root.find("seed")) {
    const int64_t s = as_int(*v, "seed");
    if (s < 0) fail(v->where, "seed", "must be >= 0");
    r.seed = static_cast<uint64_t>(s);
  }
  if (auto* v = root.find("device"))
    r.device = as_enum<RunDevice>(*v, "device", {{"auto", RunDevice::auto_}, {"cpu", RunDevice::cpu}, {"cuda", RunDevice::cuda}});

  // checkpointing
  r.checkpoint.dir = r.output_dir + "/checkpoints";
  if (auto* c = root.find("checkpointing")) {
    need_map(*c, "checkpointing", "dir, every_steps, keep_last, time_limit_s, save");
    check_keys(*c, "checkpointing", {"dir", "every_steps", "keep_last", "time_limit_s", "save"});
    if (auto* v = c->find("save")) r.checkpoint.save = as_bool(*v, "checkpointing.save");
    if (auto* v = c->find("dir")) r.checkpoint.dir = as_str(*v, "checkpointing.dir");
    if (auto* v = c->find("every_steps")) {
      r.checkpoint.every_steps = as_int(*v, "checkpointing.every_steps");
      if (r.checkpoint.every_steps < 0) fail(v->where, "checkpointing.every_steps", "must be >= 0 (0: stage ends only)");
    }
    if (auto* v = c->find("keep_last")) {
      r.checkpoint.keep_last = as_int(*v, "checkpointing.keep_last");
      if (r.checkpoint.keep_last < 1) fail(v->where, "checkpointing.keep_last", "must be >= 1");
    }
    if (auto* v = c->find("time_limit_s")) {
      r.checkpoint.time_limit_s = as_num(*v, "checkpointing.time_limit_s");
      if (r.checkpoint.time_limit_s < 0) fail(v->where, "checkpointing.time_limit_s", "must be >= 0 (0: no limit)");
    }
  }

  // logging (before the stages: it supplies their default log_interval)
  if (auto* l = root.find("logging")) {
    need_map(*l, "logging", "log_interval, metrics_file, terminal");
    check_keys(*l, "logging", {"log_interval", "metrics_file", "terminal"});
    if (auto* v = l->find("log_interval")) {
      r.logging.log_interval = as_int(*v, "logging.log_interval");
      if (r.logging.log_interval <= 0) fail(v->where, "logging.log_interval", "must be > 0");
    }
    if (auto* v = l->find("metrics_file")) {
      r.logging.metrics_file = as_str(*v, "logging.metrics_file");
      if (r.logging.metrics_file.empty()) fail(v->where, "logging.metrics_file", "must not be empty");
    }
    if (auto* v = l->find("terminal")) r.logging.terminal = as_bool(*v, "logging.terminal");
  }

  // stages
  const RNode* defaults = root.find("stage_defaults");
  if (defaults) {
    need_map(*defaults, "stage_defaults", "stage keys shared by every stage");
    std::vector<std::string> keys(kStageKeys.begin() + 1, kStageKeys.end() - 1);  // all but name and remove
    check_keys(*defaults, "stage_defaults", keys);
  }
  const RNode& st = required("stages");
  if (st.kind != RNode::Seq || st.seq.empty())
    fail(st.where, "stages", "must be a non-empty list of stages, got " + got(st));
  auto name_where = [&](size_t i) {
    return st.seq[i].entry("name") ? st.seq[i].entry("name")->key_where : st.seq[i].where;
  };
  for (size_t i = 0; i < st.seq.size(); ++i) {
    StageSpec s = read_stage(st.seq[i], defaults, static_cast<int64_t>(i), r);
    for (const auto& prev : r.planned)
      if (prev.name == s.name)
        fail(name_where(i), "stages." + std::to_string(i) + ".name", "'" + s.name + "' is already the name of an earlier stage");
    if (!s.removed && r.parallel.dp > 0 && s.global_batch % (r.parallel.dp * s.grad_accum))
      fail(st.seq[i].where, "stages." + std::to_string(i) + ".global_batch",
           std::to_string(s.global_batch) + " sequences do not split into parallelism.dp = " +
               std::to_string(r.parallel.dp) + " ranks x grad_accum = " + std::to_string(s.grad_accum));
    r.planned.push_back(s);
    if (!s.removed) r.stages.push_back(s);
  }
  if (r.stages.empty()) fail(st.where, "stages", "every stage is removed: nothing would run");
  std::vector<std::string> names;
  for (const StageSpec& s : r.planned) names.push_back(s.name);
  for (size_t i = 0; i < r.planned.size(); ++i) {
    const std::string& ds = r.planned[i].data_stage;
    if (ds.empty()) continue;
    bool found = false;
    for (const std::string& n : names) found = found || n == ds;
    const RNode::Entry* e = st.seq[i].entry("data_stage");
    if (!found)
      fail(e ? e->key_where : (defaults ? defaults->where : st.seq[i].where), "stages." + std::to_string(i) + ".data_stage",
           "no stage '" + ds + "' in the data plan; stages: " + join(names));
  }
  r.resolved_yaml = r.to_yaml();
  return r;
}

}  // namespace

int64_t StageSpec::micro_batch(int64_t dp) const {
  if (dp <= 0 || grad_accum <= 0 || global_batch % (dp * grad_accum))
    throw std::runtime_error("[recipe] stage '" + name + "': global_batch " + std::to_string(global_batch) +
                             " does not split into dp " + std::to_string(dp) + " ranks x grad_accum " +
                             std::to_string(grad_accum) + " equal micro-batches");
  return global_batch / (dp * grad_accum);
}

int64_t Recipe::stage_index(const std::string& name) const {
  for (const StageSpec& p : planned)
    if (p.name == name && p.removed)
      throw std::runtime_error("[recipe] " + source + ": stage '" + name +
                               "' is removed in this recipe (it keeps its place in the data plan only)");
  std::vector<std::string> names;
  for (size_t i = 0; i < stages.size(); ++i) {
    if (stages[i].name == name) return static_cast<int64_t>(i);
    names.push_back(stages[i].name);
  }
  throw std::runtime_error("[recipe] " + source + ": no stage '" + name + "'; stages: " + join(names));
}

const StageSpec& Recipe::stage(const std::string& name) const { return stages[stage_index(name)]; }

std::string Recipe::metrics_path() const { return output_dir + "/" + logging.metrics_file; }

std::string Recipe::final_checkpoint(const std::string& stage_name) const {
  stage_index(stage_name);  // throws for an unknown stage
  return checkpoint.dir + "/" + stage_name + "/final";
}

std::string Recipe::to_yaml() const {
  std::ostringstream o;
  o << "# resolved recipe (source: " << source << ")\n";
  for (const auto& ov : overrides) o << "# override: " << ov << "\n";
  o << "model:";
  if (model_source != "inline") o << "  # read from " << model_source;
  o << "\n";
  std::istringstream mi(model.to_yaml());
  for (std::string line; std::getline(mi, line);) o << "  " << line << "\n";
  o << "data:\n  sources:\n";
  for (const DataSource& src : data.sources)
    o << "    - {name: " << src.name << ", shards: " << quote(src.shards) << ", weight: " << num(src.weight) << "}\n";
  o << "  tokenizer: " << quote(data.tokenizer)
    << "\n  keep_documents_contiguous: " << (data.keep_documents_contiguous ? "true" : "false") << "\n";
  o << "stages:\n";
  for (const StageSpec& s : planned) {
    o << "  - name: " << s.name << "\n";
    if (s.removed) o << "    remove: true\n";
    if (!s.data_stage.empty()) o << "    data_stage: " << s.data_stage << "\n";
    o << "    kind: " << to_string(s.kind) << "\n    steps: " << s.steps
      << "\n    seq_len: " << s.seq_len << "\n    global_batch: " << s.global_batch
      << "\n    grad_accum: " << s.grad_accum << "\n    lr_main: " << num(s.lr_main)
      << "\n    lr_indexer: " << num(s.lr_indexer) << "\n    warmup_steps: " << s.warmup_steps
      << "\n    schedule: " << to_string(s.schedule) << "\n    min_lr_ratio: " << num(s.min_lr_ratio)
      << "\n    train_main: " << (s.train_main ? "true" : "false")
      << "\n    train_indexer: " << (s.train_indexer ? "true" : "false")
      << "\n    attention: " << to_string(s.attention) << "\n    topk: " << s.topk
      << "\n    indexer_loss: " << to_string(s.indexer_loss) << "\n    indexer_loss_coef: " << num(s.indexer_loss_coef)
      << "\n    detach_indexer_input: " << (s.detach_indexer_input ? "true" : "false")
      << "\n    recompute: " << (s.recompute ? "true" : "false")
      << "\n    indexer_precision: " << to_string(s.indexer_precision)
      << "\n    topk_order: " << to_string(s.topk_order)
      << "\n    moe_bias_update_rate: " << num(s.moe_bias_update_rate)
      << "\n    seq_balance_loss_alpha: " << num(s.seq_balance_loss_alpha)
      << "\n    seq_aux: " << (s.seq_aux ? "true" : "false") << "\n    mtp_loss_weight: " << num(s.mtp_loss_weight)
      << "\n    eval_interval: " << s.eval_interval << "\n    eval_batches: " << s.eval_batches
      << "\n    log_interval: " << s.log_interval << "\n    init_from: " << quote(s.init_from) << "\n";
  }
  o << "optimizer:\n  beta1: " << num(optimizer.beta1) << "\n  beta2: " << num(optimizer.beta2)
    << "\n  eps: " << num(optimizer.eps) << "\n  weight_decay: " << num(optimizer.weight_decay)
    << "\n  weight_decay_indexer: " << num(optimizer.weight_decay_indexer)
    << "\n  grad_clip: " << num(optimizer.grad_clip) << "\n  on_nonfinite: " << to_string(optimizer.on_nonfinite)
    << "\n";
  o << "parallelism:\n  dp: " << parallel.dp << "\n  ep: " << parallel.ep
    << "\n  zero: " << parallel.zero << "\n  overlap: " << (parallel.overlap ? "true" : "false") << "\n";
  o << "checkpointing:\n";
  if (checkpoint.dir != output_dir + "/checkpoints") o << "  dir: " << quote(checkpoint.dir) << "\n";
  o << "  every_steps: " << checkpoint.every_steps << "\n  keep_last: " << checkpoint.keep_last
    << "\n  time_limit_s: " << num(checkpoint.time_limit_s) << "\n";
  if (!checkpoint.save) o << "  save: false\n";
  o << "logging:\n  log_interval: " << logging.log_interval << "\n  metrics_file: " << quote(logging.metrics_file)
    << "\n  terminal: " << (logging.terminal ? "true" : "false") << "\n";
  o << "output_dir: " << quote(output_dir) << "\nseed: " << seed << "\ndevice: " << to_string(device) << "\n";
  return o.str();
}

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  RNode root = load_tree(path);
  for (const auto& ov : overrides) apply_override(root, ov);
  return build_recipe(root, path, overrides);
}

Recipe parse_recipe(const std::string& text, const std::string& source, const std::vector<std::string>& overrides) {
  RNode root = load_tree_text(text, source);
  for (const auto& ov : overrides) apply_override(root, ov);
  return build_recipe(root, source, overrides);
}

bool stage_trains(const StageSpec& st, const ModelConfig& cfg, const std::string& name, ParamGroup g) {
  if (st.mtp_loss_weight == 0 && is_mtp_param(cfg, name)) return false;
  return (g == ParamGroup::Main && st.train_main) || (g == ParamGroup::Indexer && st.train_indexer);
}

}  // namespace dsa
