/* pool.h — persistent worker threads for the CPU engine (see pool.c). */
#ifndef BITNET_POOL_H
#define BITNET_POOL_H
#include <stdint.h>

/* fn(ctx, i0, i1, tid): process items [i0, i1) on thread tid (0 = the caller). */
typedef void (*bn_task)(void *ctx, int i0, int i1, int tid);

int bn_pool_set_threads(int n);
int bn_pool_threads(void);
void bn_pool_park(void);
void bn_pool_run(bn_task fn, void *ctx, int items);
#endif
