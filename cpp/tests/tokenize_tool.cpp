// tests/test_cpp_tokenizer.py's driver: prompts (a JSON array of strings) -> the C++ CLIP tokenizer's ids.
//   tstitch_tokenize <tokenizer.json> <max_length> <pad_id> <prompts.json> <out.json>
// out.json: {"full": [[ids before padding]], "padded": [[max_length ids]], "truncated": [bool]}; errors: one line, exit 2.
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "clip_tokenizer.hpp"
#include "errors.hpp"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: tstitch_tokenize <tokenizer.json> <max_length> <pad_id> <prompts.json> <out.json>\n";
    return 2;
  }
  try {
    const tstitch::ClipTokenizer tok(argv[1], std::stoll(argv[2]), std::stoll(argv[3]));
    std::ifstream in(argv[4]);
    const nlohmann::json prompts = nlohmann::json::parse(in);
    nlohmann::json out = {{"full", nlohmann::json::array()}, {"padded", nlohmann::json::array()}, {"truncated", nlohmann::json::array()}};
    for (size_t i = 0; i < prompts.size(); ++i) {
      const std::string text = prompts[i].get<std::string>();
      bool cut = false;
      out["full"].push_back(tok.encode_full(text, "prompt " + std::to_string(i)));
      out["padded"].push_back(tok.encode(text, "prompt " + std::to_string(i), &cut));
      out["truncated"].push_back(cut);
    }
    std::ofstream(argv[5]) << out.dump();
  } catch (const tstitch::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
