/* Shared definitions of the skdkvb kernels: float/int vectors as wide as the
   target's widest registers (16 lanes on AVX-512, 8 on AVX/AVX2, 4 otherwise),
   so that one vector is one register on every instruction set. */
#ifndef SKDKVB_COMMON_H
#define SKDKVB_COMMON_H
#include <stdint.h>
#if defined(__AVX512F__)
#define SKDKVB_LANES 16
#elif defined(__AVX__)
#define SKDKVB_LANES 8
#else
#define SKDKVB_LANES 4
#endif
typedef float vf __attribute__((vector_size(SKDKVB_LANES * 4)));
typedef int32_t vi __attribute__((vector_size(SKDKVB_LANES * 4)));
#endif
