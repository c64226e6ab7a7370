// HDF5 training checkpoints: exact round trip, latest pointer and retention, kill -9 during a save,
// truncated and mismatched files.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "model/hf_io.h"
#include "tests/ckpt/ckpt_util.h"
#include "tests/test_util.h"
#include "trainer/checkpoint.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

struct Fixture {
  ModelConfig cfg = preset_config("tiny");
  ParamStore params;
  std::map<std::string, Tensor> extra;
  TrainState state;
  explicit Fixture(uint64_t seed) {
    params = make_params(cfg);
    init_params(params, cfg, seed);
    for (const Param& p : params.all()) {
      if (p.group == ParamGroup::Buffer) continue;
      extra["optim/m/" + p.name] = randn(p.value.shape(), seed + 1, 1e-3, DType::F32);
      extra["optim/v/" + p.name] = randn(p.value.shape(), seed + 2, 1e-6, DType::F32);
    }
    extra["optim/step_bf16"] = Tensor::full({3}, DType::BF16, 1.5);
    state.step = static_cast<int64_t>(seed) * 10;
    state.stage = "sparse";
    state.stage_step = 17;
    state.rank_data_states = {"shard=3 offset=12345", "shard=4 offset=0", ""};
    state.recipe_yaml = "stages:\n  - name: sparse\n    steps: 100\n";
    state.model_config_yaml = cfg.to_yaml();
    state.rng_seed = 0xdeadbeefcafef00dull;
    state.rng_state = {1, 0xffffffffffffffffull, 42};
  }
};

void expect_same(const Fixture& f, const Checkpoint& c) {
  EXPECT_EQ(c.state.step, f.state.step);
  EXPECT_EQ(c.state.stage, f.state.stage);
  EXPECT_EQ(c.state.stage_step, f.state.stage_step);
  EXPECT_EQ(c.state.rank_data_states, f.state.rank_data_states);
  EXPECT_EQ(c.state.recipe_yaml, f.state.recipe_yaml);
  EXPECT_EQ(c.state.model_config_yaml, f.state.model_config_yaml);
  EXPECT_EQ(c.state.rng_seed, f.state.rng_seed);
  EXPECT_EQ(c.state.rng_state, f.state.rng_state);
  EXPECT_EQ(c.cfg.to_yaml(), f.cfg.to_yaml());
  ASSERT_EQ(c.params.size(), f.params.size());
  for (const Param& p : f.params.all()) {
    const Param& q = c.params.get(p.name);
    EXPECT_TRUE(same_bits(p.value, q.value)) << p.name;
    EXPECT_EQ(p.group, q.group);
  }
  ASSERT_EQ(c.extra.size(), f.extra.size());
  for (const auto& [k, t] : f.extra) EXPECT_TRUE(same_bits(t, c.extra.at(k))) << k;
}

}  // namespace

TEST(Checkpoint, RoundTripIsExact) {
  ScratchDir dir;
  Fixture f(3);
  const std::string path = save_checkpoint(dir / "run", f.state, f.params, f.extra);
  EXPECT_EQ(path, dir / "run/ckpt-00000030.h5");
  EXPECT_EQ(read_bytes_file(dir / "run/latest"), "ckpt-00000030.h5\n");
  Checkpoint c = load_checkpoint(dir / "run");
  EXPECT_EQ(c.path, path);
  expect_same(f, c);
  // Into an existing store of another dtype: converted values, same shapes.
  ParamStore p64 = make_params(f.cfg, DType::F64);
  std::map<std::string, Tensor> ex;
  TrainState st;
  load_checkpoint_into(path, &st, p64, &ex);
  EXPECT_EQ(st.stage, "sparse");
  EXPECT_EQ(p64["model.embed_tokens.weight"].item(5), f.params["model.embed_tokens.weight"].item(5));
  EXPECT_EQ(ex.size(), f.extra.size());
  EXPECT_EQ(read_train_state(dir / "run").step, 30);
}

TEST(Checkpoint, LatestPointerAndKeepLast) {
  ScratchDir dir;
  Fixture f(1);
  for (int64_t s = 1; s <= 5; ++s) {
    f.state.step = s;
    save_checkpoint(dir.path, f.state, f.params, {}, 2);
  }
  auto all = list_checkpoints(dir.path);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].first, 4);
  EXPECT_EQ(all[1].first, 5);
  EXPECT_EQ(resolve_checkpoint(dir.path), dir / "ckpt-00000005.h5");
  // Without the pointer the newest file is taken; a pointer naming something else is an error.
  ASSERT_EQ(::unlink((dir / "latest").c_str()), 0);
  EXPECT_EQ(resolve_checkpoint(dir.path), dir / "ckpt-00000005.h5");
  write_bytes(dir / "latest", "../etc/passwd\n");
  EXPECT_TRUE(throws_with([&] { resolve_checkpoint(dir.path); }, {"latest", "does not name"}));
  ScratchDir empty;
  EXPECT_TRUE(throws_with([&] { resolve_checkpoint(empty.path); }, {empty.path, "no checkpoint"}));
}

// A save killed with SIGKILL midway (the test hook slows it down) leaves the previous checkpoint as the
// one `latest` names, loadable; the next save clears the leftover temporary file.
TEST(Checkpoint, KillDuringSaveLeavesPreviousLoadable) {
  ScratchDir dir;
  Fixture f(2);
  f.state.step = 1;
  save_checkpoint(dir.path, f.state, f.params, f.extra);
  const std::string tmp = dir / "ckpt-00000002.h5.tmp";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("DSA_CKPT_SAVE_DELAY_MS", "20", 1);  // ~90 tensors: ~2 s in all
    Fixture g(5);
    g.state.step = 2;
    save_checkpoint(dir.path, g.state, g.params, g.extra);
    ::_exit(0);
  }
  // Wait for the temporary file to exist and grow, then kill the writer in the middle.
  bool started = false;
  for (int i = 0; i < 500 && !started; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::ifstream in(tmp, std::ios::binary | std::ios::ate);
    started = in && in.tellg() > 20000;
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(started) << "the child never started writing";
  ASSERT_TRUE(WIFSIGNALED(status)) << "the save finished before the kill; slow it down";
  EXPECT_EQ(::access(tmp.c_str(), F_OK), 0);
  EXPECT_NE(::access((dir / "ckpt-00000002.h5").c_str(), F_OK), 0);
  Checkpoint c = load_checkpoint(dir.path);
  expect_same(f, c);
  // The half-written file itself is rejected with an error, not a crash.
  EXPECT_TRUE(throws_with([&] { load_checkpoint(tmp); }, {tmp}));
  f.state.step = 3;
  save_checkpoint(dir.path, f.state, f.params, f.extra);
  EXPECT_NE(::access(tmp.c_str(), F_OK), 0);
}

TEST(Checkpoint, TruncatedOrForeignFilesAreErrors) {
  ScratchDir dir;
  Fixture f(4);
  const std::string path = dir / "c.h5";
  write_checkpoint_file(path, f.state, f.params, f.extra);
  const std::string bytes = read_bytes_file(path);
  for (size_t cut : {size_t{0}, size_t{100}, bytes.size() / 2, bytes.size() - 1}) {
    write_bytes(dir / "cut.h5", bytes.substr(0, cut));
    EXPECT_TRUE(throws_with([&] { load_checkpoint(dir / "cut.h5"); }, {"cut.h5"})) << "cut at " << cut;
  }
  write_bytes(dir / "junk.h5", std::string(4096, 'x'));
  EXPECT_TRUE(throws_with([&] { load_checkpoint(dir / "junk.h5"); }, {"junk.h5", "not a readable HDF5"}));
  EXPECT_TRUE(throws_with([&] { load_checkpoint(dir / "none.h5"); }, {"none.h5", "no such file"}));
}

TEST(Checkpoint, ShapesThatDoNotFitTheConfigAreErrors) {
  ScratchDir dir;
  Fixture f(6);
  // The stored config says q_lora_rank 20: the saved tensors (rank 16) do not fit it.
  ModelConfig other = f.cfg;
  other.q_lora_rank = 20;
  f.state.model_config_yaml = other.to_yaml();
  write_checkpoint_file(dir / "a.h5", f.state, f.params, {});
  EXPECT_TRUE(throws_with([&] { load_checkpoint(dir / "a.h5"); }, {"a.h5", "q_a_proj.weight", "[16, 32]", "[20, 32]"}));
  // A tensor the config does not have.
  Fixture g(6);
  g.params.add("model.layers.9.extra.weight", {2}, ParamGroup::Main, false, DType::F32, Device::CPU);
  write_checkpoint_file(dir / "b.h5", g.state, g.params, {});
  EXPECT_TRUE(throws_with([&] { load_checkpoint(dir / "b.h5"); }, {"b.h5", "model.layers.9.extra.weight", "not a parameter"}));
  // Loading into a store of another model names the tensor.
  ModelConfig small = f.cfg;
  small.hidden_size = 16;
  ParamStore ps = make_params(small);
  EXPECT_TRUE(throws_with([&] { load_checkpoint_into(dir / "b.h5", nullptr, ps, nullptr); },
                          {"b.h5", "model.embed_tokens.weight", "[256, 32]", "[256, 16]"}));
  // Bad extra keys are refused at save time.
  EXPECT_TRUE(throws_with([&] { write_checkpoint_file(dir / "c.h5", g.state, g.params, {{"params/x", Tensor::zeros({1}, DType::F32)}}); },
                          {"params/x"}));
  EXPECT_TRUE(throws_with([&] { write_checkpoint_file(dir / "c.h5", g.state, g.params, {{"a/../b", Tensor::zeros({1}, DType::F32)}}); },
                          {"a/../b"}));
}

TEST(Checkpoint, NewerFormatVersionIsRefused) {
  ScratchDir dir;
  Fixture f(7);
  const std::string path = dir / "v.h5";
  write_checkpoint_file(path, f.state, f.params, {});
  {
    hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    hid_t a = H5Aopen(file, "format_version", H5P_DEFAULT);
    const int64_t v = kCheckpointFormatVersion + 1;
    H5Awrite(a, H5T_NATIVE_INT64, &v);
    H5Aclose(a);
    H5Fclose(file);
  }
  EXPECT_TRUE(throws_with([&] { load_checkpoint(path); }, {"v.h5", "format_version 2"}));
}

TEST(Checkpoint, ImportedHfModelSavesAndExportsBack) {
  ScratchDir dir;
  Fixture f(8);
  HfExportOptions opt;
  opt.dtype = DType::F32;
  export_hf(dir / "hf", f.cfg, f.params, {}, opt);
  HfModel m = import_hf(dir / "hf");
  TrainState st;
  st.model_config_yaml = m.cfg.to_yaml();
  save_checkpoint(dir / "run", st, m.params, m.extra);
  Checkpoint c = load_checkpoint(dir / "run");
  export_hf(dir / "hf2", c.cfg, c.params, c.extra, opt);
  SafetensorsSet a(dir / "hf"), b(dir / "hf2");
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& n : a.names()) EXPECT_TRUE(same_bits(a.read(n), b.read(n))) << n;
}
