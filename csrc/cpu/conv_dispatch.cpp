// Picks the direct-convolution kernel table for the ISA kernel_table() chose.
#include <cstring>

#include "conv.h"
#include "kernels.h"

namespace sparseticket {
namespace cpu {

const ConvKernelTable& conv_kernel_table() {
  static const ConvKernelTable table = [] {
    const char* isa = kernel_table().isa;
    if (std::strcmp(isa, "avx512") == 0) return avx512::make_conv_table();
    if (std::strcmp(isa, "avx2") == 0) return avx2::make_conv_table();
    return base::make_conv_table();
  }();
  return table;
}

}  // namespace cpu
}  // namespace sparseticket
