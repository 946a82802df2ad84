/* floor.c: the bench's floor, the same device-side work as the agent's bench script
 * (scripts/floor/bench.lua) done by a minimal C program on libmosquitto, so the bench can say
 * how close the agent comes to what the library alone allows.
 *
 *   floor -p PORT [-q QOS] [-m MAX_INFLIGHT] [-b BATCH] [-N]
 *
 * It connects (MQTT 3.1.1, user name "bench"), subscribes at QoS 1 to what the agent subscribes
 * (attributes, attribute responses, RPC responses, then RPC requests) and answers on
 * v1/devices/me/rpc/response/{id} at QoS 1, like the agent:
 *   bench_ping              -> "pong"
 *   bench_start {"n": N}    -> true, then publishes N telemetry messages
 *                              {"temperature":21.5,"humidity":40.25} (built with snprintf each
 *                              time) to v1/devices/me/telemetry as fast as the pipe takes them:
 *                              QoS 0: while libmosquitto has nothing queued (want_write false);
 *                              QoS 1: while fewer than MAX_INFLIGHT await their PUBACK.
 *   anything else (echo)    -> the request payload, unchanged
 * It sets TCP_NODELAY on its socket (as request/response clients should); -N leaves
 * libmosquitto's default (Nagle on), which is what the agent does today.
 * Its own poll() loop drives libmosquitto (loop_read / loop_write / loop_misc), as the agent's
 * does. Runs until SIGINT/SIGTERM. */
#include <signal.h>

#include "client.h"

static volatile sig_atomic_t stop_flag = 0;
static int qos = 1;
static int max_inflight = 100;
static int batch = 256;
static int nodelay = 1;
static long to_send = 0;   /* telemetry messages still to publish */
static int inflight = 0;   /* QoS 1 publishes awaiting PUBACK */
static int connected = 0;

static void on_signal(int sig) {
  (void)sig;
  stop_flag = 1;
}

static void on_connect(struct mosquitto *m, void *ud, int rc) {
  (void)ud;
  if (rc != 0) {
    fprintf(stderr, "floor: CONNACK %d\n", rc);
    stop_flag = 1;
    return;
  }
  connected = 1;
  inflight = 0;
  /* the agent's subscriptions (docs/thingsboard.md §4): on a plain broker its own RPC answers
   * come back on rpc/response/+, which it subscribes for client-side RPC; the floor takes the
   * same echo, so both do the same work per round trip */
  mosquitto_subscribe(m, NULL, "v1/devices/me/attributes", 1);
  mosquitto_subscribe(m, NULL, "v1/devices/me/attributes/response/+", 1);
  mosquitto_subscribe(m, NULL, TOPIC_RPC_RES "+", 1);
  mosquitto_subscribe(m, NULL, TOPIC_RPC_REQ "+", 1);
}

static void on_disconnect(struct mosquitto *m, void *ud, int rc) {
  (void)m;
  (void)ud;
  if (!stop_flag) fprintf(stderr, "floor: disconnected (%d)\n", rc);
  stop_flag = 1;
}

static void on_publish(struct mosquitto *m, void *ud, int mid) {
  (void)m;
  (void)ud;
  (void)mid;
  if (inflight > 0) inflight--;
}

static void on_message(struct mosquitto *m, void *ud, const struct mosquitto_message *msg) {
  (void)ud;
  const char *topic = msg->topic;
  size_t plen = strlen(TOPIC_RPC_REQ);
  if (strncmp(topic, TOPIC_RPC_REQ, plen) != 0) return;
  char res_topic[128];
  snprintf(res_topic, sizeof res_topic, TOPIC_RPC_RES "%s", topic + plen);
  const char *payload = msg->payload ? (const char *)msg->payload : "";
  if (strstr(payload, "\"bench_start\"")) {
    const char *n = strstr(payload, "\"n\":");
    to_send = n ? strtol(n + 4, NULL, 10) : 0;
    mosquitto_publish(m, NULL, res_topic, 4, "true", 1, false);
  } else if (strstr(payload, "\"bench_ping\"")) {
    mosquitto_publish(m, NULL, res_topic, 6, "\"pong\"", 1, false);
  } else {
    mosquitto_publish(m, NULL, res_topic, msg->payloadlen, msg->payload, 1, false);
  }
}

/* Publishes telemetry while the pipe has room; returns how many went out. */
static int send_some(struct mosquitto *m) {
  char buf[128];
  int sent = 0;
  double temperature = 21.5, humidity = 40.25;
  while (to_send > 0 && sent < batch) {
    if (qos == 0 ? mosquitto_want_write(m) : inflight >= max_inflight) break;
    int len = snprintf(buf, sizeof buf, "{\"temperature\":%.17g,\"humidity\":%.17g}",
                       temperature, humidity);
    int rc = mosquitto_publish(m, NULL, TOPIC_TELEMETRY, len, buf, qos, false);
    if (rc != MOSQ_ERR_SUCCESS) {
      fprintf(stderr, "floor: publish: %s\n", mosquitto_strerror(rc));
      break;
    }
    if (qos > 0) inflight++;
    to_send--;
    sent++;
  }
  return sent;
}

int main(int argc, char **argv) {
  int port = 1883;
  int opt;
  while ((opt = getopt(argc, argv, "p:q:m:b:N")) != -1) {
    switch (opt) {
      case 'p': port = (int)parse_long(optarg, "port"); break;
      case 'q': qos = (int)parse_long(optarg, "qos"); break;
      case 'm': max_inflight = (int)parse_long(optarg, "max inflight"); break;
      case 'b': batch = (int)parse_long(optarg, "batch"); break;
      case 'N': nodelay = 0; break;
      default:
        fprintf(stderr, "usage: floor -p PORT [-q 0|1] [-m MAX_INFLIGHT] [-b BATCH] [-N]\n");
        return 2;
    }
  }
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  signal(SIGPIPE, SIG_IGN);
  struct mosquitto *m = new_client("bench", nodelay);
  mosquitto_max_inflight_messages_set(m, (unsigned)max_inflight);
  mosquitto_connect_callback_set(m, on_connect);
  mosquitto_disconnect_callback_set(m, on_disconnect);
  mosquitto_publish_callback_set(m, on_publish);
  mosquitto_message_callback_set(m, on_message);
  connect_local(m, port, "floor");
  int64_t next_misc = 0;
  while (!stop_flag) {
    if (connected) send_some(m);
    int busy = connected && to_send > 0 &&
               (qos == 0 ? !mosquitto_want_write(m) : inflight < max_inflight);
    if (pump(m, busy ? 0 : 1000) < 0) break;
    int64_t now = now_ns();
    if (now >= next_misc && mosquitto_socket(m) >= 0) {
      mosquitto_loop_misc(m);
      next_misc = now + 1000000000LL;
    }
  }
  close_client(m);
  return 0;
}
