// Numbers and shapes as text for the bindings' error messages, formatted without std::ostream.
// Where the toolchain links libstdc++ into the extension statically (as the GPU machine's g++
// does), the extension's copy of the stream code formats numbers through locale state shared with
// torch's libstdc++, and inserting an integer into the message's stream crashed the process;
// strings stream safely, so the messages pass numbers as text made here.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace selective_scan {

inline std::string num_text(int64_t v) { return std::to_string(v); }

// "[2, 3, 4]", as torch prints sizes.
inline std::string shape_text(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

}  // namespace selective_scan
