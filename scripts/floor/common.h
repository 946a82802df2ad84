/* common.h: small helpers shared by the bench's floor programs and measuring clients.
 * Everything here is header-only so each program stays a single gcc invocation. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TOPIC_TELEMETRY "v1/devices/me/telemetry"
#define TOPIC_RPC_REQ "v1/devices/me/rpc/request/"
#define TOPIC_RPC_RES "v1/devices/me/rpc/response/"

static inline int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline long parse_long(const char *s, const char *what) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s) {
    fprintf(stderr, "bad %s: %s\n", what, s);
    exit(2);
  }
  return v;
}

/* write_all(fd, p, n) -> 0 once all n bytes are written, -1 (errno set) on an error */
static inline int write_all(int fd, const void *data, size_t n) {
  const unsigned char *p = data;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

#endif
