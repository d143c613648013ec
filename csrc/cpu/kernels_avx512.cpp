// AVX-512 instantiation of the kernel core (see kernels.inl).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")
#define ST_ISA avx512
#define ST_ISA_NAME "avx512"
#define ST_VECTOR_BYTES 64
#define ST_HAS_FMA 1
#include "kernels.inl"
#else
#include "kernels.h"
namespace sparseticket { namespace cpu { namespace avx512 {
KernelTable make_table() { return base::make_table(); }
} } }
#endif
