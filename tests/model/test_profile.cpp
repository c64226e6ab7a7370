// DSA_PROFILE's section table: nested sections print under their outer one and stay out of the total.
#include <gtest/gtest.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "model/profile.h"

namespace dsa {
namespace {

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

TEST(Profile, NestedSectionsPrintUnderTheirOuterOneAndStayOutOfTheTotal) {
  Profile::reset();
  Profile::add("lm head", 0.010);
  Profile::add("layer bwd", 0.011);
  Profile::add("layer bwd > FFN bwd", 0.003);
  Profile::add("layer bwd > MLA bwd", 0.006);
  Profile::add("layer bwd > MLA bwd > attention", 0.004);
  Profile::add("layer bwd > MLA bwd > attention", 0.001);  // a second call adds up
  const std::vector<std::string> l = lines_of(Profile::report());
  ASSERT_EQ(l.size(), 5u) << Profile::report();
  // The total is 21 ms (the two outer sections): shares are of it, children indented under their parent.
  EXPECT_EQ(l[0], "  layer bwd                        11.00 ms   52.4% (1 calls)");
  EXPECT_EQ(l[1], "    MLA bwd                         6.00 ms   28.6% (1 calls)");
  EXPECT_EQ(l[2], "      attention                     5.00 ms   23.8% (2 calls)");
  EXPECT_EQ(l[3], "    FFN bwd                         3.00 ms   14.3% (1 calls)");
  EXPECT_EQ(l[4], "  lm head                          10.00 ms   47.6% (1 calls)");
  Profile::reset();
}

TEST(Profile, ScopesOpenedInsideAnotherAreNamedByIt) {
  // DSA_PROFILE is read once, at the first use of the profile in this process (ctest runs each test alone).
  setenv("DSA_PROFILE", "1", 1);
  ASSERT_TRUE(Profile::enabled());
  Profile::reset();
  {
    ProfileScope outer("layer bwd");
    { ProfileScope inner("attention"); }
    { ProfileScope inner("attention"); }
  }
  { ProfileScope again("attention"); }  // at the top level again once the outer one closed
  const auto t = Profile::snapshot();
  ASSERT_EQ(t.size(), 3u);
  EXPECT_EQ(t.at("layer bwd").second, 1);
  EXPECT_EQ(t.at("layer bwd > attention").second, 2);
  EXPECT_EQ(t.at("attention").second, 1);
  EXPECT_GE(t.at("layer bwd").first, t.at("layer bwd > attention").first);
  Profile::reset();
}

}  // namespace
}  // namespace dsa
