#pragma once

// A minimal test harness: CHECK records a failure and continues, EXPECT_THROWS checks that a
// statement throws the given type, EXPECT_THROWS_WITH also that its message contains a fragment.
// main() returns test_exit_code().

#include <cstdio>
#include <string>

namespace test {

inline int& failures() {
  static int n = 0;
  return n;
}

inline int exit_code() {
  if (failures() == 0) {
    std::printf("all checks passed\n");
    return 0;
  }
  std::printf("%d check(s) failed\n", failures());
  return 1;
}

}  // namespace test

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++test::failures();                                                  \
    }                                                                      \
  } while (0)

#define EXPECT_THROWS(stmt, type)                                                     \
  do {                                                                                \
    bool caught_ = false;                                                             \
    try {                                                                             \
      stmt;                                                                           \
    } catch (const type&) {                                                           \
      caught_ = true;                                                                 \
    } catch (...) {                                                                   \
    }                                                                                 \
    if (!caught_) {                                                                   \
      std::printf("%s:%d: expected %s from: %s\n", __FILE__, __LINE__, #type, #stmt); \
      ++test::failures();                                                             \
    }                                                                                 \
  } while (0)

#define EXPECT_THROWS_WITH(stmt, type, fragment)                                               \
  do {                                                                                         \
    std::string message_;                                                                      \
    bool caught_ = false;                                                                      \
    try {                                                                                      \
      stmt;                                                                                    \
    } catch (const type& e_) {                                                                 \
      caught_ = true;                                                                          \
      message_ = e_.what();                                                                    \
    } catch (...) {                                                                            \
    }                                                                                          \
    if (!caught_ || message_.find(fragment) == std::string::npos) {                            \
      std::printf("%s:%d: expected %s with \"%s\" from: %s, got \"%s\"\n", __FILE__, __LINE__, \
                  #type, fragment, #stmt, message_.c_str());                                   \
      ++test::failures();                                                                      \
    }                                                                                          \
  } while (0)
