/* A tiny assertion kit for the C tests: each CHECK counts, failures print file:line, and
 * check_done() returns the exit status ctest reads. */
#ifndef TB_CHECK_H
#define TB_CHECK_H
#include <stdio.h>
#include <string.h>

static int check_failed = 0, check_total = 0;

#define CHECK(cond) do { check_total++; if (!(cond)) { check_failed++; \
  fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); } } while (0)

#define CHECK_STR(got, want) do { const char *g_ = (got), *w_ = (want); check_total++; \
  if (!g_ || !w_ || strcmp(g_, w_) != 0) { check_failed++; \
    fprintf(stderr, "%s:%d: got \"%s\", want \"%s\"\n", __FILE__, __LINE__, g_ ? g_ : "(null)", \
            w_ ? w_ : "(null)"); } } while (0)

/* A table-driven case: fn(in) must give the text want, or NULL where want is NULL. */
struct check_case {
  const char *in, *want;
};
#define CHECK_CASES(fn, cases) check_cases((fn), (cases), sizeof (cases) / sizeof (cases)[0])

/* One check a case; a failure also names the input it was for. */
static inline void check_cases(const char *(*fn)(const char *), const struct check_case *cases, size_t n) {
  for (size_t i = 0; i < n; i++) {
    int failed = check_failed;
    const char *got = fn(cases[i].in);
    if (cases[i].want == NULL)
      CHECK(got == NULL);
    else
      CHECK_STR(got, cases[i].want);
    if (check_failed != failed)
      fprintf(stderr, "  for input \"%s\"\n", cases[i].in ? cases[i].in : "(null)");
  }
}

static int check_done(const char *suite) {
  printf("%s: %d checks, %d failed\n", suite, check_total, check_failed);
  return check_failed ? 1 : 0;
}
#endif
