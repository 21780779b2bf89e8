// SPDX-License-Identifier: Apache-2.0
#pragma once
// Compile-time switches (after flash-attention's static_switch.h): turn a runtime value into
// a template constant so the hot loop has no branch on it.
#define ADREC_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                          \
    if (COND) {                                  \
      constexpr bool CONST_NAME = true;          \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr bool CONST_NAME = false;         \
      return __VA_ARGS__();                      \
    }                                            \
  }()

// Embedding widths with an unrolled path; 0 means "any D" (runtime loop).
#define ADREC_DIM_SWITCH(D, CONST_NAME, ...)                   \
  [&] {                                                        \
    switch (D) {                                               \
      case 8: { constexpr int CONST_NAME = 8; return __VA_ARGS__(); }     \
      case 16: { constexpr int CONST_NAME = 16; return __VA_ARGS__(); }   \
      case 32: { constexpr int CONST_NAME = 32; return __VA_ARGS__(); }   \
      case 64: { constexpr int CONST_NAME = 64; return __VA_ARGS__(); }   \
      case 128: { constexpr int CONST_NAME = 128; return __VA_ARGS__(); } \
      default: { constexpr int CONST_NAME = 0; return __VA_ARGS__(); }    \
    }                                                          \
  }()

#define ADREC_INDEX_SWITCH(DTYPE, TYPE_NAME, ...)       \
  [&] {                                                 \
    if ((DTYPE) == at::kInt) {                          \
      using TYPE_NAME = int32_t;                        \
      return __VA_ARGS__();                             \
    } else {                                            \
      using TYPE_NAME = int64_t;                        \
      return __VA_ARGS__();                             \
    }                                                   \
  }()
