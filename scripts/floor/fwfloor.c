/* fwfloor.c: the bench's floor for firmware over MQTT: the device side of the chunked download
 * done by a minimal C program on libmosquitto, against the same server role (fwserver.c) as
 * the agent, so the bench can say how close the agent comes to what the library allows.
 *
 *   fwfloor -p PORT -o FILE [-c CHUNK] [-w WINDOW]
 *
 * Like the agent: connects (MQTT 3.1.1, TCP_NODELAY), subscribes at QoS 1 to
 * v1/devices/me/attributes/response/+ and v2/fw/response/+/chunk/+, requests the shared
 * attributes ({"sharedKeys":"fw_title,fw_version,fw_size,fw_checksum_algorithm,fw_checksum"}
 * on v1/devices/me/attributes/request/1), and takes fw_size and fw_checksum (SHA256) from the
 * answer. Then it keeps WINDOW chunk requests (default 4, the agent's --fw-window default)
 * outstanding on v2/fw/request/1/chunk/{idx} with payload CHUNK (default 65536) in ASCII; each
 * chunk, taken in order (one arriving early waits in a slot), must be exactly
 * min(CHUNK, size - offset) long, is written to FILE and fed to a streaming SHA256 (libcrypto
 * EVP). At the end: fsync (as the agent's sink does), compare the checksum, and report
 * {"fw_state":"UPDATED"} on v1/devices/me/telemetry at QoS 1 (FAILED on a mismatch); exit 0
 * once it is acknowledged, 1 on any error. Prints "done bytes=B sha256=H" on success. */
#include <fcntl.h>
#include <openssl/evp.h>

#include "client.h"

#define T_ATTR_REQ "v1/devices/me/attributes/request/"
#define T_ATTR_RES "v1/devices/me/attributes/response/"
#define T_FW_REQ "v2/fw/request/"
#define T_FW_RES "v2/fw/response/"

static int chunk = 65536, window = 4, fd = -1;
static int subacks = 0, have_info = 0, finished = 0, exit_code = -1;
static long long fw_size = -1, offset = 0;
static long next_idx = 0, in_flight = 0;
static char fw_checksum[129];
static EVP_MD_CTX *md;
static int report_mid = -1;

/* chunks that arrived ahead of the one we need (slot = idx % window) */
struct slot {
  long idx;
  size_t len;
  unsigned char *data;
};
static struct slot *slots;

static void fail(const char *what) {
  fprintf(stderr, "fwfloor: %s\n", what);
  exit(1);
}

static void request_more(struct mosquitto *m) {
  char topic[96], size[16];
  int slen = snprintf(size, sizeof size, "%d", chunk);
  while (in_flight < window && (long long)next_idx * chunk < fw_size) {
    snprintf(topic, sizeof topic, T_FW_REQ "1/chunk/%ld", next_idx);
    if (mosquitto_publish(m, NULL, topic, slen, size, 1, false) != MOSQ_ERR_SUCCESS)
      fail("chunk request not sent");
    next_idx++;
    in_flight++;
  }
}

static void finish(struct mosquitto *m) {
  unsigned char digest[32];
  unsigned int dlen = 0;
  char hex[65];
  EVP_DigestFinal_ex(md, digest, &dlen);
  for (unsigned i = 0; i < dlen; i++) sprintf(hex + 2 * i, "%02x", digest[i]);
  if (fsync(fd) != 0 || close(fd) != 0) fail("cannot sync the image");
  int ok = strcmp(hex, fw_checksum) == 0;
  const char *state = ok ? "{\"fw_state\":\"UPDATED\"}" : "{\"fw_state\":\"FAILED\"}";
  mosquitto_publish(m, &report_mid, "v1/devices/me/telemetry", (int)strlen(state), state, 1, false);
  if (ok) {
    printf("done bytes=%lld sha256=%s\n", offset, hex);
  } else {
    fprintf(stderr, "fwfloor: checksum mismatch: expected %s, got %s\n", fw_checksum, hex);
  }
  exit_code = ok ? 0 : 1;
  finished = 1;
}

/* consume(data, len): the chunk at `offset` */
static void consume(struct mosquitto *m, const void *data, size_t len) {
  long long expected = fw_size - offset < chunk ? fw_size - offset : chunk;
  if ((long long)len != expected) {
    fprintf(stderr, "fwfloor: chunk at %lld has %zu bytes, expected %lld\n", offset, len, expected);
    exit(1);
  }
  if (write_all(fd, data, len) != 0) fail("write");
  EVP_DigestUpdate(md, data, len);
  offset += (long long)len;
  in_flight--;
  if (offset == fw_size) finish(m);
}

static void on_connect(struct mosquitto *m, void *ud, int rc) {
  (void)ud;
  if (rc != 0) fail("connection refused");
  mosquitto_subscribe(m, NULL, T_ATTR_RES "+", 1);
  mosquitto_subscribe(m, NULL, T_FW_RES "+/chunk/+", 1);
}

static void on_subscribe(struct mosquitto *m, void *ud, int mid, int n, const int *granted) {
  (void)ud;
  (void)mid;
  (void)n;
  (void)granted;
  if (++subacks == 2) {
    const char *req = "{\"sharedKeys\":\"fw_title,fw_version,fw_size,fw_checksum_algorithm,fw_checksum\"}";
    mosquitto_publish(m, NULL, T_ATTR_REQ "1", (int)strlen(req), req, 1, false);
  }
}

static void on_publish(struct mosquitto *m, void *ud, int mid) {
  (void)m;
  (void)ud;
  if (finished && mid == report_mid) finished = 2;
}

static void on_message(struct mosquitto *m, void *ud, const struct mosquitto_message *msg) {
  (void)ud;
  if (strncmp(msg->topic, T_FW_RES, strlen(T_FW_RES)) == 0) {
    long req, idx;
    if (!have_info || finished ||
        sscanf(msg->topic + strlen(T_FW_RES), "%ld/chunk/%ld", &req, &idx) != 2 || req != 1)
      return;
    if ((long long)idx * chunk == offset) {
      consume(m, msg->payload, (size_t)msg->payloadlen);
      /* chunks that were waiting for this one */
      for (;;) {
        if (finished) break;
        long want = (long)(offset / chunk);
        struct slot *s = &slots[want % window];
        if (s->idx != want) break;
        s->idx = -1;
        consume(m, s->data, s->len);
      }
    } else {
      struct slot *s = &slots[idx % window];
      free(s->data);
      s->data = malloc((size_t)msg->payloadlen + 1);
      if (!s->data) fail("out of memory");
      memcpy(s->data, msg->payload, (size_t)msg->payloadlen);
      s->len = (size_t)msg->payloadlen;
      s->idx = idx;
    }
    if (!finished) request_more(m);
  } else if (strncmp(msg->topic, T_ATTR_RES, strlen(T_ATTR_RES)) == 0 && !have_info) {
    char *p = malloc((size_t)msg->payloadlen + 1);
    if (!p) fail("out of memory");
    memcpy(p, msg->payload, (size_t)msg->payloadlen);
    p[msg->payloadlen] = 0;
    const char *s = strstr(p, "\"fw_size\":");
    const char *c = strstr(p, "\"fw_checksum\":\"");
    if (!s || !c || !strstr(p, "\"fw_checksum_algorithm\":\"SHA256\"")) fail("no fw_size/fw_checksum (SHA256) in the attributes");
    fw_size = strtoll(s + strlen("\"fw_size\":"), NULL, 10);
    sscanf(c + strlen("\"fw_checksum\":\""), "%128[0-9a-f]", fw_checksum);
    free(p);
    have_info = 1;
    if (fw_size == 0) finish(m);
    else request_more(m);
  }
}

int main(int argc, char **argv) {
  int port = 1883;
  const char *path = NULL;
  int opt;
  while ((opt = getopt(argc, argv, "p:o:c:w:")) != -1) {
    switch (opt) {
      case 'p': port = (int)parse_long(optarg, "port"); break;
      case 'o': path = optarg; break;
      case 'c': chunk = (int)parse_long(optarg, "chunk size"); break;
      case 'w': window = (int)parse_long(optarg, "window"); break;
      default: goto usage;
    }
  }
  if (!path || chunk < 1 || window < 1) goto usage;
  fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) fail("cannot open the output file");
  slots = calloc((size_t)window, sizeof *slots);
  if (!slots) fail("out of memory");
  for (int i = 0; i < window; i++) slots[i].idx = -1;
  md = EVP_MD_CTX_new();
  EVP_DigestInit_ex(md, EVP_sha256(), NULL);

  struct mosquitto *m = new_client("bench-fwfloor", 1);
  mosquitto_connect_callback_set(m, on_connect);
  mosquitto_subscribe_callback_set(m, on_subscribe);
  mosquitto_publish_callback_set(m, on_publish);
  mosquitto_message_callback_set(m, on_message);
  connect_local(m, port, "fwfloor");
  int64_t deadline = now_ns() + 120 * 1000000000LL;
  while (finished < 2) {
    if (now_ns() >= deadline) fail("no end within 120 s");
    int r = pump(m, 1000);
    if (r == -2) fail("connection lost");
    if (r == -1) fail("poll");
    mosquitto_loop_misc(m);
  }
  close_client(m);
  EVP_MD_CTX_free(md);
  return exit_code;
usage:
  fprintf(stderr, "usage: fwfloor -p PORT -o FILE [-c CHUNK] [-w WINDOW]\n");
  return 2;
}
