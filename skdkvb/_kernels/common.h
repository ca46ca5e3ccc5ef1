/* Shared definitions of the skdkvb kernels: 16-lane float/int vectors (one
   AVX-512 register; the compiler splits them on narrower instruction sets). */
#ifndef SKDKVB_COMMON_H
#define SKDKVB_COMMON_H
#include <stdint.h>
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
#define SKDKVB_LANES 16
#endif
