// Prompts as UTF-8 text -> token ids, exactly as the Python pipeline tokenizes them (pipeline/text.py:
// the `tokenizers` library on the bundle's tokenizer.json, then diffusers' padding="max_length",
// truncation=True). Implements the pipeline tokenizer.json describes for CLIP (transformers'
// CLIPTokenizerFast, which both SD encoders and SDXL's second use):
//   added (special) tokens matched on the raw text, then on the text between them:
//   normalizer  NFC, Replace(\s+ -> " "), Lowercase            (ICU: NFC, White_Space, full lowercase per char)
//   pre-tokens  Split(<specials>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+, kept), ByteLevel (GPT-2's split
//               of each piece, bytes -> GPT-2's printable characters)
//   model       BPE, end_of_word_suffix on the last character, merges by rank (lowest first, leftmost on ties)
//   post        RobertaProcessing: BOS ids EOS
// A tokenizer.json describing anything else is refused (TSTITCH_ERR_BUNDLE) instead of tokenized differently.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace tstitch {

class ClipTokenizer {
 public:
  // Reads tokenizer.json (already checked against the manifest's sha256); Error(TSTITCH_ERR_BUNDLE) naming
  // what is missing or unsupported. max_length / pad_id: the manifest's tokenizer entry.
  ClipTokenizer(const std::string& path, int64_t max_length, int64_t pad_id);
  // One prompt (UTF-8) -> max_length ids: BOS + the first max_length - 2 tokens + EOS, padded with pad_id.
  // *truncated: whether tokens were cut. Error(TSTITCH_ERR_INVALID_ARGUMENT) for invalid UTF-8, naming `what`.
  std::vector<int64_t> encode(const std::string& text, const std::string& what, bool* truncated = nullptr) const;
  // The ids before padding/truncation (BOS ... EOS): for the tests against `tokenizers`.
  std::vector<int64_t> encode_full(const std::string& text, const std::string& what) const;
  int64_t max_length() const { return max_length_; }

 private:
  void bpe(const std::string& piece, std::vector<int64_t>* out) const;
  std::unordered_map<std::string, int64_t> vocab_;
  std::map<std::pair<int64_t, int64_t>, std::pair<int64_t, int64_t>> merges_;  // (a, b) -> (rank, merged id)
  std::vector<std::pair<std::string, int64_t>> added_;  // special tokens matched on the raw text
  std::string suffix_;                                  // "</w>"
  int64_t unk_ = -1, bos_ = -1, eos_ = -1, max_length_ = 77, pad_id_ = 0;
  std::string byte_char_[256];  // GPT-2's bytes_to_unicode, as UTF-8
};

}  // namespace tstitch
