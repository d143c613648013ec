// AVX512 instantiation of the direct sparse convolution core (see conv.inl).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")
#define ST_ISA avx512
#define ST_ISA_NAME "avx512"
#define ST_VECTOR_BYTES 64
#define ST_HAS_FMA 1
#include "conv.inl"
#else
#include "conv.h"
namespace sparseticket { namespace cpu { namespace avx512 {
ConvKernelTable make_conv_table() { return base::make_conv_table(); }
} } }
#endif
