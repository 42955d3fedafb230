/* core.h — internal entry points shared by core.c and forward.c. */
#ifndef BITNET_CORE_H
#define BITNET_CORE_H
#include "bitnet_cpu.h"

extern const bn_ops *bn_cur;  /* the selected instruction-set path */
void bn_gemm_run(const bn_gemm *g);
void bn_head_run(const bn_head *h, int rows);
#endif
