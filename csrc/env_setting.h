// The tuning variables of the environment (SELECTIVE_SCAN_*, listed in the README): each is read as
// a whole decimal integer and checked against the values it accepts, so that a typo raises an
// error naming the variable, what it accepts and what it got, instead of silently running the
// default. Torch-free, for the CUDA host code and the bindings alike; numbers enter the messages
// through std::to_string (message_text.h says why not through a stream).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace selective_scan {

// The variable's text parsed as a whole decimal integer into `value`; false if it is not one.
inline bool parse_env_integer(const char* text, long long& value) {
  char* end = nullptr;
  value = std::strtoll(text, &end, 10);
  return end != text && *end == '\0';
}

[[noreturn]] inline void throw_bad_env(const char* name, const std::string& expected, const char* text) {
  throw std::runtime_error(std::string(name) + ": expected " + expected + ", got '" + text + "'");
}

// The value of variable `name` (`fallback` when it is unset): an integer from lo to hi; `what`
// names it in the error, e.g. "a number of states" gives "expected a number of states from 1 to 64".
inline int64_t env_integer(const char* name, int64_t fallback, int64_t lo, int64_t hi, const char* what) {
  const char* text = std::getenv(name);
  if (text == nullptr) return fallback;
  long long value = 0;
  if (!parse_env_integer(text, value) || value < lo || value > hi)
    throw_bad_env(name, std::string(what) + " from " + std::to_string(lo) + " to " + std::to_string(hi), text);
  return value;
}

// The value of variable `name` (`fallback` when it is unset): one of `choices`, e.g. {1, 4} gives
// "expected 1 or 4" in the error.
inline int64_t env_choice(const char* name, int64_t fallback, std::initializer_list<int64_t> choices) {
  const char* text = std::getenv(name);
  if (text == nullptr) return fallback;
  long long value = 0;
  const bool number = parse_env_integer(text, value);
  std::string expected;
  size_t i = 0;
  for (const int64_t c : choices) {
    if (number && value == c) return value;
    expected += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + std::to_string(c);
    ++i;
  }
  throw_bad_env(name, expected, text);
}

}  // namespace selective_scan
