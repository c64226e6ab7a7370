// The recipe's document tree before validation: YAML read into plain nodes that remember where each
// value came from (file:line, or the command-line override that set it), so that `base:` merging and
// `key.path=value` overrides can rewrite the tree and every later error still points at its origin.
// Internal to trainer/recipe.cpp and its tests.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace YAML {
class Node;
}

namespace dsa {

struct RNode {
  enum Kind { Null, Scalar, Map, Seq };
  struct Entry;
  Kind kind = Null;
  std::string scalar;        // Scalar only: the text as written
  std::vector<Entry> map;    // Map only: entries in document order
  std::vector<RNode> seq;    // Seq only
  std::string where;         // "file:line" or "override 'k=v'"

  const RNode* find(const std::string& key) const;
  RNode* find(const std::string& key);
  const Entry* entry(const std::string& key) const;
  void set(const std::string& key, RNode value, const std::string& key_where);
  bool erase(const std::string& key);
  const char* kind_name() const;
};

struct RNode::Entry {
  std::string key;
  std::string key_where;  // where the key itself is written
  RNode value;
};

// Parses YAML text; `source` names the file in every location. Throws "[recipe] FILE:LINE: parse error".
RNode parse_tree(const std::string& text, const std::string& source);
// Reads a file, then resolves `base: PATH` (relative to the file's folder, chains allowed): mappings
// merge key by key, values and lists are replaced, except the top-level `stages` list, which merges by
// stage name (a matching name merges into the base's stage, a new name is appended, and an entry
// `{name: X, remove: true}` marks base stage X removed: it stays in the list, and so in the data plan,
// but does not run).
RNode load_tree(const std::string& path);
// The same for text already in memory (a `base:` is then relative to the current directory).
RNode load_tree_text(const std::string& text, const std::string& source);
// Applies one override "a.b.0.c=value" (value parsed as YAML; a list segment is an index or, for a
// list of named mappings, a name). Missing mapping keys are created: the schema check then rejects
// keys that do not exist, naming the override.
void apply_override(RNode& root, const std::string& override_text);
// Converts back to a yaml-cpp node (scalars keep their text).
YAML::Node to_yaml_node(const RNode& n);

}  // namespace dsa
