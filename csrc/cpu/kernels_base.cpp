// Portable instantiation of the kernel core (16-byte vectors: SSE2 on x86-64, NEON on
// arm64), for CPUs without AVX2.
#define ST_ISA base
#define ST_ISA_NAME "base"
#define ST_VECTOR_BYTES 16
#define ST_HAS_FMA 0
#include "kernels.inl"
