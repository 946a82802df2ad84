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
 *       exit 1 when one round trip takes longer than TIMEOUT_MS (default 5000). */
#include <mosquitto.h>
#include <poll.h>
#include <unistd.h>

#include "common.h"

static int connected = 0, subscribed = 0;
static long waiting_id = -1;   /* request id whose response we wait for */
static int answered = 0;
static int64_t answered_at = 0;

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
  }
}

/* Drives the connection until cond() holds or deadline_ns passes; returns cond(). */
static int run_until(struct mosquitto *m, int (*cond)(void), int64_t deadline_ns) {
  while (!cond()) {
    int64_t now = now_ns();
    if (now >= deadline_ns) return 0;
    int fd = mosquitto_socket(m);
    if (fd < 0) {
      fprintf(stderr, "rpcclient: connection lost\n");
      exit(1);
    }
    struct pollfd p = {fd, (short)(POLLIN | (mosquitto_want_write(m) ? POLLOUT : 0)), 0};
    int64_t left_ms = (deadline_ns - now) / 1000000 + 1;
    int r = poll(&p, 1, left_ms > 1000 ? 1000 : (int)left_ms);
    if (r < 0 && errno != EINTR) return 0;
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) mosquitto_loop_read(m, 1);
    if (mosquitto_socket(m) >= 0 && mosquitto_want_write(m)) mosquitto_loop_write(m, 1);
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

int main(int argc, char **argv) {
  int port = 1883;
  long count = 2000, warmup = 200, timeout_ms = -1, max_ms = 10000;
  if (argc < 2) goto usage;
  int opt;
  while ((opt = getopt(argc, argv, "p:n:w:t:d:")) != -1) {
    switch (opt) {
      case 'p': port = (int)parse_long(optarg, "port"); break;
      case 'n': count = parse_long(optarg, "count"); break;
      case 'w': warmup = parse_long(optarg, "warmup"); break;
      case 't': timeout_ms = parse_long(optarg, "timeout"); break;
      case 'd': max_ms = parse_long(optarg, "max duration"); break;
      default: goto usage;
    }
  }
  if (optind >= argc) goto usage;
  const char *mode = argv[optind];
  int ping = strcmp(mode, "ping") == 0;
  if (!ping && strcmp(mode, "echo") != 0) goto usage;
  if (timeout_ms < 0) timeout_ms = ping ? 10000 : 5000;
  if (count < 1) count = 1;

  mosquitto_lib_init();
  struct mosquitto *m = mosquitto_new(NULL, true, NULL);
  if (!m) return 1;
  mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
  mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
  mosquitto_connect_callback_set(m, on_connect);
  mosquitto_subscribe_callback_set(m, on_subscribe);
  mosquitto_message_callback_set(m, on_message);
  if (mosquitto_connect(m, "127.0.0.1", port, 60) != MOSQ_ERR_SUCCESS) {
    fprintf(stderr, "rpcclient: cannot connect to 127.0.0.1:%d\n", port);
    return 1;
  }
  if (!run_until(m, is_subscribed, now_ns() + 5000000000LL)) {
    fprintf(stderr, "rpcclient: no SUBACK within 5 s\n");
    return 1;
  }
  long id = 1;
  if (ping) {
    int64_t deadline = now_ns() + timeout_ms * 1000000;
    while (now_ns() < deadline) {
      send_request(m, id++, "{\"method\":\"bench_ping\"}");
      int64_t until = now_ns() + 100000000;
      if (until > deadline) until = deadline;
      if (run_until(m, is_answered, until)) {
        mosquitto_disconnect(m);
        mosquitto_loop_write(m, 1);
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
  mosquitto_disconnect(m);
  mosquitto_loop_write(m, 1);
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
  fprintf(stderr, "usage: rpcclient -p PORT ping [-t MS] | echo [-n COUNT] [-w WARMUP] [-t MS]\n");
  return 2;
}
