// dsa-inspect: what a checkpoint holds, or how two differ.
//
//   dsa-inspect CKPT                      state, recipe, and every tensor with dtype, shape and L2 norm
//   dsa-inspect --diff A B [--tol X]      tensor-by-tensor comparison; exit 0 when every tensor is
//                                         present in both with max |a - b| <= X (default 0: bit-equal)
//
// CKPT is a native checkpoint (file, sharded checkpoint directory, or a directory of checkpoints) or
// Hugging Face safetensors (a .safetensors file or a directory with model.safetensors[.index.json]).
// A sharded checkpoint is shown whole (every tensor assembled from its pieces), after its file count.
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <string>

#include "model/safetensors.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_sharded.h"

using namespace dsa;

namespace {

struct Entry {
  std::string dtype;
  Tensor value;  // as stored (CPU)
};
struct Loaded {
  std::string header;  // printable summary
  std::map<std::string, Entry> tensors;
};

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

bool is_hf(const std::string& p) {
  return ends_with(p, ".safetensors") || exists(p + "/model.safetensors") || exists(p + "/model.safetensors.index.json");
}

Loaded load_any(const std::string& path) {
  Loaded L;
  if (is_hf(path)) {
    SafetensorsSet set(path);
    L.header = "safetensors " + path + "\n";
    for (const std::string& n : set.names())
      L.tensors[n] = {st_dtype_name(set.info(n).dtype), set.read(n)};
    return L;
  }
  Checkpoint c = load_checkpoint(path);
  const TrainState& s = c.state;
  std::string layout;
  if (is_sharded_checkpoint(c.path)) layout = "sharded: " + std::to_string(CheckpointSource(c.path).files()) + " files\n";
  L.header = "checkpoint " + c.path + "\n" + layout + "step " + std::to_string(s.step) + ", stage '" + s.stage + "', stage_step " +
             std::to_string(s.stage_step) + ", rng_seed " + std::to_string(s.rng_seed) + ", " +
             std::to_string(s.rng_state.size()) + " rng words, " + std::to_string(s.rank_data_states.size()) +
             " rank data states\n";
  for (size_t r = 0; r < s.rank_data_states.size(); ++r)
    L.header += "  rank " + std::to_string(r) + " data: " + s.rank_data_states[r] + "\n";
  L.header += "recipe:\n" + (s.recipe_yaml.empty() ? std::string("  (none)\n") : s.recipe_yaml) +
              (s.recipe_yaml.empty() || s.recipe_yaml.back() == '\n' ? "" : "\n");
  L.header += "model config:\n" + s.model_config_yaml;
  for (const Param& p : c.params.all()) L.tensors[p.name] = {dtype_name(p.value.dtype()), p.value};
  for (const auto& [k, t] : c.extra) L.tensors[k] = {dtype_name(t.dtype()), t};
  return L;
}

double l2(const Tensor& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.item(i);
    s += v * v;
  }
  return std::sqrt(s);
}

int inspect(const std::string& path) {
  Loaded L = load_any(path);
  std::printf("%s", L.header.c_str());
  int64_t total = 0;
  std::printf("%-64s %-8s %-20s %s\n", "tensor", "dtype", "shape", "l2 norm");
  for (const auto& [name, e] : L.tensors) {
    std::printf("%-64s %-8s %-20s %.6g\n", name.c_str(), e.dtype.c_str(), shape_str(e.value.shape()).c_str(), l2(e.value));
    total += e.value.numel();
  }
  std::printf("%zu tensors, %lld elements\n", L.tensors.size(), static_cast<long long>(total));
  return 0;
}

int diff(const std::string& a, const std::string& b, double tol) {
  Loaded A = load_any(a), B = load_any(b);
  std::set<std::string> names;
  for (const auto& kv : A.tensors) names.insert(kv.first);
  for (const auto& kv : B.tensors) names.insert(kv.first);
  size_t same = 0, close = 0, differ = 0, missing = 0;
  for (const std::string& n : names) {
    auto ia = A.tensors.find(n), ib = B.tensors.find(n);
    if (ia == A.tensors.end() || ib == B.tensors.end()) {
      std::printf("%-64s only in %s\n", n.c_str(), ia == A.tensors.end() ? "B" : "A");
      ++missing;
      continue;
    }
    const Tensor &x = ia->second.value, &y = ib->second.value;
    if (x.shape() != y.shape()) {
      std::printf("%-64s shape %s vs %s\n", n.c_str(), shape_str(x.shape()).c_str(), shape_str(y.shape()).c_str());
      ++differ;
      continue;
    }
    if (x.dtype() == y.dtype() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0) {
      ++same;
      continue;
    }
    double maxd = 0, num = 0, den = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double u = x.item(i), v = y.item(i);
      const double d = std::fabs(u - v);
      maxd = std::isnan(d) ? INFINITY : std::max(maxd, d);
      num += (u - v) * (u - v);
      den += v * v;
    }
    const bool ok = maxd <= tol;
    std::printf("%-64s %s %s vs %s max|diff| %.6g rel l2 %.6g\n", n.c_str(), ok ? "close " : "DIFFER",
                ia->second.dtype.c_str(), ib->second.dtype.c_str(), maxd, den > 0 ? std::sqrt(num / den) : std::sqrt(num));
    (ok ? close : differ)++;
  }
  std::printf("%zu identical, %zu within tolerance, %zu differ, %zu missing on one side\n", same, close, differ, missing);
  return differ + missing == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 4 && std::strcmp(argv[1], "--diff") == 0) {
      double tol = 0;
      if (argc == 6 && std::strcmp(argv[4], "--tol") == 0) tol = std::atof(argv[5]);
      else if (argc != 4) throw std::runtime_error("usage: dsa-inspect --diff A B [--tol X]");
      return diff(argv[2], argv[3], tol);
    }
    if (argc == 2 && argv[1][0] != '-') return inspect(argv[1]);
    std::fprintf(stderr, "usage: dsa-inspect CKPT | dsa-inspect --diff A B [--tol X]\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
