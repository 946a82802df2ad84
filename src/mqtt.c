/* mqtt.c: one libmosquitto connection per userdata ("tb.mqtt"), driven by loop.c (no
 * libmosquitto thread). Each connection attempt gets a fresh mosquitto object, so nothing
 * queued inside libmosquitto survives a disconnect: the Lua outbox alone decides what is
 * (re)sent, which keeps delivery order and the in-flight window under our control.
 * Callbacks only copy into loop events tagged with the connection's id. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <mosquitto.h>
#include <openssl/err.h>
#include <lauxlib.h>
#include "core.h"
#include "loop.h"

#define MQTT_MT "tb.mqtt"

typedef struct {
  struct mosquitto *mosq;
  lua_Integer id;
  int keepalive;
  int64_t next_misc;
  int64_t last_in;    /* when bytes from the server last arrived (any packet, PINGRESP included) */
  int registered;     /* in loop.c's source list */
  int connected;
  int reported;       /* a "disconnect" event went out for this connection */
  char tls_why[200];  /* libmosquitto's error lines of this attempt ("host name verification failed") */
} tb_mqtt;

static lua_Integer next_conn_id = 1;

static tb_mqtt *check_conn(lua_State *L) {
  return (tb_mqtt *)luaL_checkudata(L, 1, MQTT_MT);
}

static void push_simple(const char *kind, lua_Integer id, lua_Integer b, lua_Integer c) {
  tb_event *e = tb_event_new(kind);
  if (!e) return;
  e->a = id;
  e->b = b;
  e->c = c;
  tb_loop_push(e);
}

static void on_connect(struct mosquitto *m, void *ud, int rc, int flags,
                       const mosquitto_property *props) {
  (void)props;
  tb_mqtt *c = ud;
  if (rc == 0) c->connected = 1;
  /* the log callback only serves the handshake (on_log): once connected it would format a
   * line for every packet */
  if (rc == 0) mosquitto_log_callback_set(m, NULL);
  c->last_in = tb_loop_now();
  push_simple("connect", c->id, rc, flags);
}

/* libmosquitto tells why a TLS handshake failed only through its log callback (its return
 * code is just MOSQ_ERR_TLS, and it has emptied OpenSSL's error queue): keep the error lines,
 * e.g. "host name verification failed." then "OpenSSL Error[0]: ...certificate verify failed".
 * Set from connect until CONNACK only (on_connect removes it). */
static void on_log(struct mosquitto *m, void *ud, int level, const char *s) {
  (void)m;
  tb_mqtt *c = ud;
  if (level != MOSQ_LOG_ERR) return;
  if (!strncmp(s, "Error: ", 7)) s += 7;
  size_t n = strlen(c->tls_why);
  if (n + 3 < sizeof c->tls_why)
    snprintf(c->tls_why + n, sizeof c->tls_why - n, "%s%s", n ? "; " : "", s);
}

/* the reason text for rc: libmosquitto's own words for a TLS failure, else its strerror */
static const char *why_text(tb_mqtt *c, int rc, char *buf, size_t size) {
  if (rc == MOSQ_ERR_TLS && c->tls_why[0]) {
    snprintf(buf, size, "TLS error: %s", c->tls_why);
    return buf;
  }
  return rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc);
}

static void on_disconnect(struct mosquitto *m, void *ud, int rc, const mosquitto_property *p) {
  (void)m; (void)p;
  tb_mqtt *c = ud;
  c->connected = 0;
  if (c->reported) return;  /* the watchdog already told the session */
  c->reported = 1;
  tb_event *e = tb_event_new("disconnect");
  if (!e) return;
  e->a = c->id;
  e->b = rc;
  /* errno explains MOSQ_ERR_ERRNO; capture it now, it is gone by dispatch time */
  char buf[256];
  const char *why = why_text(c, rc, buf, sizeof buf);
  tb_event_set_s1(e, why, strlen(why));
  tb_loop_push(e);
}

static void on_publish(struct mosquitto *m, void *ud, int mid, int rc, const mosquitto_property *p) {
  (void)m; (void)p;
  tb_mqtt *c = ud;
  push_simple("publish", c->id, mid, rc);
}

static void on_subscribe(struct mosquitto *m, void *ud, int mid, int n, const int *granted,
                         const mosquitto_property *p) {
  (void)m; (void)p;
  tb_mqtt *c = ud;
  int worst = 0;
  for (int i = 0; i < n; i++)
    if (granted[i] > worst) worst = granted[i];
  push_simple("subscribe", c->id, mid, worst);
}

static void on_message(struct mosquitto *m, void *ud, const struct mosquitto_message *msg,
                       const mosquitto_property *p) {
  (void)m; (void)p;
  tb_mqtt *c = ud;
  tb_event *e = tb_event_new("message");
  if (!e) return;
  e->a = c->id;
  e->b = msg->qos;
  if (tb_event_set_s1(e, msg->topic, strlen(msg->topic)) != 0 ||
      tb_event_set_s2(e, msg->payload, (size_t)msg->payloadlen) != 0) {
    free(e->s1);
    free(e);
    return;
  }
  tb_loop_push(e);
}

static int src_fd(void *ctx) {
  tb_mqtt *c = ctx;
  return c->mosq ? mosquitto_socket(c->mosq) : -1;
}

static short src_events(void *ctx) {
  tb_mqtt *c = ctx;
  return (short)(POLLIN | (mosquitto_want_write(c->mosq) ? POLLOUT : 0));
}

static int64_t src_deadline(void *ctx) {
  tb_mqtt *c = ctx;
  if (mosquitto_socket(c->mosq) < 0 || c->reported) return -1;
  int64_t dead = c->last_in + c->keepalive * 1500LL + 1;
  return c->connected && c->keepalive > 0 && dead < c->next_misc ? dead : c->next_misc;
}

/* Some failures (a TLS handshake refused, in libmosquitto 2.0.11) close the socket without
 * calling on_disconnect; nothing would ever wake the session again, so report them here. */
static void report_silent_close(tb_mqtt *c, int rc) {
  if (c->reported || mosquitto_socket(c->mosq) >= 0) return;
  c->reported = 1;
  c->connected = 0;
  char why[256];
  unsigned long ssl = ERR_get_error();
  if (ssl) {
    char buf[200];
    ERR_error_string_n(ssl, buf, sizeof buf);
    snprintf(why, sizeof why, "TLS error: %s", buf);
  } else {
    char buf[256];
    snprintf(why, sizeof why, "%s", why_text(c, rc ? rc : MOSQ_ERR_CONN_LOST, buf, sizeof buf));
  }
  ERR_clear_error();
  tb_event *e = tb_event_new("disconnect");
  if (!e) return;
  e->a = c->id;
  e->b = rc ? rc : MOSQ_ERR_CONN_LOST;
  tb_event_set_s1(e, why, strlen(why));
  tb_loop_push(e);
}

static void src_ready(void *ctx, short revents) {
  tb_mqtt *c = ctx;
  if (!c->mosq || mosquitto_socket(c->mosq) < 0) return;
  int rc = 0;
  /* bytes from the server, a PINGRESP included, are the sign of life the watchdog below
   * times the link by: libmosquitto has no callback for PINGRESP and waits a whole
   * keepalive for it, so a link that stops forwarding without closing would otherwise be
   * noticed only after 2x keepalive */
  if (revents & POLLIN) c->last_in = tb_loop_now();
  if (revents & (POLLIN | POLLHUP | POLLERR)) rc = mosquitto_loop_read(c->mosq, 1);
  if (mosquitto_socket(c->mosq) >= 0 && (revents & POLLOUT)) rc = mosquitto_loop_write(c->mosq, 1);
  report_silent_close(c, rc);
  if (mosquitto_socket(c->mosq) < 0) return;
  int64_t now = tb_loop_now();
  if (c->connected && !c->reported && c->keepalive > 0 && now - c->last_in > c->keepalive * 1500LL) {
    /* MQTT's own rule for the server side: 1.5x keepalive without a packet is a dead link */
    char why[128];
    snprintf(why, sizeof why, "no packet from the server for %lld ms (keepalive %d s): link is dead",
             (long long)(now - c->last_in), c->keepalive);
    c->reported = 1;
    c->connected = 0;
    tb_event *e = tb_event_new("disconnect");
    if (!e) return;
    e->a = c->id;
    e->b = MOSQ_ERR_KEEPALIVE;
    tb_event_set_s1(e, why, strlen(why));
    tb_loop_push(e);
    return;
  }
  if (mosquitto_socket(c->mosq) >= 0 && now >= c->next_misc) {
    report_silent_close(c, mosquitto_loop_misc(c->mosq));
    /* keepalive checks need only a few wake-ups per keepalive period */
    c->next_misc = now + (c->keepalive > 4 ? c->keepalive * 1000 / 4 : 1000);
  }
}

static void conn_release(tb_mqtt *c) {
  if (c->registered) {
    tb_loop_remove_source(c);
    c->registered = 0;
  }
  if (c->mosq) {
    mosquitto_destroy(c->mosq);
    c->mosq = NULL;
  }
}

static const char *opt_string(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  const char *s = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
  lua_pop(L, 1);
  return s;  /* still referenced by the options table */
}

static lua_Integer opt_int(lua_State *L, int t, const char *key, lua_Integer def) {
  lua_getfield(L, t, key);
  lua_Integer v = lua_isnil(L, -1) ? def : luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  return v;
}

/* nil, "what: reason" (why_text's reason) */
static int fail(lua_State *L, tb_mqtt *c, const char *what, int rc) {
  char buf[256];
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, why_text(c, rc, buf, sizeof buf));
  return 2;
}

/* core.mqtt_connect{host=, port=, client_id=, username=, password=, cafile=, capath=,
 *   cert=, key=, tls=bool, insecure=bool, keepalive=60, max_inflight=100}
 *   -> conn, id | nil, err. Starts a non-blocking connect; "connect" reports the CONNACK. */
static int l_mqtt_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  const char *host = opt_string(L, 1, "host");
  lua_Integer port = opt_int(L, 1, "port", 1883);
  const char *client_id = opt_string(L, 1, "client_id");
  const char *username = opt_string(L, 1, "username");
  const char *password = opt_string(L, 1, "password");
  const char *cafile = opt_string(L, 1, "cafile");
  const char *capath = opt_string(L, 1, "capath");
  const char *cert = opt_string(L, 1, "cert");
  const char *key = opt_string(L, 1, "key");
  lua_getfield(L, 1, "tls");
  int tls = lua_toboolean(L, -1);
  lua_getfield(L, 1, "insecure");
  int insecure = lua_toboolean(L, -1);
  lua_pop(L, 2);
  int keepalive = (int)opt_int(L, 1, "keepalive", 60);
  int max_inflight = (int)opt_int(L, 1, "max_inflight", 100);
  if (!host) host = "127.0.0.1";

  tb_mqtt *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  luaL_setmetatable(L, MQTT_MT);
  c->id = next_conn_id++;
  c->keepalive = keepalive;
  c->mosq = mosquitto_new(client_id && *client_id ? client_id : NULL, true, c);
  if (!c->mosq) return fail(L, c, "cannot create MQTT client", MOSQ_ERR_ERRNO);
  mosquitto_int_option(c->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
  /* an RPC answer is a PUBACK then a small PUBLISH: without this, Nagle holds the second
   * until the server's delayed ACK (~40 ms per round trip) */
  mosquitto_int_option(c->mosq, MOSQ_OPT_TCP_NODELAY, 1);
  mosquitto_max_inflight_messages_set(c->mosq, (unsigned)max_inflight);
  mosquitto_log_callback_set(c->mosq, on_log);
  mosquitto_connect_v5_callback_set(c->mosq, on_connect);
  mosquitto_disconnect_v5_callback_set(c->mosq, on_disconnect);
  mosquitto_publish_v5_callback_set(c->mosq, on_publish);
  mosquitto_subscribe_v5_callback_set(c->mosq, on_subscribe);
  mosquitto_message_v5_callback_set(c->mosq, on_message);
  int rc;
  if (username || password) {
    rc = mosquitto_username_pw_set(c->mosq, username ? username : "", password);
    if (rc) return fail(L, c, "bad credentials", rc);
  }
  if (cafile || capath || cert || tls) {
    if (!cafile && !capath) mosquitto_int_option(c->mosq, MOSQ_OPT_TLS_USE_OS_CERTS, 1);
    rc = mosquitto_tls_set(c->mosq, cafile, capath, cert, key, NULL);
    if (rc) return fail(L, c, "TLS setup failed", rc);
    if (insecure) mosquitto_tls_insecure_set(c->mosq, true);
  }
  rc = mosquitto_connect_async(c->mosq, host, (int)port, keepalive);
  if (rc) {
    int n = fail(L, c, "connect failed", rc);   /* before the release: it reads c->tls_why */
    conn_release(c);
    return n;
  }
  c->next_misc = tb_loop_now() + 1000;
  c->last_in = tb_loop_now();
  tb_source src = {src_fd, src_events, src_ready, src_deadline, c};
  if (tb_loop_add_source(&src) != 0) {
    conn_release(c);
    return tb_core_fail(L, TB_LOOP_FULL, "connect failed");
  }
  c->registered = 1;
  /* anchored until close(): the loop holds a raw pointer to it */
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, c);
  lua_pushinteger(L, c->id);
  return 2;
}

static tb_mqtt *check_open(lua_State *L) {
  tb_mqtt *c = check_conn(L);
  if (!c->mosq) luaL_error(L, "connection is closed");
  return c;
}

/* conn:publish(topic, payload, qos) -> mid | nil, err */
static int l_publish(lua_State *L) {
  tb_mqtt *c = check_open(L);
  const char *topic = luaL_checkstring(L, 2);
  size_t len;
  const char *payload = luaL_checklstring(L, 3, &len);
  int qos = (int)luaL_optinteger(L, 4, 1);
  if (qos < 0 || qos > 1) return luaL_argerror(L, 4, "QoS must be 0 or 1 (ThingsBoard answers QoS 2 like QoS 1)");
  int mid = 0;
  int rc = mosquitto_publish(c->mosq, &mid, topic, (int)len, payload, qos, false);
  if (rc) return fail(L, c, "publish failed", rc);
  lua_pushinteger(L, mid);
  return 1;
}

/* conn:subscribe(topic, qos) -> mid | nil, err */
static int l_subscribe(lua_State *L) {
  tb_mqtt *c = check_open(L);
  const char *topic = luaL_checkstring(L, 2);
  int qos = (int)luaL_optinteger(L, 3, 1);
  int mid = 0;
  int rc = mosquitto_subscribe(c->mosq, &mid, topic, qos);
  if (rc) return fail(L, c, "subscribe failed", rc);
  lua_pushinteger(L, mid);
  return 1;
}

/* conn:disconnect() -> true: sends DISCONNECT; a "disconnect" event follows */
static int l_disconnect(lua_State *L) {
  tb_mqtt *c = check_open(L);
  mosquitto_disconnect(c->mosq);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:want_write() -> bool: bytes still waiting to go out */
static int l_want_write(lua_State *L) {
  tb_mqtt *c = check_conn(L);
  lua_pushboolean(L, c->mosq && mosquitto_want_write(c->mosq));
  return 1;
}

/* conn:close(): drops the socket and the libmosquitto state at once, without events */
static int l_close(lua_State *L) {
  tb_mqtt *c = check_conn(L);
  if (c->mosq) {
    conn_release(c);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, c);
  }
  return 0;
}

static int l_gc(lua_State *L) {
  conn_release(check_conn(L));
  return 0;
}

static int l_tostring(lua_State *L) {
  tb_mqtt *c = check_conn(L);
  lua_pushfstring(L, "tb.mqtt #%d (%s)", (int)c->id, c->mosq ? (c->connected ? "connected" : "connecting") : "closed");
  return 1;
}

int tb_mqtt_open(lua_State *L) {
  static int initialised = 0;
  if (!initialised) {
    mosquitto_lib_init();
    initialised = 1;
  }
  static const luaL_Reg methods[] = {
    {"publish", l_publish}, {"subscribe", l_subscribe}, {"disconnect", l_disconnect},
    {"want_write", l_want_write}, {"close", l_close}, {"__gc", l_gc}, {"__close", l_gc},
    {"__tostring", l_tostring}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"mqtt_connect", l_mqtt_connect}, {NULL, NULL}};
  tb_core_register(L, MQTT_MT, methods, fns);
  return 0;
}
