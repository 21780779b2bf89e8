// SPDX-License-Identifier: Apache-2.0
#include "common/tuning.h"

#include <cstdlib>
#include <fstream>
#include <string>

namespace adrec {
namespace tuning {

int64_t l3_bytes() {
  static const int64_t bytes = [] {
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level(dir + "level"), size(dir + "size");
      int lv = 0;
      std::string sz;
      if (!(level >> lv) || !(size >> sz)) break;
      if (lv != 3 || sz.empty()) continue;
      const long long v = std::atoll(sz.c_str());
      const char unit = sz.back();
      return static_cast<int64_t>(v) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
    }
    return int64_t(0);
  }();
  return bytes;
}

Thresholds& thresholds() {
  static Thresholds t;
  static const bool init = [] {
    const int64_t l3 = l3_bytes();
    t.stream_out_bytes.store(l3 > 0 ? l3 / kStreamOutL3Divisor : kStreamOutFallbackBytes);
    t.direct_min_bytes.store(l3 > 0 ? l3 / kDirectMinL3Divisor : kDirectMinFallbackBytes);
    t.pool_spin_ns.store(kPoolSpinNs);
    return true;
  }();
  (void)init;
  return t;
}

}  // namespace tuning
}  // namespace adrec
