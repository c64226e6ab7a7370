#include "model/profile.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "kernels/device_memory.h"

namespace dsa {

namespace {
std::mutex g_mu;
std::map<std::string, std::pair<double, int64_t>>& table() {
  static auto* t = new std::map<std::string, std::pair<double, int64_t>>();
  return *t;
}
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
void sync() {
  if (cuda::available()) cuda::synchronize();
}
}  // namespace

bool Profile::enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DSA_PROFILE");
    return e && *e && std::string(e) != "0";
  }();
  return on;
}

void Profile::add(const char* section, double seconds) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto& e = table()[section];
  e.first += seconds;
  e.second += 1;
}

std::map<std::string, std::pair<double, int64_t>> Profile::snapshot() {
  std::lock_guard<std::mutex> lock(g_mu);
  return table();
}

void Profile::reset() {
  std::lock_guard<std::mutex> lock(g_mu);
  table().clear();
}

std::string Profile::report() {
  auto t = snapshot();
  std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows(t.begin(), t.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  double total = 0;
  for (const auto& r : rows) total += r.second.first;
  std::string out;
  char buf[160];
  for (const auto& r : rows) {
    std::snprintf(buf, sizeof buf, "  %-28s %9.2f ms %6.1f%% (%lld calls)\n", r.first.c_str(), 1e3 * r.second.first,
                  total > 0 ? 100 * r.second.first / total : 0.0, static_cast<long long>(r.second.second));
    out += buf;
  }
  return out;
}

ProfileScope::ProfileScope(const char* section) : section_(section) {
  if (!Profile::enabled()) return;
  sync();
  start_ = now_s();
}

ProfileScope::~ProfileScope() {
  if (!Profile::enabled()) return;
  sync();
  Profile::add(section_, now_s() - start_);
}

}  // namespace dsa
