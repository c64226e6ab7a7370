#include "trainer/checkpoint_sharded.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "trainer/dist.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace dsa {

namespace {

[[noreturn]] void sh_fail(const std::string& path, const std::string& msg) {
  fail("[checkpoint] " + path + ": " + msg);
}

// The dataset of the piece of `key` starting at element `begin` in a shard file.
std::string piece_name(const std::string& key, int64_t begin) { return "piece/" + key + "/" + std::to_string(begin); }

std::string shard_name(int rank) {
  char b[32];
  std::snprintf(b, sizeof b, "shard-%05d.h5", rank);
  return b;
}

void fsync_file(const std::string& p, bool dir) {
  const int fd = ::open(p.c_str(), (dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) sh_fail(p, "cannot open for fsync");
  ::fsync(fd);
  ::close(fd);
}

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    f.close();
    if (!f) sh_fail(tmp, "cannot write");
  }
  fsync_file(tmp, false);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) sh_fail(path, "rename failed");
}

void fail_in_save_hook(int64_t step) {
  const char* at = std::getenv("DSA_FAIL_IN_SAVE");
  if (!at || std::atoll(at) != step) return;
  const char* r = std::getenv("DSA_FAIL_RANK");
  if ((r ? std::atoi(r) : 0) != Dist::rank()) return;
  std::fprintf(stderr, "[rank %d] injected SIGKILL during the sharded save of step %lld (DSA_FAIL_IN_SAVE)\n",
               Dist::rank(), static_cast<long long>(step));
  std::fflush(stderr);
  std::raise(SIGKILL);
}

json state_json(const TrainState& st) {
  return {{"step", st.step},
          {"stage", st.stage},
          {"stage_step", st.stage_step},
          {"rank_data_states", st.rank_data_states},
          {"recipe_yaml", st.recipe_yaml},
          {"model_config_yaml", st.model_config_yaml},
          {"rng_seed", st.rng_seed},
          {"rng_state", st.rng_state}};
}

TrainState state_from_json(const json& j, const std::string& where) {
  TrainState st;
  try {
    st.step = j.at("step").get<int64_t>();
    st.stage = j.at("stage").get<std::string>();
    st.stage_step = j.at("stage_step").get<int64_t>();
    st.rank_data_states = j.at("rank_data_states").get<std::vector<std::string>>();
    st.recipe_yaml = j.at("recipe_yaml").get<std::string>();
    st.model_config_yaml = j.at("model_config_yaml").get<std::string>();
    st.rng_seed = j.at("rng_seed").get<uint64_t>();
    st.rng_state = j.at("rng_state").get<std::vector<uint64_t>>();
  } catch (const json::exception& e) {
    sh_fail(where, std::string("'state' is malformed: ") + e.what());
  }
  if (st.model_config_yaml.empty()) sh_fail(where, "'state.model_config_yaml' is empty");
  return st;
}

// One rank's piece table: [[key, shape, group, begin, end], ...].
json piece_table(const std::vector<StatePiece>& mine) {
  json t = json::array();
  for (const StatePiece& p : mine) t.push_back({p.key, p.shape, p.group, p.begin, p.begin + p.data.numel()});
  return t;
}

}  // namespace

std::string save_sharded_checkpoint(const std::string& dir, const TrainState& st, const std::vector<StatePiece>& mine,
                                    int keep_last) {
  char name[64];
  std::snprintf(name, sizeof name, "ckpt-%08lld", static_cast<long long>(st.step));
  const std::string tmp = dir + "/" + name + ".tmp", target = dir + "/" + name;
  std::error_code ec;
  if (Dist::is_root()) {
    fs::create_directories(dir);
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp);
  }
  Dist::barrier();
  // This rank's shard: every piece as /piece/<key>/<begin>.
  std::map<std::string, Tensor> extra;
  for (const StatePiece& p : mine) {
    DSA_CHECK(p.data.dtype() == DType::F32 && p.data.ndim() == 1, "[checkpoint] piece ", p.key,
              ": f32 1-D data expected, got ", p.data.desc());
    DSA_CHECK(extra.emplace(piece_name(p.key, p.begin), p.data).second, "[checkpoint] two pieces of ", p.key,
              " start at element ", p.begin, " on rank ", Dist::rank());
  }
  write_checkpoint_file(tmp + "/" + shard_name(Dist::rank()), st, ParamStore{}, extra);
  fail_in_save_hook(st.step);
  const std::vector<std::string> tables = Dist::allgather(piece_table(mine).dump());
  if (Dist::is_root()) {
    json index = {{"format", "dsa-checkpoint-sharded"}, {"format_version", kShardedFormatVersion},
                  {"step", st.step}, {"stage", st.stage}, {"stage_step", st.stage_step}, {"state", state_json(st)}};
    json files = json::array(), tensors = json::object();
    for (size_t r = 0; r < tables.size(); ++r) {
      files.push_back(shard_name(static_cast<int>(r)));
      for (const json& e : json::parse(tables[r])) {
        json& t = tensors[e[0].get<std::string>()];
        if (t.is_null()) t = {{"shape", e[1]}, {"group", e[2]}, {"pieces", json::array()}};
        t["pieces"].push_back({static_cast<int64_t>(r), e[3], e[4]});
      }
    }
    for (auto& [key, t] : tensors.items()) {
      auto& pcs = t["pieces"];
      std::sort(pcs.begin(), pcs.end(), [](const json& a, const json& b) { return a[1] < b[1]; });
    }
    index["files"] = files;
    index["tensors"] = tensors;
    write_text_atomically(tmp + "/" + kShardedIndexName, index.dump(1));
    fsync_file(tmp, true);
    if (fs::exists(target)) {
      // The same step saved again (a rerun into the same directory): the old one moves aside first.
      const std::string old = target + ".old.tmp";
      fs::remove_all(old, ec);
      fs::rename(target, old);
    }
    fs::rename(tmp, target);
    fsync_file(dir, true);
    commit_latest(dir, name, keep_last);
  }
  Dist::barrier();
  return target;
}

// ---------------------------------------------------------------------------------------- reading

struct CheckpointSource::Impl {
  std::string path;
  bool sharded = false;
  TrainState state;
  // single file
  std::unique_ptr<CheckpointFile> file;
  // sharded
  struct Piece {
    int64_t file, begin, end;
  };
  struct Entry {
    Shape shape;
    std::string group;
    std::vector<Piece> pieces;  // by begin, covering [0, numel)
  };
  std::map<std::string, Entry> entries;
  std::vector<std::string> file_names;
  json index;
  mutable std::vector<std::unique_ptr<CheckpointFile>> open;

  const CheckpointFile& shard(int64_t f) const {
    if (!open[f]) open[f] = std::make_unique<CheckpointFile>(path + "/" + file_names[f]);
    return *open[f];
  }

  void read_index() {
    const std::string ip = path + "/" + kShardedIndexName;
    std::ifstream in(ip);
    if (!in) sh_fail(ip, "cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    json ix;
    try {
      ix = json::parse(ss.str());
    } catch (const json::exception& e) {
      sh_fail(ip, std::string("not valid JSON: ") + e.what());
    }
    auto need = [&](const json& j, const char* key, bool (json::*is)() const, const char* what) -> const json& {
      if (!j.is_object() || !j.contains(key) || !(j.at(key).*is)())
        sh_fail(ip, std::string("key '") + key + "' must be " + what);
      return j.at(key);
    };
    if (need(ix, "format", &json::is_string, "a string").get<std::string>() != "dsa-checkpoint-sharded")
      sh_fail(ip, "format is not 'dsa-checkpoint-sharded'");
    const int64_t v = need(ix, "format_version", &json::is_number_integer, "an integer").get<int64_t>();
    if (v < 1 || v > kShardedFormatVersion)
      sh_fail(ip, "format_version " + std::to_string(v) + " is not supported (this build reads 1.." +
                      std::to_string(kShardedFormatVersion) + ")");
    for (const json& f : need(ix, "files", &json::is_array, "a list of file names")) {
      if (!f.is_string() || f.get<std::string>().find('/') != std::string::npos || f.get<std::string>().empty())
        sh_fail(ip, "'files' entries must be plain file names");
      file_names.push_back(f.get<std::string>());
    }
    if (file_names.empty()) sh_fail(ip, "'files' is empty");
    state = state_from_json(need(ix, "state", &json::is_object, "an object"), ip);
    index = ix;
    open.resize(file_names.size());
    for (const auto& [key, t] : need(ix, "tensors", &json::is_object, "an object").items()) {
      const std::string where = "tensor '" + key + "'";
      Entry e;
      for (const json& d : need(t, "shape", &json::is_array, "a list")) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > (1ll << 40))
          sh_fail(ip, where + ": bad shape");
        e.shape.push_back(d.get<int64_t>());
      }
      e.group = need(t, "group", &json::is_string, "a string").get<std::string>();
      int64_t covered = 0;
      for (const json& p : need(t, "pieces", &json::is_array, "a list")) {
        if (!p.is_array() || p.size() != 3 || !p[0].is_number_integer() || !p[1].is_number_integer() ||
            !p[2].is_number_integer())
          sh_fail(ip, where + ": a piece must be [file, begin, end]");
        Piece pc{p[0].get<int64_t>(), p[1].get<int64_t>(), p[2].get<int64_t>()};
        if (pc.file < 0 || pc.file >= static_cast<int64_t>(file_names.size()))
          sh_fail(ip, where + ": piece names file " + std::to_string(pc.file) + " of " +
                          std::to_string(file_names.size()));
        if (pc.begin != covered || pc.end <= pc.begin)
          sh_fail(ip, where + ": pieces must cover the tensor in order without gaps or overlaps (piece [" +
                          std::to_string(pc.begin) + ", " + std::to_string(pc.end) + ") after element " +
                          std::to_string(covered) + ")");
        covered = pc.end;
        e.pieces.push_back(pc);
      }
      if (covered != shape_numel(e.shape))
        sh_fail(ip, where + ": pieces cover " + std::to_string(covered) + " of " +
                        std::to_string(shape_numel(e.shape)) + " elements");
      entries.emplace(key, std::move(e));
    }
  }
};

bool is_sharded_checkpoint(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode) &&
         ::stat((p + "/" + kShardedIndexName).c_str(), &st) == 0;
}

CheckpointSource::CheckpointSource(const std::string& path_or_dir) : impl_(std::make_unique<Impl>()) {
  impl_->path = resolve_checkpoint(path_or_dir);
  impl_->sharded = is_sharded_checkpoint(impl_->path);
  if (impl_->sharded) {
    impl_->read_index();
  } else {
    impl_->file = std::make_unique<CheckpointFile>(impl_->path);
    impl_->state = impl_->file->state();
  }
}

CheckpointSource::~CheckpointSource() = default;
const std::string& CheckpointSource::path() const { return impl_->path; }
bool CheckpointSource::sharded() const { return impl_->sharded; }
int64_t CheckpointSource::files() const { return impl_->sharded ? static_cast<int64_t>(impl_->file_names.size()) : 1; }
const TrainState& CheckpointSource::state() const { return impl_->state; }

ModelConfig CheckpointSource::config() const {
  YAML::Node node;
  try {
    node = YAML::Load(impl_->state.model_config_yaml);
  } catch (const YAML::Exception& e) {
    sh_fail(impl_->path, "the stored model config does not parse: " + e.msg);
  }
  return ModelConfig::from_yaml(node, impl_->path + ":/meta/model_config_yaml", /*strict=*/true);
}

std::vector<std::string> CheckpointSource::keys() const {
  if (!impl_->sharded) return impl_->file->datasets();
  std::vector<std::string> out;
  for (const auto& kv : impl_->entries) out.push_back(kv.first);
  return out;
}

bool CheckpointSource::has(const std::string& key) const {
  return impl_->sharded ? impl_->entries.count(key) > 0 : impl_->file->has(key);
}

Shape CheckpointSource::shape(const std::string& key) const {
  if (!impl_->sharded) return impl_->file->shape(key);
  auto it = impl_->entries.find(key);
  if (it == impl_->entries.end()) sh_fail(impl_->path, "no tensor '" + key + "'");
  return it->second.shape;
}

Tensor CheckpointSource::read(const std::string& key, int64_t begin, int64_t end) const {
  const Shape sh = shape(key);
  const int64_t numel = shape_numel(sh);
  if (begin < 0 || begin > end || end > numel)
    sh_fail(impl_->path, "tensor '" + key + "': elements [" + std::to_string(begin) + ", " + std::to_string(end) +
                             ") outside its " + std::to_string(numel));
  auto f32 = [](Tensor t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); };
  if (!impl_->sharded) {
    // Whole rows of the stored tensor, then the range within them.
    const int64_t row = sh.empty() || sh[0] == 0 ? 1 : numel / sh[0];
    const int64_t r0 = begin / row, r1 = (end + row - 1) / row;
    Tensor rows = sh.empty() ? impl_->file->read(key) : impl_->file->read_rows(key, r0, r1);
    return f32(rows).view({-1}).slice_rows(begin - r0 * row, end - r0 * row);
  }
  Tensor out = Tensor::empty({end - begin}, DType::F32);
  for (const Impl::Piece& p : impl_->entries.at(key).pieces) {
    const int64_t a = std::max(begin, p.begin), e = std::min(end, p.end);
    if (a >= e) continue;
    const CheckpointFile& f = impl_->shard(p.file);
    const std::string ds = piece_name(key, p.begin);
    const Shape ps = f.shape(ds);
    if (ps.size() != 1 || ps[0] != p.end - p.begin)
      sh_fail(f.path(), "dataset '" + ds + "' has shape " + shape_str(ps) + ", the index says [" +
                            std::to_string(p.end - p.begin) + "]");
    Tensor dst = out.slice_rows(a - begin, e - begin);
    dst.copy_from(f32(f.read_rows(ds, a - p.begin, e - p.begin)));
  }
  return out;
}

std::string relink_sharded_checkpoint(const std::string& src_dir, const std::string& out_dir, const TrainState& st) {
  CheckpointSource src(src_dir);
  DSA_CHECK(src.sharded(), "[checkpoint] ", src.path(), " is not a sharded checkpoint");
  char name[64];
  std::snprintf(name, sizeof name, "ckpt-%08lld", static_cast<long long>(st.step));
  const std::string tmp = out_dir + "/" + name + ".tmp", target = out_dir + "/" + name;
  std::error_code ec;
  fs::create_directories(out_dir);
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);
  for (const std::string& f : src.impl_->file_names) {
    fs::create_hard_link(fs::path(src.path()) / f, fs::path(tmp) / f, ec);
    if (ec) fs::copy_file(fs::path(src.path()) / f, fs::path(tmp) / f, fs::copy_options::overwrite_existing);
  }
  json index = src.impl_->index;
  index["step"] = st.step;
  index["stage"] = st.stage;
  index["stage_step"] = st.stage_step;
  index["state"] = state_json(st);
  write_text_atomically(tmp + "/" + kShardedIndexName, index.dump(1));
  fsync_file(tmp, true);
  fs::remove_all(target, ec);
  fs::rename(tmp, target);
  commit_latest(out_dir, name, 0);
  return target;
}

Checkpoint load_sharded_checkpoint(const std::string& dir, bool optimizer_state) {
  CheckpointSource src(dir);
  Checkpoint c;
  c.path = src.path();
  c.state = src.state();
  c.cfg = src.config();
  c.params = make_params(c.cfg, DType::F32);
  for (Param& p : c.params.all()) {
    const std::string key = "params/" + p.name;
    if (!src.has(key)) sh_fail(c.path, "missing tensor '" + p.name + "' (" + p.value.desc() + ")");
    if (src.shape(key) != p.value.shape())
      sh_fail(c.path, "tensor '" + p.name + "' has shape " + shape_str(src.shape(key)) +
                          " but the model config needs " + shape_str(p.value.shape()));
    p.value.copy_from(src.read(key, 0, p.value.numel()).view(p.value.shape()));
  }
  for (const std::string& key : src.keys()) {
    if (key.rfind("params/", 0) == 0) {
      if (!c.params.has(key.substr(7)))
        sh_fail(c.path, "tensor '" + key.substr(7) + "' is not a parameter of the stored model config");
      continue;
    }
    if (!optimizer_state && key.rfind("optim/", 0) == 0) continue;
    const Shape s = src.shape(key);
    c.extra[key] = src.read(key, 0, shape_numel(s)).view(s);
  }
  return c;
}

}  // namespace dsa
