// Sharded checkpoints (trainer/checkpoint_sharded.h) in one process: pieces written and assembled back,
// ranges read across pieces and from single files, retention and links, and the index checks that
// name the file and the tensor.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/params.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_sharded.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace dsa;
using dsa::testing::same_bits;
using nlohmann::json;

namespace {

ModelConfig tiny() {
  ModelConfig c = preset_config("tiny");
  return c;
}

std::string temp(const std::string& name) {
  const std::string d = ::testing::TempDir() + "/dsa_sharded_" + std::to_string(::getpid()) + "_" + name;
  fs::remove_all(d);
  return d;
}

TrainState state_at(int64_t step, const ModelConfig& c) {
  TrainState s;
  s.step = step;
  s.stage = "dense";
  s.stage_step = step;
  s.rank_data_states = {"{\"window\":8}", "{\"window\":8}"};
  s.recipe_yaml = "recipe: text\n";
  s.model_config_yaml = c.to_yaml();
  s.rng_seed = 7;
  s.rng_state = {1, 2, 3};
  return s;
}

// Every tensor of ps cut into three uneven pieces, plus the moments of the first two tensors.
std::vector<StatePiece> pieces_of(const ParamStore& ps, std::map<std::string, Tensor>* moments) {
  std::vector<StatePiece> out;
  int k = 0;
  for (const Param& p : ps.all()) {
    const Tensor flat = p.value.view({-1});
    const int64_t n = flat.numel(), a = n / 3, b = n - n / 5;
    std::vector<std::pair<std::string, Tensor>> tensors = {{"params/" + p.name, flat}};
    if (k++ < 2) {
      Tensor m = Tensor::empty({n}, DType::F32);
      for (int64_t i = 0; i < n; ++i) m.set_item(i, 0.001 * static_cast<double>(i) - 1.0);
      (*moments)["optim/m/" + p.name] = m.view(p.shape);
      tensors.push_back({"optim/m/" + p.name, m});
    }
    for (const auto& [key, t] : tensors)
      for (auto [lo, hi] : {std::pair<int64_t, int64_t>{0, a}, {a, b}, {b, n}})
        if (hi > lo) out.push_back({key, p.shape, key[0] == 'p' ? param_group_name(p.group) : "", lo, t.slice_rows(lo, hi)});
  }
  return out;
}


std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST(ShardedCheckpoint, PiecesAssembleToTheWholeTensors) {
  const ModelConfig c = tiny();
  ParamStore ps = make_params(c);
  init_params(ps, c, 11);
  std::map<std::string, Tensor> moments;
  const std::vector<StatePiece> pieces = pieces_of(ps, &moments);
  const std::string dir = temp("assemble");
  const std::string path = save_sharded_checkpoint(dir, state_at(3, c), pieces, 2);
  EXPECT_EQ(fs::path(path).filename().string(), "ckpt-00000003");
  EXPECT_TRUE(is_sharded_checkpoint(path));
  EXPECT_EQ(resolve_checkpoint(dir), path);
  EXPECT_EQ(read_train_state(dir).rank_data_states.size(), 2u);
  Checkpoint back = load_checkpoint(dir);
  for (const Param& p : ps.all()) EXPECT_TRUE(same_bits(p.value, back.params[p.name])) << p.name;
  ASSERT_EQ(back.extra.size(), moments.size());
  for (const auto& [k, t] : moments) EXPECT_TRUE(same_bits(t, back.extra.at(k))) << k;
  EXPECT_TRUE(load_checkpoint(dir, /*optimizer_state=*/false).extra.empty());
  // Any range, across piece boundaries.
  CheckpointSource src(dir);
  const Param& big = ps.get("model.embed_tokens.weight");
  const int64_t n = big.value.numel();
  for (auto [lo, hi] : {std::pair<int64_t, int64_t>{0, n}, {n / 3 - 5, n / 3 + 7}, {n - n / 5 - 1, n}, {17, 18}}) {
    Tensor got = src.read("params/" + big.name, lo, hi);
    EXPECT_TRUE(same_bits(got, big.value.view({-1}).slice_rows(lo, hi))) << lo << ".." << hi;
  }
  // Retention: keep_last 2 keeps the two newest checkpoints.
  save_sharded_checkpoint(dir, state_at(5, c), pieces, 2);
  save_sharded_checkpoint(dir, state_at(7, c), pieces, 2);
  const auto all = list_checkpoints(dir);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].second, "ckpt-00000005");
  EXPECT_EQ(all[1].second, "ckpt-00000007");
  EXPECT_FALSE(fs::exists(dir + "/ckpt-00000003"));
}

TEST(ShardedCheckpoint, LinkedAndRelinkedCopiesLoadTheSame) {
  const ModelConfig c = tiny();
  ParamStore ps = make_params(c);
  init_params(ps, c, 12);
  std::map<std::string, Tensor> moments;
  const std::string dir = temp("link");
  const std::string path = save_sharded_checkpoint(dir, state_at(4, c), pieces_of(ps, &moments), 0);
  const std::string linked = link_checkpoint(path, dir + "/dense/final");
  EXPECT_EQ(resolve_checkpoint(dir + "/dense/final"), linked);
  struct stat a, b;
  ASSERT_EQ(::stat((path + "/shard-00000.h5").c_str(), &a), 0);
  ASSERT_EQ(::stat((linked + "/shard-00000.h5").c_str(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino) << "hard links, no copy";
  TrainState st = state_at(4, c);
  st.rank_data_states = {"{\"window\":8}"};
  const std::string re = relink_sharded_checkpoint(path, dir + "/one", st);
  EXPECT_EQ(read_train_state(re).rank_data_states.size(), 1u);
  EXPECT_EQ(read_train_state(path).rank_data_states.size(), 2u) << "the source is unchanged";
  Checkpoint x = load_checkpoint(path), y = load_checkpoint(re);
  for (const Param& p : x.params.all()) EXPECT_TRUE(same_bits(p.value, y.params[p.name])) << p.name;
}

// A single-file checkpoint through the same reader: ranges read by rows (an HDF5 hyperslab).
TEST(ShardedCheckpoint, SourceReadsRangesOfOneFile) {
  const ModelConfig c = tiny();
  ParamStore ps = make_params(c);
  init_params(ps, c, 13);
  const std::string dir = temp("file");
  const std::string path = save_checkpoint(dir, state_at(2, c), ps, {}, 0);
  CheckpointSource src(path);
  EXPECT_FALSE(src.sharded());
  const Param& p = ps.get("model.layers.0.self_attn.q_b_proj.weight");
  const int64_t row = p.value.size(1);
  for (auto [lo, hi] : {std::pair<int64_t, int64_t>{0, p.value.numel()}, {row + 3, 3 * row - 1}, {5, 6}}) {
    Tensor got = src.read("params/" + p.name, lo, hi);
    EXPECT_TRUE(same_bits(got, p.value.view({-1}).slice_rows(lo, hi))) << lo << ".." << hi;
  }
  EXPECT_NE(error_of([&] { src.read("params/" + p.name, 0, p.value.numel() + 1); }).find("outside its"),
            std::string::npos);
}

// A bad index stops the load with the file and the tensor named.
TEST(ShardedCheckpoint, BadIndexesAreRefusedByName) {
  const ModelConfig c = tiny();
  ParamStore ps = make_params(c);
  init_params(ps, c, 14);
  std::map<std::string, Tensor> moments;
  const std::string dir = temp("bad");
  const std::string path = save_sharded_checkpoint(dir, state_at(1, c), pieces_of(ps, &moments), 0);
  const std::string index = path + "/" + kShardedIndexName;
  std::stringstream ss;
  ss << std::ifstream(index).rdbuf();
  const json good = json::parse(ss.str());
  const std::string key = "params/model.norm.weight";
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = good;
    edit(j);
    std::ofstream(index, std::ios::trunc) << j.dump();
    return error_of([&] { load_checkpoint(path); });
  };
  std::string e = with([&](json& j) { j["tensors"][key]["pieces"][1][1] = j["tensors"][key]["pieces"][1][1].get<int64_t>() + 1; });
  EXPECT_NE(e.find("tensor '" + key + "': pieces must cover the tensor in order"), std::string::npos) << e;
  EXPECT_NE(e.find("index.json"), std::string::npos) << e;
  e = with([&](json& j) { j["tensors"][key]["pieces"][0][0] = 5; });
  EXPECT_NE(e.find("piece names file 5 of 1"), std::string::npos) << e;
  e = with([&](json& j) { j["tensors"][key]["shape"] = {4096}; });
  EXPECT_NE(e.find("pieces cover"), std::string::npos) << e;
  e = with([&](json& j) { j["format"] = "something"; });
  EXPECT_NE(e.find("format is not 'dsa-checkpoint-sharded'"), std::string::npos) << e;
  e = with([&](json& j) { j["format_version"] = 9; });
  EXPECT_NE(e.find("format_version 9 is not supported"), std::string::npos) << e;
  e = with([&](json& j) { j["files"] = {"../../etc/passwd"}; });
  EXPECT_NE(e.find("plain file names"), std::string::npos) << e;
  e = with([&](json& j) { j["state"].erase("model_config_yaml"); });
  EXPECT_NE(e.find("'state' is malformed"), std::string::npos) << e;
  // An index whose piece is longer than the dataset in the shard file.
  e = with([&](json& j) {
    auto& pcs = j["tensors"][key]["pieces"];
    const int64_t end0 = pcs[0][2].get<int64_t>();
    pcs[0][2] = end0 + 1;
    pcs[1][1] = end0 + 1;
  });
  EXPECT_NE(e.find("dataset 'piece/" + key + "/0' has shape"), std::string::npos) << e;
  EXPECT_NE(e.find("shard-00000.h5"), std::string::npos) << e;
  std::ofstream(index, std::ios::trunc) << "{not json";
  e = error_of([&] { load_checkpoint(path); });
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;
}
