#include "model/profile.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
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

// Sections opened inside another are named "outer > inner": they print under their outer section, indented,
// with their share of the whole step, and stay out of the total (their time is already in the outer one's).
std::string Profile::report() {
  auto t = snapshot();
  double total = 0;
  for (const auto& r : t)
    if (r.first.find(" > ") == std::string::npos) total += r.second.first;
  std::string out;
  // Children of `parent` ("" for the top level), largest first, each followed by its own.
  std::function<void(const std::string&, int)> emit = [&](const std::string& parent, int depth) {
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows;
    for (const auto& r : t) {
      const std::string& n = r.first;
      if (parent.empty() ? n.find(" > ") == std::string::npos
                         : n.size() > parent.size() + 3 && n.compare(0, parent.size() + 3, parent + " > ") == 0 &&
                               n.find(" > ", parent.size() + 3) == std::string::npos)
        rows.push_back(r);
    }
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
    for (const auto& r : rows) {
      const std::string leaf = parent.empty() ? r.first : r.first.substr(parent.size() + 3);
      char buf[200];
      std::snprintf(buf, sizeof buf, "  %*s%-*s %9.2f ms %6.1f%% (%lld calls)\n", 2 * depth, "", 28 - 2 * depth,
                    leaf.c_str(), 1e3 * r.second.first, total > 0 ? 100 * r.second.first / total : 0.0,
                    static_cast<long long>(r.second.second));
      out += buf;
      emit(r.first, depth + 1);
    }
  };
  emit("", 0);
  return out;
}

namespace {
thread_local std::vector<std::string> g_open;  // the sections open on this thread, outermost first
}  // namespace

ProfileScope::ProfileScope(const char* section) {
  if (!Profile::enabled()) return;
  name_ = g_open.empty() ? std::string(section) : g_open.back() + " > " + section;
  g_open.push_back(name_);
  sync();
  start_ = now_s();
}

ProfileScope::~ProfileScope() {
  if (!Profile::enabled()) return;
  sync();
  Profile::add(name_.c_str(), now_s() - start_);
  g_open.pop_back();
}

}  // namespace dsa
