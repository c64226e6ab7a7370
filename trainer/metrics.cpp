#include "trainer/metrics.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <vector>

namespace dsa {

namespace {

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      o += buf;
    } else {
      o += static_cast<char>(c);
    }
  }
  return o + "\"";
}

std::string fixed(double v, int decimals) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.*f", decimals, v);
  return buf;
}

std::string sci(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.2e", v);
  return buf;
}

std::string rate(double v) {  // 950, 12.3K, 1.25M
  char buf[40];
  if (!std::isfinite(v)) return "nan";
  if (v >= 1e6)
    std::snprintf(buf, sizeof(buf), "%.2fM", v / 1e6);
  else if (v >= 1e3)
    std::snprintf(buf, sizeof(buf), "%.1fK", v / 1e3);
  else
    std::snprintf(buf, sizeof(buf), "%.0f", v);
  return buf;
}

std::string head(const MetricRecord& r, int64_t total_steps) {
  const int width = static_cast<int>(std::to_string(total_steps).size());
  char buf[96];
  std::snprintf(buf, sizeof(buf), "step %*lld/%lld", width, static_cast<long long>(r.step),
                static_cast<long long>(total_steps));
  return "[" + r.stage + "] " + buf;
}

}  // namespace

MetricsLogger::MetricsLogger(const std::string& jsonl_path, std::FILE* terminal)
    : path_(jsonl_path), terminal_(terminal) {
  const std::filesystem::path p(jsonl_path);
  std::error_code ec;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  file_ = std::fopen(jsonl_path.c_str(), "a");
  if (!file_)
    throw std::runtime_error("[metrics] cannot open " + jsonl_path + " for appending: " + std::strerror(errno));
}

MetricsLogger::~MetricsLogger() {
  if (file_) std::fclose(file_);
}

std::string MetricsLogger::json_line(const MetricRecord& r) {
  std::string o = "{\"stage\": " + json_string(r.stage) + ", \"step\": " + std::to_string(r.step);
  auto add = [&](const char* k, const std::optional<double>& v) {
    if (v) o += std::string(", \"") + k + "\": " + json_number(*v);
  };
  add("lm_loss", r.lm_loss);
  add("indexer_kl", r.indexer_kl);
  add("grad_norm", r.grad_norm);
  add("indexer_grad_norm", r.indexer_grad_norm);
  add("lr", r.lr);
  add("tokens_per_s", r.tokens_per_s);
  add("val_lm_loss", r.val_lm_loss);
  add("val_indexer_kl", r.val_indexer_kl);
  add("recall", r.recall);
  return o + "}";
}

std::string MetricsLogger::format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--";
  const long long t = std::llround(s);
  char buf[48];
  if (t < 60)
    std::snprintf(buf, sizeof(buf), "%llds", t);
  else if (t < 3600)
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", t / 3600, (t % 3600) / 60);
  return buf;
}

double MetricsLogger::eta_seconds(double elapsed_s, int64_t steps_done, int64_t total_steps) {
  if (steps_done <= 0) return -1.0;
  return elapsed_s * static_cast<double>(total_steps - steps_done) / static_cast<double>(steps_done);
}

std::string MetricsLogger::train_line(const MetricRecord& r, int64_t total_steps, double elapsed_s, double eta_s) {
  std::string o = head(r, total_steps);
  if (r.lm_loss) o += " | loss " + fixed(*r.lm_loss, 4);
  if (r.indexer_kl) o += " | kl " + fixed(*r.indexer_kl, 4);
  if (r.grad_norm) o += " | gnorm " + fixed(*r.grad_norm, 3);
  if (r.indexer_grad_norm) o += " | indexer gnorm " + fixed(*r.indexer_grad_norm, 3);
  if (r.lr) o += " | lr " + sci(*r.lr);
  if (r.tokens_per_s) o += " | " + rate(*r.tokens_per_s) + " tok/s";
  o += " | elapsed " + format_duration(elapsed_s) + " | ETA " + format_duration(eta_s);
  return o;
}

std::string MetricsLogger::eval_line(const MetricRecord& r, int64_t total_steps) {
  std::string o = head(r, total_steps);
  if (r.val_lm_loss) o += " | val loss " + fixed(*r.val_lm_loss, 4);
  if (r.val_indexer_kl) o += " | val kl " + fixed(*r.val_indexer_kl, 4);
  if (r.recall) o += " | recall " + fixed(*r.recall, 4);
  return o;
}

void MetricsLogger::log_train(const MetricRecord& r, int64_t total_steps, double elapsed_s, double eta_s) {
  if (terminal_) {
    std::fprintf(terminal_, "%s\n", train_line(r, total_steps, elapsed_s, eta_s).c_str());
    std::fflush(terminal_);
  }
  std::fprintf(file_, "%s\n", json_line(r).c_str());
  std::fflush(file_);
}

void MetricsLogger::log_eval(const MetricRecord& r, int64_t total_steps) {
  if (terminal_) {
    std::fprintf(terminal_, "%s\n", eval_line(r, total_steps).c_str());
    std::fflush(terminal_);
  }
  std::fprintf(file_, "%s\n", json_line(r).c_str());
  std::fflush(file_);
}

int run_plot_command(int argc, char** argv) {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  if (const char* src = std::getenv("DSA_SOURCE_DIR")) candidates.push_back(fs::path(src) / "tools/dsa_plot.py");
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) candidates.push_back(exe.parent_path().parent_path().parent_path() / "tools/dsa_plot.py");
#ifdef DSA_SOURCE_DIR
  candidates.push_back(fs::path(DSA_SOURCE_DIR) / "tools/dsa_plot.py");
#endif
  std::string script;
  for (const auto& c : candidates)
    if (fs::exists(c, ec)) {
      script = c.string();
      break;
    }
  if (script.empty()) {
    std::string tried;
    for (const auto& c : candidates) tried += " " + c.string();
    std::fprintf(stderr, "[plot] cannot find tools/dsa_plot.py (tried:%s); set DSA_SOURCE_DIR to the source tree\n",
                 tried.c_str());
    return 127;
  }
  // NOTES: python3-matplotlib is a Debian package, so prefer Debian's interpreter over whatever python3
  // comes first on PATH (a pyenv or venv one would lack it). DSA_PYTHON picks another.
  std::string python = "python3";
  if (const char* p = std::getenv("DSA_PYTHON"))
    python = p;
  else if (fs::exists("/usr/bin/python3", ec))
    python = "/usr/bin/python3";
  std::vector<char*> args;
  args.push_back(const_cast<char*>(python.c_str()));
  args.push_back(const_cast<char*>(script.c_str()));
  for (int i = 0; i < argc; ++i) args.push_back(argv[i]);
  args.push_back(nullptr);
  execvp(args[0], args.data());
  std::fprintf(stderr, "[plot] cannot run %s: %s\n", python.c_str(), std::strerror(errno));
  return 127;
}

}  // namespace dsa
