// The stages' ranges on the run's data stream (rules in data_plan.h).
#include "trainer/data_plan.h"

#include <sstream>
#include <stdexcept>

#include "trainer/checkpoint.h"

namespace dsa {

MixtureConfig mixture_config(const Recipe& recipe) {
  MixtureConfig mc;
  for (const DataSource& s : recipe.data.sources) mc.sources.push_back({s.name, s.shards, s.weight});
  mc.seed = recipe.seed;
  mc.keep_documents_contiguous = recipe.data.keep_documents_contiguous;
  return mc;
}

DataPlan::DataPlan(const Recipe& recipe, Mixture& stream) {
  stream.rewind();
  const StageSpec& first = recipe.planned.front();
  if (!first.init_from.empty()) {
    // The plan continues from where the first stage's starting checkpoint left this stream.
    TrainState ts;
    try {
      ts = read_train_state(first.init_from);
    } catch (const std::exception& e) {
      throw std::runtime_error("[data_plan] the plan starts where stage " + first.name + "'s init_from left the data "
                               "stream, and it cannot be read: " + e.what());
    }
    const std::string carried = ts.rank_data_states.empty() ? std::string() : ts.rank_data_states.front();
    if (stream.sequences_in(carried) >= 0) {
      stream.restore(carried);
      origin_note_ = "the plan starts where " + first.init_from + " left the stream (sequence " +
                     std::to_string(stream.sequences()) + ")";
    } else {
      origin_note_ = "the plan starts at the stream's beginning (" + first.init_from +
                     " carries no position on this data stream)";
    }
  }
  for (const StageSpec& s : recipe.planned) {
    Range r;
    r.state = stream.state();
    r.begin = stream.sequences();
    r.seq_len = s.seq_len;
    r.removed = s.removed;
    // NOTES: one skip per optimizer step; positions do not depend on how a step splits into ranks and
    // micro-batches (Mixture numbers sequences globally), so the plan holds for any rank count.
    for (int64_t step = 0; step < s.steps; ++step) stream.skip(s.seq_len, s.global_batch);
    r.end = stream.sequences();
    own_[s.name] = r;
    order_.push_back(s.name);
    reads_[s.name] = s.data_stage.empty() ? s.name : s.data_stage;
  }
}

const std::string& DataPlan::start_of(const std::string& name) const {
  const auto it = reads_.find(name);
  if (it == reads_.end()) throw std::runtime_error("[data_plan] no stage '" + name + "' in the data plan");
  return own_.at(it->second).state;
}

int64_t DataPlan::start_sequence(const std::string& name) const {
  const auto it = reads_.find(name);
  if (it == reads_.end()) throw std::runtime_error("[data_plan] no stage '" + name + "' in the data plan");
  return own_.at(it->second).begin;
}

std::string DataPlan::describe() const {
  std::ostringstream o;
  for (const std::string& n : order_) {
    const Range& r = own_.at(reads_.at(n));
    o << "stage " << n << ": sequences [" << r.begin << ", " << r.end << ") x " << own_.at(n).seq_len << " tokens";
    if (reads_.at(n) != n) o << " (the range of stage " << reads_.at(n) << ")";
    if (own_.at(n).removed) o << " (removed: not run)";
    o << "\n";
  }
  return o.str();
}

}  // namespace dsa
