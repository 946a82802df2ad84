/* Shared by the libFuzzer targets. Define FUZZ_NAME ("fuzz_json", ...) before including.
 * FAIL(fmt, ...) reports a broken property, named by its target, and aborts: libFuzzer keeps
 * the input as a finding. */
#ifndef TB_FUZZ_H
#define TB_FUZZ_H
#include <stdio.h>
#include <stdlib.h>

#define FAIL(...)                                                                              \
  do {                                                                                         \
    fprintf(stderr, FUZZ_NAME ": " __VA_ARGS__);                                               \
    fputc('\n', stderr);                                                                       \
    abort();                                                                                   \
  } while (0)
#endif
