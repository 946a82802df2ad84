/* rpcclient.c: the bench's server-role RPC client. It plays ThingsBoard's side of server-side
 * RPC on a plain broker: requests on v1/devices/me/rpc/request/{id}, answers awaited on
 * v1/devices/me/rpc/response/{id} (subscribed at QoS 1; requests sent at QoS 1).
 *
 *   rpcclient -p PORT ping [-t TIMEOUT_MS]
 *       sends {"method":"bench_ping"} every 100 ms until one is answered; exit 0 then, 1 on
 *       timeout (default 10000 ms). The bench's readiness check for the device under test.
 *   rpcclient -p PORT echo [-n COUNT] [-w WARMUP] [-d MAX_MS] [-t TIMEOUT_MS]
 *       sends {"method":"echo","params":{"seq":i,"text":"..."}} one at a time, waits for the
 *       answer with the same id (timed with CLOCK_MONOTONIC from just before the publish to the
 *       arrival of the response): WARMUP unmeasured (for at most 1 s), then COUNT measured (for
 *       at most MAX_MS, default 10000, so a slow device bounds the run); prints
 *       n=MEASURED p50_us=.. p90_us=.. p99_us=.. max_us=.. mean_us=..
 *       exit 1 when one round trip takes longer than TIMEOUT_MS (default 5000).
 *   rpcclient -p PORT reload -f SCRIPT [-n COUNT] [-t TIMEOUT_MS] [-g GAP_MS]
 *       hot reload latency. SCRIPT is the device's live script; it answers {"method":"gen"}
 *       with a version string and its text holds the token gen-0 once (the version it answers).
 *       First waits (up to TIMEOUT_MS) for "gen-0" to be answered; then COUNT times: writes
 *       the text with gen-0 replaced by gen-I, alternately by rename (SCRIPT.tmp written, then
 *       renamed over SCRIPT: odd I) and in place (truncate and write: even I), and sends "gen"
 *       every 2 ms (one request outstanding at a time) until an answer carries "gen-I". The
 *       clock starts just before the rename or the truncating open, and stops at the arrival
 *       of that answer. A version not live within TIMEOUT_MS (default 3000) counts as a
 *       timeout and the next one is written. GAP_MS (default 300) between writes. Prints one
 *       line per write ("reload I rename|inplace MS") and then
 *         n=.. timeouts=.. p50_ms=.. max_ms=.. rename_p50_ms=.. inplace_p50_ms=..
 *       exit 0 when the run completed (timeouts included), 1 when it could not run. */
#include <fcntl.h>

#include "client.h"

static int connected = 0, subscribed = 0;
static long waiting_id = -1;   /* request id whose response we wait for */
static int answered = 0;
static int64_t answered_at = 0;
static char answer[256];   /* start of the awaited response's payload, NUL-terminated */

static void on_connect(struct mosquitto *m, void *ud, int rc) {
  (void)ud;
  if (rc != 0) {
    fprintf(stderr, "rpcclient: CONNACK %d\n", rc);
    exit(1);
  }
  connected = 1;
  mosquitto_subscribe(m, NULL, TOPIC_RPC_RES "+", 1);
}

static void on_subscribe(struct mosquitto *m, void *ud, int mid, int n, const int *granted) {
  (void)m;
  (void)ud;
  (void)mid;
  (void)n;
  (void)granted;
  subscribed = 1;
}

static void on_message(struct mosquitto *m, void *ud, const struct mosquitto_message *msg) {
  (void)m;
  (void)ud;
  int64_t t = now_ns();
  size_t plen = strlen(TOPIC_RPC_RES);
  if (strncmp(msg->topic, TOPIC_RPC_RES, plen) != 0) return;
  long id = strtol(msg->topic + plen, NULL, 10);
  if (id == waiting_id && !answered) {
    answered = 1;
    answered_at = t;
    size_t n = msg->payloadlen > 0 ? (size_t)msg->payloadlen : 0;
    if (n >= sizeof answer) n = sizeof answer - 1;
    memcpy(answer, msg->payload, n);
    answer[n] = 0;
  }
}

/* Drives the connection until cond() holds or deadline_ns passes; returns cond(). */
static int run_until(struct mosquitto *m, int (*cond)(void), int64_t deadline_ns) {
  while (!cond()) {
    int64_t now = now_ns();
    if (now >= deadline_ns) return 0;
    int64_t left_ms = (deadline_ns - now) / 1000000 + 1;
    int r = pump(m, left_ms > 1000 ? 1000 : (int)left_ms);
    if (r == -2) {
      fprintf(stderr, "rpcclient: connection lost\n");
      exit(1);
    }
    if (r == -1) return 0;
    mosquitto_loop_misc(m);
  }
  return 1;
}

static int is_subscribed(void) { return subscribed; }
static int is_answered(void) { return answered; }

static void send_request(struct mosquitto *m, long id, const char *payload) {
  char topic[96];
  snprintf(topic, sizeof topic, TOPIC_RPC_REQ "%ld", id);
  waiting_id = id;
  answered = 0;
  int rc = mosquitto_publish(m, NULL, topic, (int)strlen(payload), payload, 1, false);
  if (rc != MOSQ_ERR_SUCCESS) {
    fprintf(stderr, "rpcclient: publish: %s\n", mosquitto_strerror(rc));
    exit(1);
  }
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static int never(void) { return 0; }

static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *buf = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len + 4096 + 1 > cap) {
      cap = cap ? cap * 2 : 8192;
      char *nb = realloc(buf, cap);
      if (!nb) {
        free(buf);
        fclose(f);
        return NULL;
      }
      buf = nb;
    }
    size_t n = fread(buf + len, 1, 4096, f);
    len += n;
    if (n == 0) break;
  }
  fclose(f);
  buf[len] = 0;
  return buf;
}

static void write_or_exit(int fd, const char *p, size_t len, const char *what) {
  if (write_all(fd, p, len) != 0) {
    fprintf(stderr, "rpcclient: writing %s: %s\n", what, strerror(errno));
    exit(1);
  }
}

/* the reload mode: see the header */
static int reload_run(struct mosquitto *m, const char *path, long count, long timeout_ms, long gap_ms) {
  static const char token[] = "gen-0";
  char *text = read_file(path);
  if (!text) {
    fprintf(stderr, "rpcclient: cannot read %s\n", path);
    return 1;
  }
  char *at = strstr(text, token);
  if (!at || strstr(at + 1, token)) {
    fprintf(stderr, "rpcclient: %s must contain %s exactly once\n", path, token);
    return 1;
  }
  size_t pre = (size_t)(at - text), post_off = pre + strlen(token);
  size_t tlen = strlen(text);
  char *out = malloc(tlen + 32);
  char tmp[4096];
  if (!out || snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return 1;
  int64_t *lat = calloc((size_t)count, sizeof *lat), *lat_r = calloc((size_t)count, sizeof *lat_r),
          *lat_i = calloc((size_t)count, sizeof *lat_i);
  if (!lat || !lat_r || !lat_i) return 1;
  long n = 0, n_r = 0, n_i = 0, timeouts = 0, id = 1;
  for (long i = 0; i <= count; i++) {
    char want[32];
    snprintf(want, sizeof want, "\"gen-%ld\"", i);
    int rename_mode = i % 2 == 1;
    int64_t t0 = now_ns();
    if (i > 0) {
      int len = snprintf(out, tlen + 32, "%.*sgen-%ld%s", (int)pre, text, i, text + post_off);
      if (rename_mode) {
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) {
          fprintf(stderr, "rpcclient: cannot write %s: %s\n", tmp, strerror(errno));
          return 1;
        }
        write_or_exit(fd, out, (size_t)len, tmp);
        close(fd);
        t0 = now_ns();
        if (rename(tmp, path) != 0) {
          fprintf(stderr, "rpcclient: rename %s: %s\n", tmp, strerror(errno));
          return 1;
        }
      } else {
        t0 = now_ns();
        int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
        if (fd < 0) {
          fprintf(stderr, "rpcclient: cannot open %s: %s\n", path, strerror(errno));
          return 1;
        }
        write_or_exit(fd, out, (size_t)len, path);
        close(fd);
      }
    }
    int64_t deadline = t0 + timeout_ms * 1000000, got = 0;
    while (!got && now_ns() < deadline) {
      int64_t sent = now_ns();
      send_request(m, id++, "{\"method\":\"gen\"}");
      int64_t until = sent + 1000000000LL < deadline ? sent + 1000000000LL : deadline;
      if (run_until(m, is_answered, until) && strstr(answer, want)) {
        got = answered_at;
        break;
      }
      int64_t next = sent + 2000000;   /* poll every 2 ms */
      if (next > deadline) next = deadline;
      if (now_ns() < next) run_until(m, never, next);
    }
    if (i == 0) {
      if (!got) {
        fprintf(stderr, "rpcclient: the device never answered gen with gen-0\n");
        return 1;
      }
    } else if (!got) {
      timeouts++;
      printf("reload %ld %s timeout (> %ld ms)\n", i, rename_mode ? "rename" : "inplace", timeout_ms);
    } else {
      int64_t d = got - t0;
      lat[n++] = d;
      if (rename_mode) lat_r[n_r++] = d;
      else lat_i[n_i++] = d;
      printf("reload %ld %s %.1f\n", i, rename_mode ? "rename" : "inplace", d / 1e6);
    }
    fflush(stdout);
    if (i < count) run_until(m, never, now_ns() + gap_ms * 1000000);
  }
  qsort(lat, (size_t)n, sizeof *lat, cmp_i64);
  qsort(lat_r, (size_t)n_r, sizeof *lat_r, cmp_i64);
  qsort(lat_i, (size_t)n_i, sizeof *lat_i, cmp_i64);
#define P50(a, k) ((k) ? (a)[((k) - 1) / 2] / 1e6 : 0.0)
  printf("n=%ld timeouts=%ld p50_ms=%.1f max_ms=%.1f rename_p50_ms=%.1f inplace_p50_ms=%.1f\n", n,
         timeouts, P50(lat, n), n ? lat[n - 1] / 1e6 : 0.0, P50(lat_r, n_r), P50(lat_i, n_i));
#undef P50
  free(lat);
  free(lat_r);
  free(lat_i);
  free(out);
  free(text);
  return 0;
}

int main(int argc, char **argv) {
  int port = 1883;
  long count = -1, warmup = 200, timeout_ms = -1, max_ms = 10000, gap_ms = 300;
  const char *script = NULL;
  if (argc < 2) goto usage;
  int opt;
  while ((opt = getopt(argc, argv, "p:n:w:t:d:f:g:")) != -1) {
    switch (opt) {
      case 'p': port = (int)parse_long(optarg, "port"); break;
      case 'n': count = parse_long(optarg, "count"); break;
      case 'w': warmup = parse_long(optarg, "warmup"); break;
      case 't': timeout_ms = parse_long(optarg, "timeout"); break;
      case 'd': max_ms = parse_long(optarg, "max duration"); break;
      case 'f': script = optarg; break;
      case 'g': gap_ms = parse_long(optarg, "gap"); break;
      default: goto usage;
    }
  }
  if (optind >= argc) goto usage;
  const char *mode = argv[optind];
  int ping = strcmp(mode, "ping") == 0;
  int reload = strcmp(mode, "reload") == 0;
  if (!ping && !reload && strcmp(mode, "echo") != 0) goto usage;
  if (reload && !script) goto usage;
  if (timeout_ms < 0) timeout_ms = ping ? 10000 : reload ? 3000 : 5000;
  if (count < 0) count = reload ? 20 : 2000;
  if (count < 1) count = 1;

  struct mosquitto *m = new_client(NULL, 1);
  mosquitto_connect_callback_set(m, on_connect);
  mosquitto_subscribe_callback_set(m, on_subscribe);
  mosquitto_message_callback_set(m, on_message);
  connect_local(m, port, "rpcclient");
  if (!run_until(m, is_subscribed, now_ns() + 5000000000LL)) {
    fprintf(stderr, "rpcclient: no SUBACK within 5 s\n");
    return 1;
  }
  if (reload) {
    int rc = reload_run(m, script, count, timeout_ms, gap_ms);
    say_goodbye(m);
    return rc;
  }
  long id = 1;
  if (ping) {
    int64_t deadline = now_ns() + timeout_ms * 1000000;
    while (now_ns() < deadline) {
      send_request(m, id++, "{\"method\":\"bench_ping\"}");
      int64_t until = now_ns() + 100000000;
      if (until > deadline) until = deadline;
      if (run_until(m, is_answered, until)) {
        say_goodbye(m);
        return 0;
      }
    }
    fprintf(stderr, "rpcclient: no answer to bench_ping within %ld ms\n", timeout_ms);
    return 1;
  }
  int64_t *rtt = calloc((size_t)count, sizeof *rtt);
  if (!rtt) return 1;
  char payload[160];
  long measured = 0;
  int64_t phase_end = now_ns() + 1000000000LL;   /* warm-up: at most 1 s */
  for (long i = 0; measured < count; i++) {
    int warm = i < warmup;
    int64_t now = now_ns();
    if (now >= phase_end) {
      if (!warm) break;
      warmup = i;   /* warm-up over early: start measuring */
      warm = 0;
    }
    if (!warm && measured == 0) phase_end = now + max_ms * 1000000;
    snprintf(payload, sizeof payload,
             "{\"method\":\"echo\",\"params\":{\"seq\":%ld,\"text\":\"round trip\"}}", i);
    int64_t t0 = now_ns();
    send_request(m, id++, payload);
    if (!run_until(m, is_answered, t0 + timeout_ms * 1000000)) {
      fprintf(stderr, "rpcclient: request %ld not answered within %ld ms\n", i, timeout_ms);
      return 1;
    }
    if (!warm) rtt[measured++] = answered_at - t0;
  }
  count = measured;
  say_goodbye(m);
  int64_t sum = 0;
  for (long i = 0; i < count; i++) sum += rtt[i];
  qsort(rtt, (size_t)count, sizeof *rtt, cmp_i64);
  long i50 = (count - 1) * 50 / 100, i90 = (count - 1) * 90 / 100, i99 = (count - 1) * 99 / 100;
  printf("n=%ld p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f mean_us=%.1f\n", count,
         rtt[i50] / 1e3, rtt[i90] / 1e3, rtt[i99] / 1e3, rtt[count - 1] / 1e3,
         (double)sum / count / 1e3);
  free(rtt);
  return 0;
usage:
  fprintf(stderr, "usage: rpcclient -p PORT ping [-t MS] | echo [-n COUNT] [-w WARMUP] [-d MS] [-t MS]\n"
                  "                          | reload -f SCRIPT [-n COUNT] [-t MS] [-g GAP_MS]\n");
  return 2;
}
