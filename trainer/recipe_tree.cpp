#include "trainer/recipe_tree.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace dsa {

namespace {

[[noreturn]] void tree_error(const std::string& where, const std::string& msg) {
  throw std::runtime_error("[recipe] " + where + ": " + msg);
}

std::string mark_where(const std::string& source, const YAML::Mark& m) {
  return m.line >= 0 ? source + ":" + std::to_string(m.line + 1) : source;
}

RNode from_yaml(const YAML::Node& y, const std::string& source, const std::string* fixed_where) {
  RNode n;
  n.where = fixed_where ? *fixed_where : mark_where(source, y.Mark());
  switch (y.Type()) {
    case YAML::NodeType::Scalar:
      n.kind = RNode::Scalar;
      n.scalar = y.Scalar();
      break;
    case YAML::NodeType::Sequence:
      n.kind = RNode::Seq;
      for (const auto& item : y) n.seq.push_back(from_yaml(item, source, fixed_where));
      break;
    case YAML::NodeType::Map:
      n.kind = RNode::Map;
      for (const auto& kv : y) {
        const std::string kw = fixed_where ? *fixed_where : mark_where(source, kv.first.Mark());
        if (!kv.first.IsScalar()) tree_error(kw, "mapping keys must be plain names");
        const std::string key = kv.first.Scalar();
        if (n.find(key)) tree_error(kw, "key '" + key + "' appears twice in one mapping");
        n.map.push_back({key, kw, from_yaml(kv.second, source, fixed_where)});
      }
      break;
    default:
      n.kind = RNode::Null;
  }
  return n;
}

std::string folder_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

void merge_into(RNode& base, const RNode& child, bool top_level);

void merge_stages(RNode& base, const RNode& child) {
  for (const RNode& st : child.seq) {
    const RNode* name = st.kind == RNode::Map ? st.find("name") : nullptr;
    if (!name || name->kind != RNode::Scalar)
      tree_error(st.where, "key 'stages': in a recipe with 'base:', every stage needs a 'name' (stages merge by name)");
    auto it = base.seq.begin();
    while (it != base.seq.end()) {
      const RNode* bn = it->kind == RNode::Map ? it->find("name") : nullptr;
      if (bn && bn->kind == RNode::Scalar && bn->scalar == name->scalar) break;
      ++it;
    }
    const RNode* remove = st.find("remove");
    if (remove) {
      if (remove->kind != RNode::Scalar || (remove->scalar != "true" && remove->scalar != "false"))
        tree_error(remove->where, "key 'stages." + name->scalar + ".remove' must be true or false");
      if (remove->scalar == "true" && it == base.seq.end())
        tree_error(st.where, "key 'stages': cannot remove stage '" + name->scalar + "': the base has no such stage");
    }
    // NOTES: a removed stage keeps its place: the stages after it read the data ranges they read in the
    // base recipe (trainer/data_plan.h), which is what makes an ablation compare the same batches.
    RNode copy = st;
    if (it == base.seq.end())
      base.seq.push_back(copy);
    else
      merge_into(*it, copy, false);
  }
}

void merge_into(RNode& base, const RNode& child, bool top_level) {
  if (base.kind != RNode::Map || child.kind != RNode::Map) {
    base = child;
    return;
  }
  for (const auto& e : child.map) {
    RNode* b = base.find(e.key);
    if (!b) {
      base.map.push_back(e);
    } else if (top_level && e.key == "stages" && b->kind == RNode::Seq && e.value.kind == RNode::Seq) {
      merge_stages(*b, e.value);
    } else {
      merge_into(*b, e.value, false);
    }
  }
}

RNode resolve_base(RNode tree, const std::string& folder, int depth) {
  if (tree.kind != RNode::Map) return tree;
  const RNode* base = tree.find("base");
  if (!base) return tree;
  if (base->kind != RNode::Scalar || base->scalar.empty())
    tree_error(base->where, "key 'base' must be the path of another recipe");
  if (depth >= 8) tree_error(base->where, "key 'base': more than 8 nested bases (a cycle?)");
  const std::string path = (!base->scalar.empty() && base->scalar[0] == '/') ? base->scalar : folder + base->scalar;
  std::ifstream f(path);
  if (!f) tree_error(base->where, "key 'base': cannot read '" + path + "'");
  std::stringstream ss;
  ss << f.rdbuf();
  RNode merged = resolve_base(parse_tree(ss.str(), path), folder_of(path), depth + 1);
  tree.erase("base");
  merge_into(merged, tree, true);
  return merged;
}

}  // namespace

const RNode* RNode::find(const std::string& key) const {
  for (const auto& e : map)
    if (e.key == key) return &e.value;
  return nullptr;
}

RNode* RNode::find(const std::string& key) {
  for (auto& e : map)
    if (e.key == key) return &e.value;
  return nullptr;
}

const RNode::Entry* RNode::entry(const std::string& key) const {
  for (const auto& e : map)
    if (e.key == key) return &e;
  return nullptr;
}

void RNode::set(const std::string& key, RNode value, const std::string& key_where) {
  for (auto& e : map)
    if (e.key == key) {
      e.value = std::move(value);
      e.key_where = key_where;
      return;
    }
  map.push_back({key, key_where, std::move(value)});
}

bool RNode::erase(const std::string& key) {
  for (auto it = map.begin(); it != map.end(); ++it)
    if (it->key == key) {
      map.erase(it);
      return true;
    }
  return false;
}

const char* RNode::kind_name() const {
  switch (kind) {
    case Scalar: return "a value";
    case Map: return "a mapping";
    case Seq: return "a list";
    default: return "empty";
  }
}

RNode parse_tree(const std::string& text, const std::string& source) {
  YAML::Node y;
  try {
    y = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    tree_error(mark_where(source, e.mark), "parse error: " + e.msg);
  }
  RNode n = from_yaml(y, source, nullptr);
  if (n.kind == RNode::Null) n.where = source;  // an empty document
  return n;
}

RNode load_tree(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("[recipe] " + path + ": cannot read the recipe file");
  std::stringstream ss;
  ss << f.rdbuf();
  return resolve_base(parse_tree(ss.str(), path), folder_of(path), 0);
}

RNode load_tree_text(const std::string& text, const std::string& source) {
  return resolve_base(parse_tree(text, source), "", 0);
}

void apply_override(RNode& root, const std::string& text) {
  const std::string label = "override '" + text + "'";
  const auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0)
    throw std::runtime_error("[recipe] " + label + ": an override must look like key.path=value");
  const std::string path = text.substr(0, eq), value_text = text.substr(eq + 1);
  std::vector<std::string> segs;
  std::stringstream ps(path);
  for (std::string s; std::getline(ps, s, '.');) {
    if (s.empty()) throw std::runtime_error("[recipe] " + label + ": empty segment in key '" + path + "'");
    segs.push_back(s);
  }
  if (path.back() == '.') throw std::runtime_error("[recipe] " + label + ": empty segment in key '" + path + "'");

  RNode value;
  if (value_text.empty()) {
    value.kind = RNode::Scalar;
    value.where = label;
  } else {
    try {
      value = from_yaml(YAML::Load(value_text), label, &label);
    } catch (const YAML::Exception&) {
      value.kind = RNode::Scalar;  // not YAML: take the text as it is
      value.scalar = value_text;
      value.where = label;
    }
  }

  RNode* cur = &root;
  std::string walked;
  for (size_t i = 0; i < segs.size(); ++i) {
    const std::string& seg = segs[i];
    const bool last = i + 1 == segs.size();
    const std::string here = walked.empty() ? seg : walked + "." + seg;
    if (cur->kind == RNode::Null) {  // `section:` left empty, or the whole document
      cur->kind = RNode::Map;
      if (cur->where.empty()) cur->where = label;
    }
    if (cur->kind == RNode::Map) {
      RNode* next = cur->find(seg);
      if (last) {
        cur->set(seg, value, label);
        return;
      }
      if (!next) {
        RNode fresh;
        fresh.kind = RNode::Map;
        fresh.where = label;
        cur->set(seg, fresh, label);
        next = cur->find(seg);
      }
      cur = next;
    } else if (cur->kind == RNode::Seq) {
      size_t idx = cur->seq.size();
      const bool numeric = seg.find_first_not_of("0123456789") == std::string::npos;
      if (numeric) {
        idx = std::stoul(seg);
      } else {
        for (size_t j = 0; j < cur->seq.size(); ++j) {
          const RNode* nm = cur->seq[j].kind == RNode::Map ? cur->seq[j].find("name") : nullptr;
          if (nm && nm->kind == RNode::Scalar && nm->scalar == seg) idx = j;
        }
      }
      if (idx >= cur->seq.size()) {
        std::string names;
        for (const auto& it : cur->seq) {
          const RNode* nm = it.kind == RNode::Map ? it.find("name") : nullptr;
          if (nm && nm->kind == RNode::Scalar) names += (names.empty() ? "" : ", ") + nm->scalar;
        }
        throw std::runtime_error("[recipe] " + label + ": key '" + here + "' does not exist: '" + walked + "' has " +
                                 std::to_string(cur->seq.size()) + " entries (indices 0.." +
                                 std::to_string(cur->seq.size() ? cur->seq.size() - 1 : 0) + ")" +
                                 (names.empty() ? "" : ", named " + names));
      }
      if (last) {
        cur->seq[idx] = value;
        return;
      }
      cur = &cur->seq[idx];
    } else {
      throw std::runtime_error("[recipe] " + label + ": key '" + here + "' does not exist: '" + walked + "' is " +
                               cur->kind_name() + ", not a mapping or list");
    }
    walked = here;
  }
}

YAML::Node to_yaml_node(const RNode& n) {
  switch (n.kind) {
    case RNode::Scalar: return YAML::Node(n.scalar);
    case RNode::Seq: {
      YAML::Node s(YAML::NodeType::Sequence);
      for (const auto& it : n.seq) s.push_back(to_yaml_node(it));
      return s;
    }
    case RNode::Map: {
      YAML::Node m(YAML::NodeType::Map);
      for (const auto& e : n.map) m[e.key] = to_yaml_node(e.value);
      return m;
    }
    default: return YAML::Node(YAML::NodeType::Null);
  }
}

}  // namespace dsa
