/* client.h: the libmosquitto side shared by the bench's MQTT programs (floor, fwfloor, fwserver,
 * rpcclient): each drives its client from its own poll() loop, as the agent does. Header-only,
 * like common.h. */
#ifndef BENCH_CLIENT_H
#define BENCH_CLIENT_H

#include <mosquitto.h>
#include <poll.h>

#include "common.h"

/* new_client(username, nodelay) -> a client for MQTT 3.1.1 (username NULL: none), after
 * mosquitto_lib_init; exits when the library cannot make one */
static inline struct mosquitto *new_client(const char *username, int nodelay) {
  mosquitto_lib_init();
  struct mosquitto *m = mosquitto_new(NULL, true, NULL);
  if (!m) exit(1);
  mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
  mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, nodelay);
  if (username) mosquitto_username_pw_set(m, username, NULL);
  return m;
}

/* connect_local(m, port, who): connects to the broker on 127.0.0.1:port (keepalive 60 s), or
 * says why not, as who, and exits 1 */
static inline void connect_local(struct mosquitto *m, int port, const char *who) {
  int rc = mosquitto_connect(m, "127.0.0.1", port, 60);
  if (rc != MOSQ_ERR_SUCCESS) {
    fprintf(stderr, "%s: cannot connect to 127.0.0.1:%d: %s\n", who, port, mosquitto_strerror(rc));
    exit(1);
  }
}

/* pump(m, timeout_ms): one turn of the loop: waits up to timeout_ms for the socket, then reads
 * and writes what is due (loop_misc is the caller's). Returns poll()'s count (0 when it was
 * interrupted), -1 when poll failed (errno set), -2 when the connection is gone. */
static inline int pump(struct mosquitto *m, int timeout_ms) {
  int fd = mosquitto_socket(m);
  if (fd < 0) return -2;
  struct pollfd p = {fd, (short)(POLLIN | (mosquitto_want_write(m) ? POLLOUT : 0)), 0};
  int r = poll(&p, 1, timeout_ms);
  if (r < 0) {
    if (errno != EINTR) return -1;
    r = 0;
  }
  if (p.revents & (POLLIN | POLLHUP | POLLERR)) mosquitto_loop_read(m, 1);
  if (mosquitto_socket(m) >= 0 && mosquitto_want_write(m)) mosquitto_loop_write(m, 1);
  return r;
}

/* say_goodbye(m): DISCONNECT, written out before returning */
static inline void say_goodbye(struct mosquitto *m) {
  mosquitto_disconnect(m);
  mosquitto_loop_write(m, 1);
}

/* close_client(m): DISCONNECT, then the client and the library are released */
static inline void close_client(struct mosquitto *m) {
  say_goodbye(m);
  mosquitto_destroy(m);
  mosquitto_lib_cleanup();
}

#endif
