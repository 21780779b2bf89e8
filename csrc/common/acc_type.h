// SPDX-License-Identifier: Apache-2.0
#pragma once
// Accumulate in float for reduced-precision inputs and in the input type otherwise.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace adrec {
template <typename T> struct AccType { using type = T; };
template <> struct AccType<c10::Half> { using type = float; };
template <> struct AccType<c10::BFloat16> { using type = float; };
template <typename T> using acc_t = typename AccType<T>::type;
}  // namespace adrec
