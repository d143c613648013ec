// AVX2 instantiation of the direct sparse convolution core (see conv.inl).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,popcnt")
#define ST_ISA avx2
#define ST_ISA_NAME "avx2"
#define ST_VECTOR_BYTES 32
#define ST_HAS_FMA 1
#include "conv.inl"
#else
#include "conv.h"
namespace sparseticket { namespace cpu { namespace avx2 {
ConvKernelTable make_conv_table() { return base::make_conv_table(); }
} } }
#endif
