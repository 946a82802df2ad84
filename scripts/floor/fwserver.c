/* fwserver.c: the bench's server role for firmware over MQTT. It plays ThingsBoard's side of
 * the chunked download on a plain broker, for the agent and for the floor (fwfloor.c) alike,
 * so both are timed by the same clock in the same place.
 *
 *   fwserver -p PORT [-s SIZE] [-T TITLE] [-V VERSION] [-t TIMEOUT_MS]
 *
 * The image is SIZE bytes (default 64 MiB) of pseudo-random data made in memory at start (a
 * fixed xorshift sequence, so nothing is committed or read from disk); its SHA256 is computed
 * with libcrypto (EVP, 64 KiB updates, as the agent's and the floor's streaming hashers feed
 * it), timed, and printed:
 *   sha256 seconds=S hex=H
 * Then it connects (MQTT 3.1.1, TCP_NODELAY), subscribes at QoS 1 to
 *   v1/devices/me/attributes/request/+  answered on .../attributes/response/{id} with
 *                                       {"shared":{"fw_title":..,"fw_version":..,"fw_size":..,
 *                                       "fw_checksum_algorithm":"SHA256","fw_checksum":..}}
 *   v2/fw/request/+/chunk/+             payload = chunk size in ASCII; answered on
 *                                       v2/fw/response/{req}/chunk/{idx} with bytes
 *                                       [idx*size, (idx+1)*size) clipped to the image (empty past
 *                                       its end), at QoS 1
 *   v1/devices/me/telemetry             watched for "fw_state":"UPDATED" (or "FAILED")
 * publishes the same fw_* attributes on v1/devices/me/attributes, and prints "ready".
 *
 * Chunk requests are held, not answered, until SIGUSR1: the device under test has connected,
 * fetched the attributes and sent its first requests, so the bench can read its RSS just before
 * any byte arrives. On the first request it prints "requested" (flushed). The clock starts at
 * SIGUSR1 (the held requests are then answered at once, as if they had just arrived) and stops
 * when the device reports fw_state UPDATED; then it prints
 *   bytes=B chunks=C requests=R seconds=S served_seconds=S2 rate_mbs=M
 * (S: release to UPDATED; S2: release to the last byte of the image handed to the socket;
 * M = B / S / 1e6) and exits 0. FAILED, a lost connection or TIMEOUT_MS (default 120000)
 * without UPDATED: exit 1. */
#include <openssl/evp.h>
#include <signal.h>

#include "client.h"

#define T_ATTR "v1/devices/me/attributes"
#define T_ATTR_REQ "v1/devices/me/attributes/request/"
#define T_ATTR_RES "v1/devices/me/attributes/response/"
#define T_FW_REQ "v2/fw/request/"
#define T_FW_RES "v2/fw/response/"

static unsigned char *image;
static size_t image_size = 64u << 20;
static const char *title = "bench", *version = "2";
static char hex[65];
static char attrs[512];

static volatile sig_atomic_t released = 0;
static int subacks = 0, done = 0, failed = 0;
static int64_t t_release = 0, t_served = 0, t_updated = 0;
static long chunks = 0, requests = 0;
static long long bytes = 0;

/* held chunk requests, answered on release */
struct held {
  char topic[128];
  long long off;
  size_t len;
};
static struct held *held;
static size_t n_held = 0, cap_held = 0;

static void on_usr1(int sig) {
  (void)sig;
  released = 1;
}

static void make_image(void) {
  image = malloc(image_size ? image_size : 1);
  if (!image) {
    fprintf(stderr, "fwserver: out of memory for a %zu byte image\n", image_size);
    exit(1);
  }
  uint64_t x = 0x9E3779B97F4A7C15ull;
  size_t i = 0;
  for (; i + 8 <= image_size; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    memcpy(image + i, &x, 8);
  }
  for (; i < image_size; i++) image[i] = (unsigned char)(i * 131);
}

static void hash_image(void) {
  unsigned char md[32];
  unsigned int mdlen = 0;
  int64_t t0 = now_ns();
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
  for (size_t off = 0; off < image_size; off += 65536) {
    size_t n = image_size - off < 65536 ? image_size - off : 65536;
    EVP_DigestUpdate(ctx, image + off, n);
  }
  EVP_DigestFinal_ex(ctx, md, &mdlen);
  EVP_MD_CTX_free(ctx);
  double s = (double)(now_ns() - t0) / 1e9;
  for (unsigned i = 0; i < mdlen; i++) sprintf(hex + 2 * i, "%02x", md[i]);
  printf("sha256 seconds=%.6f hex=%s\n", s, hex);
  fflush(stdout);
}

static void serve(struct mosquitto *m, const char *topic, long long off, size_t len) {
  int rc = mosquitto_publish(m, NULL, topic, (int)len, image + off, 1, false);
  if (rc != MOSQ_ERR_SUCCESS) {
    fprintf(stderr, "fwserver: publish chunk: %s\n", mosquitto_strerror(rc));
    exit(1);
  }
  chunks++;
  bytes += (long long)len;
  if (len > 0 && (size_t)off + len == image_size) t_served = now_ns();
}

static void on_connect(struct mosquitto *m, void *ud, int rc) {
  (void)ud;
  if (rc != 0) {
    fprintf(stderr, "fwserver: CONNACK %d\n", rc);
    exit(1);
  }
  mosquitto_subscribe(m, NULL, T_ATTR_REQ "+", 1);
  mosquitto_subscribe(m, NULL, T_FW_REQ "+/chunk/+", 1);
  mosquitto_subscribe(m, NULL, "v1/devices/me/telemetry", 1);
}

static void on_subscribe(struct mosquitto *m, void *ud, int mid, int n, const int *granted) {
  (void)ud;
  (void)mid;
  (void)n;
  (void)granted;
  if (++subacks == 3) {
    mosquitto_publish(m, NULL, T_ATTR, (int)strlen(attrs), attrs, 1, false);
    printf("ready\n");
    fflush(stdout);
  }
}

static void on_message(struct mosquitto *m, void *ud, const struct mosquitto_message *msg) {
  (void)ud;
  const char *topic = msg->topic;
  if (strncmp(topic, T_FW_REQ, strlen(T_FW_REQ)) == 0) {
    char req[32];
    long idx;
    if (sscanf(topic + strlen(T_FW_REQ), "%31[0-9]/chunk/%ld", req, &idx) != 2) return;
    char sizebuf[32] = {0};
    memcpy(sizebuf, msg->payload, msg->payloadlen < 31 ? (size_t)msg->payloadlen : 31);
    long long size = strtoll(sizebuf, NULL, 10);
    if (size <= 0) size = 65536;
    long long off = (long long)idx * size;
    size_t len = 0;
    if (off < (long long)image_size) {
      len = (size_t)((long long)image_size - off < size ? (long long)image_size - off : size);
    } else {
      off = 0;
    }
    char res[128];
    snprintf(res, sizeof res, T_FW_RES "%s/chunk/%ld", req, idx);
    if (requests++ == 0) {
      printf("requested\n");
      fflush(stdout);
    }
    if (!t_release) {
      if (n_held == cap_held) {
        cap_held = cap_held ? cap_held * 2 : 16;
        held = realloc(held, cap_held * sizeof *held);
        if (!held) exit(1);
      }
      snprintf(held[n_held].topic, sizeof held[n_held].topic, "%s", res);
      held[n_held].off = off;
      held[n_held].len = len;
      n_held++;
      return;
    }
    serve(m, res, off, len);
  } else if (strncmp(topic, T_ATTR_REQ, strlen(T_ATTR_REQ)) == 0) {
    char res[128], body[600];
    snprintf(res, sizeof res, T_ATTR_RES "%s", topic + strlen(T_ATTR_REQ));
    snprintf(body, sizeof body, "{\"shared\":%s}", attrs);
    mosquitto_publish(m, NULL, res, (int)strlen(body), body, 1, false);
  } else if (strcmp(topic, "v1/devices/me/telemetry") == 0 && msg->payloadlen > 0) {
    char *p = malloc((size_t)msg->payloadlen + 1);
    if (!p) exit(1);
    memcpy(p, msg->payload, (size_t)msg->payloadlen);
    p[msg->payloadlen] = 0;
    if (strstr(p, "\"fw_state\":\"UPDATED\"")) {
      t_updated = now_ns();
      done = 1;
    } else if (strstr(p, "\"fw_state\":\"FAILED\"")) {
      fprintf(stderr, "fwserver: the device reported %s\n", p);
      failed = done = 1;
    }
    free(p);
  }
}

int main(int argc, char **argv) {
  int port = 1883;
  long timeout_ms = 120000;
  int opt;
  while ((opt = getopt(argc, argv, "p:s:T:V:t:")) != -1) {
    switch (opt) {
      case 'p': port = (int)parse_long(optarg, "port"); break;
      case 's': image_size = (size_t)parse_long(optarg, "size"); break;
      case 'T': title = optarg; break;
      case 'V': version = optarg; break;
      case 't': timeout_ms = parse_long(optarg, "timeout"); break;
      default:
        fprintf(stderr, "usage: fwserver -p PORT [-s SIZE] [-T TITLE] [-V VERSION] [-t TIMEOUT_MS]\n");
        return 2;
    }
  }
  signal(SIGUSR1, on_usr1);
  signal(SIGPIPE, SIG_IGN);
  make_image();
  hash_image();
  snprintf(attrs, sizeof attrs,
           "{\"fw_title\":\"%s\",\"fw_version\":\"%s\",\"fw_size\":%zu,"
           "\"fw_checksum_algorithm\":\"SHA256\",\"fw_checksum\":\"%s\"}",
           title, version, image_size, hex);

  struct mosquitto *m = new_client("fwserver", 1);
  mosquitto_max_inflight_messages_set(m, 0);   /* the device's window is the only limit */
  mosquitto_connect_callback_set(m, on_connect);
  mosquitto_subscribe_callback_set(m, on_subscribe);
  mosquitto_message_callback_set(m, on_message);
  connect_local(m, port, "fwserver");
  int64_t deadline = now_ns() + (int64_t)timeout_ms * 1000000;
  while (!done) {
    if (released && !t_release) {
      t_release = now_ns();
      for (size_t i = 0; i < n_held; i++) serve(m, held[i].topic, held[i].off, held[i].len);
      n_held = 0;
    }
    if (now_ns() >= deadline) {
      fprintf(stderr, "fwserver: no UPDATED within %ld ms (%lld bytes served in %ld chunks)\n",
              timeout_ms, bytes, chunks);
      return 1;
    }
    int r = pump(m, 20);
    if (r == -2) {
      fprintf(stderr, "fwserver: connection lost\n");
      return 1;
    }
    if (r == -1) break;
    mosquitto_loop_misc(m);
  }
  close_client(m);
  if (failed) return 1;
  double s = (double)(t_updated - t_release) / 1e9;
  double s2 = t_served ? (double)(t_served - t_release) / 1e9 : 0;
  printf("bytes=%lld chunks=%ld requests=%ld seconds=%.6f served_seconds=%.6f rate_mbs=%.1f\n",
         bytes, chunks, requests, s, s2, s > 0 ? (double)bytes / s / 1e6 : 0);
  return 0;
}
