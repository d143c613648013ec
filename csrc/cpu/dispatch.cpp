// Picks the kernel table for the best ISA the running CPU supports.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace sparseticket {
namespace cpu {

namespace {
KernelTable pick() {
  const char* forced = std::getenv("SPARSETICKET_ISA");
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // popcnt: the AVX2/AVX-512 units are built with it (every CPU with AVX2 has it)
  const bool popcnt = __builtin_cpu_supports("popcnt");
  const bool has512 = popcnt && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const bool has2 = popcnt && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  const bool has512 = false, has2 = false;
#endif
  if (forced && std::strcmp(forced, "base") == 0) return base::make_table();
  if (forced && std::strcmp(forced, "avx2") == 0 && has2) return avx2::make_table();
  if (has512 && !(forced && std::strcmp(forced, "avx2") == 0)) return avx512::make_table();
  if (has2) return avx2::make_table();
  return base::make_table();
}
}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = pick();
  return table;
}

}  // namespace cpu
}  // namespace sparseticket
