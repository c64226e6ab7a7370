// dsa-prep: tokenizer and corpus preparation.
//
//   dsa-prep encode --tokenizer PATH [--no-special]   UTF-8 lines on stdin -> ids, one line per line
//   dsa-prep decode --tokenizer PATH                  id lines on stdin -> text lines
//   dsa-prep corpus --tokenizer PATH --out DIR [--val-fraction F] [--seed S] [--jobs N]
//                   [--max-bytes N] [--max-files N] [--shard-tokens N] [--sample F] [--min-bytes N]
//                   [--max-doc-bytes N] [--jsonl-field NAME] [--quiet] INPUTS...   files, dirs, tarballs, JSON Lines (.jsonl[.gz|.xz|...])
//   dsa-prep retrieval --tokenizer PATH --haystack DIR --out DIR [--docs N] [--val-docs N] [--doc-tokens N]
//                   [--fact-every N] [--query-fraction F] [--key-digits N] [--value-digits N] [--seed S]
//                                                     synthetic retrieval documents (data/retrieval.h)
//   dsa-prep bench  --tokenizer PATH FILE...          single-thread encode throughput (MB/s)
//   dsa-prep info   DIR                               shard summary of a corpus directory
//   dsa-prep random --out DIR --vocab V --docs N --doc-tokens L [--seed S]
//                   a corpus of uniformly random tokens (train: N documents of L tokens, val: N/10 + 1),
//                   for memory and throughput measurements, where what the tokens say does not matter
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/retrieval.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace {

const char* kUsage =
    "usage: dsa-prep encode --tokenizer PATH [--no-special]\n"
    "       dsa-prep decode --tokenizer PATH\n"
    "       dsa-prep corpus --tokenizer PATH --out DIR [--val-fraction F] [--seed S] [--jobs N]\n"
    "                       [--max-bytes N] [--max-files N] [--shard-tokens N] [--sample F] [--min-bytes N]\n"
    "                       [--max-doc-bytes N] [--jsonl-field NAME] [--quiet] INPUTS...\n"
    "       dsa-prep retrieval --tokenizer PATH --haystack DIR --out DIR [--docs N] [--val-docs N]\n"
    "                       [--doc-tokens N] [--fact-every N] [--query-fraction F] [--key-digits N]\n"
    "                       [--value-digits N] [--seed S]\n"
    "       dsa-prep bench --tokenizer PATH FILE...\n"
    "       dsa-prep info DIR\n"
    "       dsa-prep random --out DIR --vocab V --docs N --doc-tokens L [--seed S]\n";

struct Args {
  std::string cmd, tokenizer, out;
  bool no_special = false, quiet = false;
  dsa::CorpusOptions corpus;
  dsa::RetrievalOptions retrieval;
  int64_t vocab = 0, docs = 0, doc_tokens = 0;  // random (--docs and --doc-tokens also set retrieval's)
  std::vector<std::string> rest;
};

double to_num(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw std::runtime_error("[dsa-prep] " + flag + " expects a number, got '" + v + "'");
  return x;
}

int64_t to_int(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    long long x = std::stoll(v, &used);
    if (used != v.size() || x < 0) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    throw std::runtime_error("[dsa-prep] " + flag + " expects a non-negative integer, got '" + v + "'");
  }
}

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) throw std::runtime_error(std::string("[dsa-prep] missing command\n") + kUsage);
  a.cmd = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string f = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("[dsa-prep] " + f + " needs a value");
      return argv[++i];
    };
    if (f == "--tokenizer") a.tokenizer = val();
    else if (f == "--out") a.corpus.out_dir = val();
    else if (f == "--no-special") a.no_special = true;
    else if (f == "--quiet") a.corpus.progress = false;
    else if (f == "--seed") a.corpus.seed = a.retrieval.seed = static_cast<uint64_t>(to_int(f, val()));
    else if (f == "--jobs") a.corpus.jobs = static_cast<int>(to_int(f, val()));
    else if (f == "--max-bytes") a.corpus.max_bytes = to_int(f, val());
    else if (f == "--max-files") a.corpus.max_files = to_int(f, val());
    else if (f == "--shard-tokens") a.corpus.shard_tokens = std::max<int64_t>(1, to_int(f, val()));
    else if (f == "--val-fraction") a.corpus.val_fraction = to_num(f, val());
    else if (f == "--sample") a.corpus.sample = to_num(f, val());
    else if (f == "--min-bytes") a.corpus.min_bytes = to_int(f, val());
    else if (f == "--max-doc-bytes") a.corpus.max_doc_bytes = to_int(f, val());
    else if (f == "--jsonl-field") a.corpus.jsonl_field = val();
    else if (f == "--haystack") a.retrieval.haystack = val();
    else if (f == "--docs") a.docs = a.retrieval.train_docs = to_int(f, val());
    else if (f == "--val-docs") a.retrieval.val_docs = to_int(f, val());
    else if (f == "--doc-tokens") a.doc_tokens = a.retrieval.doc_tokens = to_int(f, val());
    else if (f == "--vocab") a.vocab = to_int(f, val());
    else if (f == "--fact-every") a.retrieval.fact_every = to_int(f, val());
    else if (f == "--query-fraction") a.retrieval.query_fraction = to_num(f, val());
    else if (f == "--key-digits") a.retrieval.key_digits = static_cast<int>(to_int(f, val()));
    else if (f == "--value-digits") a.retrieval.value_digits = static_cast<int>(to_int(f, val()));
    else if (f.size() > 1 && f[0] == '-') throw std::runtime_error("[dsa-prep] unknown flag " + f + "\n" + kUsage);
    else a.rest.push_back(f);
  }
  return a;
}

dsa::Tokenizer load(const Args& a) {
  if (a.tokenizer.empty()) throw std::runtime_error("[dsa-prep] " + a.cmd + " needs --tokenizer PATH");
  return dsa::Tokenizer::from_file(a.tokenizer);
}

int cmd_encode(const Args& a) {
  dsa::Tokenizer t = load(a);
  std::string line, out;
  while (std::getline(std::cin, line)) {
    auto ids = t.encode(line, !a.no_special);
    out.clear();
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ' ';
      out += std::to_string(ids[i]);
    }
    out += '\n';
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
  return 0;
}

int cmd_decode(const Args& a) {
  dsa::Tokenizer t = load(a);
  std::string line;
  int64_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    std::vector<int32_t> ids;
    std::istringstream is(line);
    std::string tok;
    while (is >> tok) {
      char* end = nullptr;
      long v = std::strtol(tok.c_str(), &end, 10);
      if (*end || v < 0 || v >= t.vocab_size())
        throw std::runtime_error("[dsa-prep] decode: line " + std::to_string(line_no) + ": '" + tok +
                                 "' is not a token id in [0, " + std::to_string(t.vocab_size()) + ")");
      ids.push_back(static_cast<int32_t>(v));
    }
    std::string s = t.decode(ids) + "\n";
    std::fwrite(s.data(), 1, s.size(), stdout);
  }
  return 0;
}

int cmd_corpus(Args& a) {
  if (a.corpus.out_dir.empty()) throw std::runtime_error("[dsa-prep] corpus needs --out DIR");
  if (a.rest.empty()) throw std::runtime_error("[dsa-prep] corpus needs at least one input file, directory or tarball");
  dsa::Tokenizer t = load(a);
  a.corpus.inputs = a.rest;
  dsa::CorpusSummary s = dsa::build_corpus(a.corpus, t);
  std::printf("%s", dsa::format_summary(s).c_str());
  std::printf("wrote %s (see corpus.json)\n", a.corpus.out_dir.c_str());
  return 0;
}

int cmd_retrieval(Args& a) {
  if (a.corpus.out_dir.empty()) throw std::runtime_error("[dsa-prep] retrieval needs --out DIR");
  if (a.retrieval.haystack.empty())
    throw std::runtime_error("[dsa-prep] retrieval needs --haystack DIR (a corpus whose text fills the documents)");
  if (!a.rest.empty()) throw std::runtime_error("[dsa-prep] retrieval takes no inputs besides --haystack");
  dsa::Tokenizer t = load(a);
  a.retrieval.out_dir = a.corpus.out_dir;
  const dsa::RetrievalSummary s = dsa::build_retrieval_corpus(a.retrieval, t);
  std::printf("documents: %lld train, %lld val\ntokens:    %lld train, %lld val\nfacts:     %lld, %lld of them queried\n"
              "wrote %s (see corpus.json)\n",
              static_cast<long long>(s.docs_train), static_cast<long long>(s.docs_val),
              static_cast<long long>(s.tokens_train), static_cast<long long>(s.tokens_val),
              static_cast<long long>(s.facts), static_cast<long long>(s.queries), a.corpus.out_dir.c_str());
  return 0;
}

int cmd_bench(const Args& a) {
  dsa::Tokenizer t = load(a);
  if (a.rest.empty()) throw std::runtime_error("[dsa-prep] bench needs at least one text file");
  std::string text;
  for (const std::string& f : a.rest) {
    std::ifstream in(f, std::ios::binary);
    if (!in) throw std::runtime_error("[dsa-prep] bench: cannot read " + f);
    std::ostringstream ss;
    ss << in.rdbuf();
    text += ss.str();
  }
  // Encode line by line blocks of ~64 KiB, as the corpus builder sees documents; two passes: the
  // first warms the piece cache the way a long corpus run would.
  for (int pass = 0; pass < 2; ++pass) {
    auto t0 = std::chrono::steady_clock::now();
    size_t tokens = 0;
    for (size_t p = 0; p < text.size(); p += 65536) tokens += t.encode(std::string_view(text).substr(p, 65536)).size();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("pass %d: %zu bytes -> %zu tokens in %.3f s: %.1f MB/s on one core (%.2f bytes/token)\n", pass,
                text.size(), tokens, s, text.size() / s / 1e6, double(text.size()) / std::max<size_t>(tokens, 1));
  }
  return 0;
}

int cmd_info(const Args& a) {
  if (a.rest.size() != 1) throw std::runtime_error("[dsa-prep] info needs one corpus directory");
  for (const char* split : {"train", "val"}) {
    uint64_t docs = 0, toks = 0, longest = 0;
    auto files = dsa::list_shards(a.rest[0], split);
    for (const std::string& f : files) {
      dsa::ShardReader r(f);
      docs += r.n_docs();
      toks += r.n_tokens();
      for (uint64_t d = 0; d < r.n_docs(); ++d) longest = std::max(longest, r.doc_size(d));
      std::printf("%s: %llu docs, %llu tokens, vocab %llu, %u-byte tokens\n", f.c_str(),
                  (unsigned long long)r.n_docs(), (unsigned long long)r.n_tokens(),
                  (unsigned long long)r.header().vocab_size, r.header().token_bytes);
    }
    std::printf("%s: %zu shards, %llu docs, %llu tokens, longest %llu\n", split, files.size(),
                (unsigned long long)docs, (unsigned long long)toks, (unsigned long long)longest);
  }
  return 0;
}

int cmd_random(const Args& a) {
  if (a.corpus.out_dir.empty() || a.vocab < 2 || a.docs < 1 || a.doc_tokens < 1)
    throw std::runtime_error("[dsa-prep] random needs --out DIR, --vocab V >= 2, --docs N >= 1, --doc-tokens L >= 1");
  std::filesystem::create_directories(a.corpus.out_dir);
  std::mt19937_64 rng(a.corpus.seed);
  std::vector<int32_t> ids(static_cast<size_t>(a.doc_tokens));
  for (const char* split : {"train", "val"}) {
    const int64_t n = std::string(split) == "train" ? a.docs : a.docs / 10 + 1;
    dsa::ShardWriter w(a.corpus.out_dir + "/" + split + "_00000.bin", a.vocab, -1, -1);
    for (int64_t d = 0; d < n; ++d) {
      for (int32_t& t : ids) t = static_cast<int32_t>(rng() % static_cast<uint64_t>(a.vocab));
      w.add_document(ids.data(), ids.size());
    }
    w.close();
    std::printf("%s: %lld documents of %lld random tokens (vocab %lld)\n", split, static_cast<long long>(n),
                static_cast<long long>(a.doc_tokens), static_cast<long long>(a.vocab));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse(argc, argv);
    if (a.cmd == "encode") return cmd_encode(a);
    if (a.cmd == "decode") return cmd_decode(a);
    if (a.cmd == "corpus") return cmd_corpus(a);
    if (a.cmd == "retrieval") return cmd_retrieval(a);
    if (a.cmd == "bench") return cmd_bench(a);
    if (a.cmd == "info") return cmd_info(a);
    if (a.cmd == "random") return cmd_random(a);
    if (a.cmd == "-h" || a.cmd == "--help" || a.cmd == "help") {
      std::printf("%s", kUsage);
      return 0;
    }
    throw std::runtime_error("[dsa-prep] unknown command '" + a.cmd + "'\n" + kUsage);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
