/* isa_scalar.c — the portable path (any CPU; the reference the vector paths are tested against). */
#define ISA_SCALAR 1
#define ISA_NAME scalar
#include "isa_impl.h"
