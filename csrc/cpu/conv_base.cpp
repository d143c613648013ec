// Portable instantiation of the direct sparse convolution core (16-byte vectors).
#define ST_ISA base
#define ST_ISA_NAME "base"
#define ST_VECTOR_BYTES 16
#define ST_HAS_FMA 0
#include "conv.inl"
