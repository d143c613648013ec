// AVX2 + FMA instantiation of the kernel core (see kernels.inl).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,popcnt")
#define ST_ISA avx2
#define ST_ISA_NAME "avx2"
#define ST_VECTOR_BYTES 32
#define ST_HAS_FMA 1
#include "kernels.inl"
#else
#include "kernels.h"
namespace sparseticket { namespace cpu { namespace avx2 {
KernelTable make_table() { return base::make_table(); }
} } }
#endif
