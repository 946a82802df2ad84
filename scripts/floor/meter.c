/* meter.c: the bench's measuring client for telemetry throughput. It subscribes to
 * v1/devices/me/telemetry at QoS 0 and counts the messages that arrive, timing the first to
 * the last, so the agent and the floor are measured the same way, on the receiving side.
 *
 *   meter -p PORT -n N [-s] [-w WAIT_MS] [-i IDLE_MS]
 *
 * -s: once subscribed, send the bench_start RPC ({"method":"bench_start","params":{"n":N}})
 *     on v1/devices/me/rpc/request/{id} so the device under test starts sending.
 * It stops after N messages, after IDLE_MS (default 3000) without a message once the first
 * arrived, or after WAIT_MS (default 10000) without any message at all (exit 1). Prints
 *   ready                                        (once subscribed, flushed)
 *   count=N bytes=B seconds=S rate=R            (R = (N-1)/S, messages per second)
 *
 * It speaks MQTT 3.1.1 on a plain socket (no libmosquitto): it reads 256 KiB at a time and
 * parses packets in place, so it stays far from being the bottleneck. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

static int sock = -1;

static void die(const char *what) {
  fprintf(stderr, "meter: %s: %s\n", what, errno ? strerror(errno) : "protocol error");
  exit(1);
}

static void send_all(const unsigned char *p, size_t n) {
  if (write_all(sock, p, n) != 0) die("write");
}

/* Appends an MQTT remaining-length varint; returns bytes written. */
static size_t put_varint(unsigned char *p, size_t v) {
  size_t i = 0;
  do {
    unsigned char b = v % 128;
    v /= 128;
    if (v) b |= 128;
    p[i++] = b;
  } while (v);
  return i;
}

static size_t put_str(unsigned char *p, const char *s) {
  size_t n = strlen(s);
  p[0] = (unsigned char)(n >> 8);
  p[1] = (unsigned char)n;
  memcpy(p + 2, s, n);
  return n + 2;
}

static void send_packet(unsigned char type, const unsigned char *body, size_t len) {
  unsigned char hdr[5];
  hdr[0] = type;
  size_t h = 1 + put_varint(hdr + 1, len);
  unsigned char buf[1024];
  if (h + len > sizeof buf) die("packet too large");
  memcpy(buf, hdr, h);
  memcpy(buf + h, body, len);
  send_all(buf, h + len);
}

int main(int argc, char **argv) {
  int port = 1883, start = 0;
  long n_expected = 0, wait_ms = 10000, idle_ms = 3000;
  int opt;
  while ((opt = getopt(argc, argv, "p:n:sw:i:")) != -1) {
    switch (opt) {
      case 'p': port = (int)parse_long(optarg, "port"); break;
      case 'n': n_expected = parse_long(optarg, "count"); break;
      case 's': start = 1; break;
      case 'w': wait_ms = parse_long(optarg, "wait"); break;
      case 'i': idle_ms = parse_long(optarg, "idle"); break;
      default:
        fprintf(stderr, "usage: meter -p PORT -n N [-s] [-w WAIT_MS] [-i IDLE_MS]\n");
        return 2;
    }
  }
  if (n_expected <= 0) {
    fprintf(stderr, "meter: -n N is required\n");
    return 2;
  }
  sock = socket(AF_INET, SOCK_STREAM, 0);
  if (sock < 0) die("socket");
  int one = 1;
  setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int rcvbuf = 4 << 20;
  setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((unsigned short)port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(sock, (struct sockaddr *)&sa, sizeof sa) != 0) die("connect");

  unsigned char body[512];
  size_t b = 0;
  /* CONNECT: protocol MQTT level 4, clean session, keepalive 0 (none) */
  b += put_str(body + b, "MQTT");
  body[b++] = 4;
  body[b++] = 0x02;
  body[b++] = 0;
  body[b++] = 0;
  char client_id[64];
  snprintf(client_id, sizeof client_id, "bench-meter-%d", (int)getpid());
  b += put_str(body + b, client_id);
  send_packet(0x10, body, b);
  /* SUBSCRIBE packet id 1, QoS 0 */
  b = 0;
  body[b++] = 0;
  body[b++] = 1;
  b += put_str(body + b, TOPIC_TELEMETRY);
  body[b++] = 0;
  send_packet(0x82, body, b);

  static unsigned char buf[1 << 18];
  size_t have = 0;
  int subscribed = 0;
  long count = 0;
  long long bytes = 0;
  int64_t t_first = 0, t_last = 0;
  int64_t deadline = now_ns() + (int64_t)wait_ms * 1000000;
  for (;;) {
    int64_t now = now_ns();
    if (now >= deadline) break;
    struct pollfd p = {sock, POLLIN, 0};
    int timeout = (int)((deadline - now) / 1000000) + 1;
    int r = poll(&p, 1, timeout);
    if (r < 0 && errno != EINTR) die("poll");
    if (r <= 0) continue;
    ssize_t got = read(sock, buf + have, sizeof buf - have);
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      die("read");
    }
    if (got == 0) {
      errno = 0;
      fprintf(stderr, "meter: the broker closed the connection\n");
      break;
    }
    int64_t t = now_ns();
    have += (size_t)got;
    size_t pos = 0;
    for (;;) {
      /* one packet: fixed header, remaining length, body */
      if (have - pos < 2) break;
      size_t len = 0, mul = 1, i = pos + 1;
      int complete = 0;
      while (i < have) {
        unsigned char c = buf[i++];
        len += (size_t)(c & 127) * mul;
        mul *= 128;
        if (!(c & 128)) {
          complete = 1;
          break;
        }
        if (mul > 128 * 128 * 128) die("bad remaining length");
      }
      if (!complete || have - i < len) break;
      unsigned char type = buf[pos] >> 4;
      if (type == 3) { /* PUBLISH */
        size_t tlen = ((size_t)buf[i] << 8) | buf[i + 1];
        size_t off = 2 + tlen + (((buf[pos] >> 1) & 3) ? 2 : 0);
        if (count == 0) t_first = t;
        t_last = t;
        count++;
        bytes += (long long)(len - off);
      } else if (type == 9 && !subscribed) { /* SUBACK */
        subscribed = 1;
        printf("ready\n");
        fflush(stdout);
        if (start) {
          char payload[128], topic[64];
          snprintf(payload, sizeof payload,
                   "{\"method\":\"bench_start\",\"params\":{\"n\":%ld}}", n_expected);
          snprintf(topic, sizeof topic, TOPIC_RPC_REQ "%d", 900000000 + (int)getpid() % 1000000);
          b = put_str(body, topic);
          memcpy(body + b, payload, strlen(payload));
          b += strlen(payload);
          send_packet(0x30, body, b);
        }
      }
      pos = i + len;
    }
    memmove(buf, buf + pos, have - pos);
    have -= pos;
    if (have == sizeof buf) die("packet larger than the buffer");
    if (count >= n_expected) break;
    if (count > 0) deadline = t + (int64_t)idle_ms * 1000000;
  }
  unsigned char disconnect[2] = {0xe0, 0};
  send_all(disconnect, 2);
  close(sock);
  double seconds = count > 1 ? (double)(t_last - t_first) / 1e9 : 0;
  double rate = seconds > 0 ? (double)(count - 1) / seconds : 0;
  printf("count=%ld bytes=%lld seconds=%.6f rate=%.0f\n", count, bytes, seconds, rate);
  return count > 0 ? 0 : 1;
}
