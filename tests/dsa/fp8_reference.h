// Independent references of the indexer's FP8 view (SPEC.md §1 "Lightning indexer"), written from the
// definitions and sharing no code with kernels/: the Sylvester Hadamard matrix product, the e4m3 value
// table, power-of-two block scales. Used to check indexer_fp8_operands and the FP8 top-k path.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace dsa::testing {

// y_i = d^-1/2 sum_j (-1)^popcount(i & j) x_j, in f64 (H_d in Sylvester order).
inline std::vector<double> naive_hadamard(const std::vector<double>& x) {
  const size_t d = x.size();
  std::vector<double> y(d, 0.0);
  for (size_t i = 0; i < d; ++i) {
    double acc = 0;
    for (size_t j = 0; j < d; ++j) acc += (__builtin_popcountll(i & j) & 1 ? -x[j] : x[j]);
    y[i] = acc / std::sqrt(static_cast<double>(d));
  }
  return y;
}

// Every finite non-negative e4m3 value, ascending, with its code (sign bit clear): exponent bias 7,
// subnormals m/8 * 2^-6, 0x7f (S.1111.111) is NaN, so the largest value is 0x7e = 448.
struct E4m3Value {
  double value;
  int code;
};
inline const std::vector<E4m3Value>& e4m3_table() {
  static const std::vector<E4m3Value> t = [] {
    std::vector<E4m3Value> v;
    for (int code = 0; code < 0x7f; ++code) {
      const int e = code >> 3, m = code & 7;
      v.push_back({e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7), code});
    }
    return v;
  }();
  return t;
}

// Round to the nearest e4m3 value (ties to the even code), saturating at +-448. `ambiguous` (may be null)
// is set when x lies within rel_slack * |x| of a midpoint between two neighbours, where an input that
// differs from x in its last bits may round to the other one.
inline double round_e4m3_ref(double x, bool* ambiguous = nullptr, double rel_slack = 0) {
  const auto& t = e4m3_table();
  const double a = std::fabs(x);
  if (ambiguous) *ambiguous = false;
  if (a >= t.back().value) return std::copysign(t.back().value, x);
  size_t hi = 1;
  while (t[hi].value < a) ++hi;
  const double lo_v = t[hi - 1].value, hi_v = t[hi].value, mid = 0.5 * (lo_v + hi_v);
  if (ambiguous) *ambiguous = std::fabs(a - mid) <= rel_slack * a;
  double r;
  if (a < mid) r = lo_v;
  else if (a > mid) r = hi_v;
  else r = (t[hi - 1].code % 2 == 0) ? lo_v : hi_v;
  return std::copysign(r, x);
}

// One block's scale: 2^ceil(log2(max(amax, 1e-4) / 448)).
inline double fp8_scale_ref(double amax) {
  return std::ldexp(1.0, static_cast<int>(std::ceil(std::log2(std::max(amax, 1e-4) / 448.0))));
}

// The FP8 view of one 128-value row (one scale): fp8(hadamard(x)). `ambiguous` gets, per value, whether
// its rounding sits within rel_slack of a midpoint (see round_e4m3_ref).
inline std::vector<double> fp8_view_ref(const std::vector<double>& x, std::vector<bool>* ambiguous = nullptr,
                                        double rel_slack = 0) {
  const std::vector<double> h = naive_hadamard(x);
  double amax = 0;
  for (double v : h) amax = std::max(amax, std::fabs(v));
  const double s = fp8_scale_ref(amax);
  std::vector<double> out(h.size());
  if (ambiguous) ambiguous->assign(h.size(), false);
  for (size_t i = 0; i < h.size(); ++i) {
    bool amb = false;
    out[i] = round_e4m3_ref(h[i] / s, &amb, rel_slack) * s;
    if (ambiguous) (*ambiguous)[i] = amb;
  }
  return out;
}

}  // namespace dsa::testing
