// Optional section timing of the model step (DSA_PROFILE=1): each section synchronizes the device at
// its ends, so the figures are exact per section but the step runs slower. Off: no cost. A section opened
// inside another is recorded as "outer > inner" and reported under it (not counted twice in the total).
#pragma once

#include <map>
#include <string>

namespace dsa {

class Profile {
 public:
  static bool enabled();
  static void add(const char* section, double seconds);
  static std::map<std::string, std::pair<double, int64_t>> snapshot();  // section -> (seconds, calls)
  static void reset();
  static std::string report();  // one line per section, largest first
};

// Times one section of the step when profiling is on.
class ProfileScope {
 public:
  explicit ProfileScope(const char* section);
  ~ProfileScope();
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  std::string name_;  // "outer > inner" when opened inside another section
  double start_ = 0;
};

}  // namespace dsa
