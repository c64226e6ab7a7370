// safetensors: round trips, dtype conversions, FP8 block dequantization, sharding, lying headers.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>

#include "model/safetensors.h"
#include "tests/ckpt/ckpt_util.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

std::vector<std::pair<std::string, Tensor>> sample_tensors() {
  Tensor f = randn({3, 5}, 1, 1.0, DType::F32);
  Tensor d = randn({4}, 2, 1.0, DType::F64);
  Tensor b = randn({2, 3}, 3, 1.0, DType::F32).to(DType::BF16);
  Tensor q = randn({7}, 4, 50.0, DType::F32).to(DType::F8E4M3);
  Tensor i = Tensor::from_vector(std::vector<int32_t>{1, -2, 3}, {3});
  Tensor l = Tensor::empty({2}, DType::I64);
  l.data<int64_t>()[0] = -(int64_t{1} << 40);
  l.data<int64_t>()[1] = 7;
  Tensor e = Tensor::empty({0, 4}, DType::F32);
  return {{"w.f32", f}, {"w.f64", d}, {"w.bf16", b}, {"w.f8", q}, {"i32", i}, {"i64", l}, {"empty", e}};
}

}  // namespace

TEST(Safetensors, WriteReadRoundTripIsBitExact) {
  ScratchDir dir;
  auto ts = sample_tensors();
  write_safetensors(dir / "m.safetensors", ts, {{"format", "pt"}});
  SafetensorsFile f(dir / "m.safetensors");
  EXPECT_EQ(f.header().metadata.at("format"), "pt");
  EXPECT_EQ(f.header().data_offset() % 8, 0u);
  ASSERT_EQ(f.header().tensors.size(), ts.size());
  for (const auto& [name, t] : ts) {
    Tensor r = f.read(name);
    EXPECT_TRUE(same_bits(r, t)) << name;
  }
  EXPECT_EQ(f.info("w.bf16").dtype, StDType::BF16);
  EXPECT_EQ(f.info("w.f8").dtype, StDType::F8_E4M3);
  Tensor bf = f.read_f32("w.bf16");
  for (int64_t i = 0; i < bf.numel(); ++i) EXPECT_EQ(bf.item(i), ts[2].second.item(i));
  EXPECT_TRUE(throws_with([&] { f.read_f32("i32"); }, {"m.safetensors", "'i32'", "floating"}));
  EXPECT_TRUE(throws_with([&] { f.read("nope"); }, {"m.safetensors", "'nope'"}));
}

TEST(Safetensors, F16AndSmallIntegersWiden) {
  ScratchDir dir;
  // 1, -2, 65504 (max), 2^-24 (smallest subnormal), +inf, 0.5
  const uint16_t h[] = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x3800};
  std::string data(reinterpret_cast<const char*>(h), sizeof h);
  data += std::string("\xff\x01", 2);  // I8: -1, 1
  write_bytes(dir / "h.safetensors",
              st_file(R"({"h":{"dtype":"F16","shape":[6],"data_offsets":[0,12]},)"
                      R"("c":{"dtype":"I8","shape":[2],"data_offsets":[12,14]}})",
                      data));
  SafetensorsFile f(dir / "h.safetensors");
  Tensor t = f.read_f32("h");
  EXPECT_EQ(t.dtype(), DType::F32);
  EXPECT_EQ(t.item(0), 1.0);
  EXPECT_EQ(t.item(1), -2.0);
  EXPECT_EQ(t.item(2), 65504.0);
  EXPECT_EQ(t.item(3), std::ldexp(1.0, -24));
  EXPECT_TRUE(std::isinf(t.item(4)) && t.item(4) > 0);
  EXPECT_EQ(t.item(5), 0.5);
  Tensor c = f.read("c");
  EXPECT_EQ(c.dtype(), DType::I32);
  EXPECT_EQ(c.item(0), -1.0);
  EXPECT_EQ(c.item(1), 1.0);
}

TEST(Safetensors, Fp8BlockScalesDequantizeToExpectedValues) {
  ScratchDir dir;
  // A 130 x 260 weight: 2 x 3 blocks of 128, the last ones partial. Codes and scales chosen by hand.
  const int64_t R = 130, C = 260;
  Tensor q = Tensor::empty({R, C}, DType::F8E4M3);
  Tensor s = Tensor::from_vector(std::vector<float>{0.5f, 2.0f, 0.25f, 4.0f, 1.0f, 8.0f}, {2, 3});
  const uint8_t codes[] = {0x38 /*1*/, 0xC0 /*-2*/, 0x7E /*448*/, 0x01 /*2^-9*/, 0x00, 0x3C /*1.5*/};
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) q.data<fp8e4m3>()[i * C + j].bits = codes[(i * 7 + j) % 6];
  write_safetensors(dir / "fp8.safetensors", {{"w", q}, {"w_scale_inv", s}, {"v", q}});
  SafetensorsSet set(dir / "fp8.safetensors");
  Tensor w = set.read_f32("w");
  const double value[] = {1.0, -2.0, 448.0, std::ldexp(1.0, -9), 0.0, 1.5};
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) {
      const double want = value[(i * 7 + j) % 6] * s.item((i / 128) * 3 + j / 128);
      ASSERT_EQ(w.item(i * C + j), want) << i << "," << j;
    }
  // Without a scale the codes are read as plain e4m3 values.
  Tensor v = set.read_f32("v");
  EXPECT_EQ(v.item(0), 1.0);
  // A scale of the wrong shape is an error naming the tensor.
  write_safetensors(dir / "bad.safetensors", {{"w", q}, {"w_scale_inv", Tensor::zeros({2, 2}, DType::F32)}});
  SafetensorsSet bad(dir / "bad.safetensors");
  EXPECT_TRUE(throws_with([&] { bad.read_f32("w"); }, {"bad.safetensors", "'w'", "scale_inv"}));
}

TEST(Safetensors, Fp8QuantizeDequantizeIsWithinOneUlpOfE4M3) {
  Tensor w = randn({200, 150}, 9, 0.02, DType::F32);
  auto [q, s] = quant_fp8_blocks(w, 128);
  EXPECT_EQ(s.shape(), Shape({2, 2}));
  Tensor r = dequant_fp8_blocks(q, s, 128, "test");
  // e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; tiny ones are absolute.
  EXPECT_TRUE(all_close(r, w, 1.0 / 16, 1e-6));
}

TEST(Safetensors, ShardedWriteAndIndexedRead) {
  ScratchDir dir;
  std::vector<std::pair<std::string, Tensor>> ts;
  for (int i = 0; i < 10; ++i) ts.emplace_back("t" + std::to_string(i), randn({100}, 100 + i, 1.0, DType::F32));
  auto files = write_safetensors_sharded(dir / "hf", ts, 1000);  // 400 bytes each: 2 per shard
  ASSERT_EQ(files.size(), 6u);
  EXPECT_EQ(files[0], "model-00001-of-00005.safetensors");
  EXPECT_EQ(files.back(), "model.safetensors.index.json");
  SafetensorsSet set(dir / "hf");
  ASSERT_EQ(set.names().size(), 10u);
  for (const auto& [n, t] : ts) EXPECT_TRUE(same_bits(set.read(n), t)) << n;
  // One shard when everything fits; the stale shards of the previous export are removed.
  files = write_safetensors_sharded(dir / "hf", ts, 1 << 20);
  ASSERT_EQ(files.size(), 1u);
  EXPECT_NE(::access((dir / "hf/model-00001-of-00005.safetensors").c_str(), F_OK), 0);
  SafetensorsSet one(dir / "hf");
  EXPECT_EQ(one.names().size(), 10u);
}

TEST(Safetensors, IndexThatLiesIsAnError) {
  ScratchDir dir;
  write_safetensors(dir / "a.safetensors", {{"x", Tensor::zeros({2}, DType::F32)}});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {"x": "../a.safetensors"}})");
  EXPECT_TRUE(throws_with([&] { SafetensorsSet s(dir.path); }, {"index.json", "not a plain file name"}));
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {"y": "a.safetensors"}})");
  EXPECT_TRUE(throws_with([&] { SafetensorsSet s(dir.path); }, {"index.json", "'y'", "does not contain"}));
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": [)");
  EXPECT_TRUE(throws_with([&] { SafetensorsSet s(dir.path); }, {"index.json"}));
}

// Every lie a header can tell gives an error naming the file (and the tensor where there is one).
TEST(Safetensors, LyingHeadersAreErrorsNotCrashes) {
  ScratchDir dir;
  const std::string p = dir / "bad.safetensors";
  struct Case {
    std::string file;
    std::vector<std::string> expect;
  };
  const std::string d16(16, '\0');
  std::string huge_n(8, '\xff');
  const std::vector<Case> cases = {
      {"abc", {"too short"}},
      {huge_n + "{}", {"100 MB"}},
      {std::string("\x40\0\0\0\0\0\0\0", 8) + "{}", {"past the end"}},
      {st_file("{not json", d16), {"not valid JSON"}},
      {st_file("[1,2]", d16), {"JSON object"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}})", d16), {"'a'", "past the data section"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,4]}})", d16), {"'a'", "begin 8 > end 4"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d16), {"'a'", "needs 12"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", d16),
       {"'a'", "'b'", "overlap"}},
      {st_file(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", d16), {"'a'", "unknown dtype 'Q4'"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d16), {"'a'", "shape entries"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", d16), {"'a'", "shape entries"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,8]}})", d16),
       {"'a'", "overflows"}},
      {st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d16), {"'a'", "data_offsets"}},
      {st_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d16), {"'a'", "dtype"}},
      {st_file(R"({"a":[1]})", d16), {"'a'", "must be an object"}},
      {st_file(R"({"__metadata__":{"k":1}})", d16), {"__metadata__"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    write_bytes(p, cases[i].file);
    std::vector<std::string> expect = cases[i].expect;
    expect.push_back(p);
    EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, expect)) << "case " << i;
  }
}

TEST(Safetensors, FileTruncatedAfterOpeningIsAnError) {
  ScratchDir dir;
  const std::string p = dir / "t.safetensors";
  write_safetensors(p, {{"a", randn({64}, 1, 1.0, DType::F32)}});
  SafetensorsFile f(p);
  ASSERT_EQ(::truncate(p.c_str(), 8 + static_cast<off_t>(f.header().header_len) + 10), 0);
  EXPECT_TRUE(throws_with([&] { f.read("a"); }, {p, "'a'", "ends early"}));
}
