#include "clip_tokenizer.hpp"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>

#include "errors.hpp"

namespace tstitch {
namespace {

using json = nlohmann::json;

// The Split pattern of transformers' CLIP converter (the one this file implements by hand below).
constexpr const char* kClipSplit =
    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";

// Strict UTF-8 (no overlong forms, surrogates or values past U+10FFFF), as a Python str can hold it.
std::vector<UChar32> decode_utf8(const std::string& s, const std::string& what) {
  std::vector<UChar32> out;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    int len = 0;
    UChar32 cp = 0, min = 0;
    if (c < 0x80) len = 1, cp = c;
    else if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    bool ok = len > 0 && i + static_cast<size_t>(len) <= n;
    for (int k = 1; ok && k < len; ++k) {
      ok = (p[i + k] & 0xC0) == 0x80;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (!ok || cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      fail(TSTITCH_ERR_INVALID_ARGUMENT, what + " is not valid UTF-8 (bad byte 0x" +
                                             std::string(1, "0123456789abcdef"[c >> 4]) + std::string(1, "0123456789abcdef"[c & 15]) +
                                             " at byte " + std::to_string(i) + "); pass prompts as UTF-8 text");
    out.push_back(cp);
    i += static_cast<size_t>(len);
  }
  return out;
}

void append_utf8(UChar32 c, std::string* out) {
  if (c < 0x80) {
    *out += static_cast<char>(c);
  } else if (c < 0x800) {
    *out += static_cast<char>(0xC0 | (c >> 6)), *out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    *out += static_cast<char>(0xE0 | (c >> 12)), *out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    *out += static_cast<char>(0xF0 | (c >> 18)), *out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    *out += static_cast<char>(0x80 | ((c >> 6) & 0x3F)), *out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

bool is_space(UChar32 c) { return u_hasBinaryProperty(c, UCHAR_WHITE_SPACE); }  // Oniguruma's Unicode \s
bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
bool is_other(UChar32 c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

// The normalizer: NFC, runs of \s -> " ", then Rust's char::to_lowercase per character (full, context-free).
std::vector<UChar32> normalize(const std::vector<UChar32>& text) {
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(st);
  if (U_FAILURE(st)) fail(TSTITCH_ERR_INTERNAL, "ICU has no NFC normalizer");
  icu::UnicodeString u;
  for (UChar32 c : text) u.append(c);
  const icu::UnicodeString composed = nfc->normalize(u, st);
  if (U_FAILURE(st)) fail(TSTITCH_ERR_INTERNAL, "ICU could not normalize a prompt");
  std::vector<UChar32> spaced;
  for (int32_t i = 0; i < composed.length();) {
    const UChar32 c = composed.char32At(i);
    i = composed.moveIndex32(i, 1);
    if (is_space(c)) {
      if (spaced.empty() || spaced.back() != -1) spaced.push_back(-1);  // -1 marks a run being replaced
    } else {
      spaced.push_back(c);
    }
  }
  std::vector<UChar32> out;
  for (UChar32 c : spaced) {
    if (c == -1) {
      out.push_back(' ');
      continue;
    }
    icu::UnicodeString one(c);
    one.toLower(icu::Locale::getRoot());
    for (int32_t i = 0; i < one.length(); i = one.moveIndex32(i, 1)) out.push_back(one.char32At(i));
  }
  return out;
}

bool starts_with(const std::vector<UChar32>& s, size_t i, const char* lit) {
  for (size_t k = 0; lit[k]; ++k)
    if (i + k >= s.size() || s[i + k] != static_cast<unsigned char>(lit[k])) return false;
  return true;
}

// Length of a contraction ('s 't 're 've 'm 'll 'd) at i, or 0.
size_t contraction(const std::vector<UChar32>& s, size_t i) {
  for (const char* c : {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"})
    if (starts_with(s, i, c)) return std::char_traits<char>::length(c);
  return 0;
}

template <typename Pred>
size_t run(const std::vector<UChar32>& s, size_t i, Pred pred) {
  size_t j = i;
  while (j < s.size() && pred(s[j])) ++j;
  return j - i;
}

// CLIP's Split: the matches are the pieces (leftmost alternative first), everything else (whitespace) removed.
std::vector<std::vector<UChar32>> clip_split(const std::vector<UChar32>& s) {
  std::vector<std::vector<UChar32>> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = 0;
    if (starts_with(s, i, "<|startoftext|>")) n = 15;
    else if (starts_with(s, i, "<|endoftext|>")) n = 13;
    else if ((n = contraction(s, i))) {}
    else if ((n = run(s, i, is_letter))) {}
    else if (is_number(s[i])) n = 1;
    else n = run(s, i, is_other);
    if (n == 0) {  // whitespace: not part of any piece
      ++i;
      continue;
    }
    out.emplace_back(s.begin() + static_cast<std::ptrdiff_t>(i), s.begin() + static_cast<std::ptrdiff_t>(i + n));
    i += n;
  }
  return out;
}

// ByteLevel's GPT-2 split of one piece (no whitespace in it): 's|'t|..| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+
std::vector<std::vector<UChar32>> gpt2_split(const std::vector<UChar32>& s) {
  std::vector<std::vector<UChar32>> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = contraction(s, i);
    if (!n) n = run(s, i, is_letter);
    if (!n) n = run(s, i, is_number);
    if (!n) n = run(s, i, is_other);
    if (!n) n = run(s, i, is_space);
    out.emplace_back(s.begin() + static_cast<std::ptrdiff_t>(i), s.begin() + static_cast<std::ptrdiff_t>(i + n));
    i += n;
  }
  return out;
}

[[noreturn]] void unsupported(const std::string& path, const std::string& what) {
  fail(TSTITCH_ERR_BUNDLE, "the bundle's tokenizer " + path + " is not the CLIP BPE tokenizer this runtime implements (" + what +
                               "); rebuild the bundle, or pass token ids (prompt_tokens)");
}

}  // namespace

ClipTokenizer::ClipTokenizer(const std::string& path, int64_t max_length, int64_t pad_id)
    : max_length_(max_length), pad_id_(pad_id) {
  json j;
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(TSTITCH_ERR_BUNDLE, "cannot read the bundle's tokenizer " + path);
    try {
      j = json::parse(in);
    } catch (const std::exception& e) {
      fail(TSTITCH_ERR_BUNDLE, "the bundle's tokenizer " + path + " is not valid JSON (" + std::string(e.what()).substr(0, 160) +
                                   "); rebuild the bundle");
    }
  }
  if (max_length_ < 2) unsupported(path, "max_length < 2");
  try {
    const json& norm = j.at("normalizer");
    const json want_norm = json::parse(R"({"type": "Sequence", "normalizers": [{"type": "NFC"},
        {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]})");
    if (norm != want_norm) unsupported(path, "normalizer");
    const json& pre = j.at("pre_tokenizer");
    const json& pres = pre.at("pretokenizers");
    if (pre.at("type") != "Sequence" || pres.size() != 2 || pres[0].at("type") != "Split" ||
        pres[0].at("pattern").at("Regex") != kClipSplit || pres[0].at("behavior") != "Removed" || pres[0].at("invert") != true ||
        pres[1].at("type") != "ByteLevel" || pres[1].at("add_prefix_space") != false || pres[1].at("use_regex") != true)
      unsupported(path, "pre_tokenizer");
    const json& model = j.at("model");
    if (model.at("type") != "BPE" || !model.value("continuing_subword_prefix", json("")).is_string() ||
        model.value("continuing_subword_prefix", json("")) != "" || model.value("fuse_unk", false) ||
        model.value("byte_fallback", false) || model.value("ignore_merges", false) || !model.value("dropout", json()).is_null())
      unsupported(path, "model");
    suffix_ = model.value("end_of_word_suffix", json("")).is_string() ? model.value("end_of_word_suffix", std::string()) : "";
    for (auto it = model.at("vocab").begin(); it != model.at("vocab").end(); ++it) vocab_[it.key()] = it.value().get<int64_t>();
    int64_t rank = 0;
    for (const json& m : model.at("merges")) {
      std::string a, b;
      if (m.is_array() && m.size() == 2) a = m[0].get<std::string>(), b = m[1].get<std::string>();
      else if (m.is_string() && m.get<std::string>().find(' ') != std::string::npos)
        a = m.get<std::string>().substr(0, m.get<std::string>().find(' ')), b = m.get<std::string>().substr(m.get<std::string>().find(' ') + 1);
      else unsupported(path, "a merge is neither [a, b] nor \"a b\"");
      auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end()) unsupported(path, "merge " + a + " " + b + " outside the vocab");
      merges_.emplace(std::make_pair(ia->second, ib->second), std::make_pair(rank++, iab->second));
    }
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto u = vocab_.find(model["unk_token"].get<std::string>());
      if (u != vocab_.end()) unk_ = u->second;
    }
    for (const json& t : j.at("added_tokens")) {
      if (t.value("normalized", false) || t.value("lstrip", false) || t.value("rstrip", false) || t.value("single_word", false))
        unsupported(path, "added token options");
      added_.emplace_back(t.at("content").get<std::string>(), t.at("id").get<int64_t>());
    }
    const json& post = j.at("post_processor");
    if (post.at("type") != "RobertaProcessing") unsupported(path, "post_processor");
    bos_ = post.at("cls").at(1).get<int64_t>(), eos_ = post.at("sep").at(1).get<int64_t>();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    unsupported(path, std::string("unexpected layout: ") + std::string(e.what()).substr(0, 120));
  }
  // GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 + n in byte order
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    byte_char_[b].clear();
    append_utf8(printable ? b : 256 + extra++, &byte_char_[b]);
  }
}

void ClipTokenizer::bpe(const std::string& piece, std::vector<int64_t>* out) const {
  // tokenizers' BPE::merge_word + Word::merge_all: one symbol per character (the last with the suffix), then
  // merges popped from a min-heap on (rank, position), stale entries skipped.
  std::vector<std::string> chars;
  for (unsigned char b : piece) chars.push_back(byte_char_[b]);
  struct Sym {
    int64_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Sym> syms;
  for (size_t i = 0; i < chars.size(); ++i) {
    const std::string tok = i + 1 == chars.size() ? chars[i] + suffix_ : chars[i];
    auto it = vocab_.find(tok);
    if (it == vocab_.end() && unk_ < 0) fail(TSTITCH_ERR_BUNDLE, "the bundle's tokenizer has no token for a byte and no unk token");
    syms.push_back({it != vocab_.end() ? it->second : unk_, static_cast<int>(i) - 1,
                    i + 1 < chars.size() ? static_cast<int>(i) + 1 : -1, true});
  }
  struct Merge {
    int64_t rank;
    int pos;
    int64_t new_id;
    bool operator>(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue;
  auto push = [&](int pos) {
    if (pos < 0 || syms[pos].next < 0) return;
    auto m = merges_.find({syms[pos].id, syms[syms[pos].next].id});
    if (m != merges_.end()) queue.push({m->second.first, pos, m->second.second});
  };
  for (int i = 0; i + 1 < static_cast<int>(syms.size()); ++i) push(i);
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Sym& left = syms[top.pos];
    if (!left.alive || left.next < 0) continue;
    auto m = merges_.find({left.id, syms[left.next].id});
    if (m == merges_.end() || m->second.second != top.new_id) continue;  // an expired entry
    const int right = left.next;
    left.id = top.new_id;
    syms[right].alive = false;
    left.next = syms[right].next;
    if (left.next >= 0) syms[left.next].prev = top.pos;
    push(left.prev);
    push(top.pos);
  }
  for (const Sym& s : syms)
    if (s.alive) out->push_back(s.id);
}

std::vector<int64_t> ClipTokenizer::encode_full(const std::string& text, const std::string& what) const {
  decode_utf8(text, what);  // refuses invalid UTF-8 before anything else
  std::vector<int64_t> ids = {bos_};
  auto segment = [&](const std::string& seg) {
    if (seg.empty()) return;
    for (const auto& piece : clip_split(normalize(decode_utf8(seg, what))))
      for (const auto& word : gpt2_split(piece)) {
        std::string bytes;
        for (UChar32 c : word) append_utf8(c, &bytes);
        bpe(bytes, &ids);
      }
  };
  // special tokens are matched on the raw text first (leftmost; the longest at one position)
  size_t at = 0;
  while (at < text.size()) {
    size_t best = std::string::npos, best_len = 0;
    int64_t best_id = 0;
    for (const auto& [content, id] : added_) {
      if (content.empty()) continue;
      const size_t p = text.find(content, at);
      if (p != std::string::npos && (p < best || (p == best && content.size() > best_len))) best = p, best_len = content.size(), best_id = id;
    }
    if (best == std::string::npos) {
      segment(text.substr(at));
      break;
    }
    segment(text.substr(at, best - at));
    ids.push_back(best_id);
    at = best + best_len;
  }
  ids.push_back(eos_);
  return ids;
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text, const std::string& what, bool* truncated) const {
  std::vector<int64_t> full = encode_full(text, what);
  const bool cut = static_cast<int64_t>(full.size()) > max_length_;
  if (cut) {  // pipeline/text.py: keep BOS + the first tokens, end with EOS, as diffusers does
    const int64_t last = full.back();
    full.resize(static_cast<size_t>(max_length_ - 1));
    full.push_back(last);
  }
  if (truncated) *truncated = cut;
  full.resize(static_cast<size_t>(max_length_), pad_id_);
  return full;
}

}  // namespace tstitch
