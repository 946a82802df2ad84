/* http.c: firmware downloads over HTTP(S) with libcurl's multi interface, driven by the one
 * poll loop (curl's sockets become loop sources, its timer a loop deadline): no threads, no
 * blocking. Bytes stream straight into a sink (file + hash) from the write callback, which
 * is plain C; Lua hears only "http_done" once the transfer ends. TLS is verified by
 * default. A download never grows past max_size, and resumes with a Range request.
 *
 * "http_done" event: a = download id, b = the final HTTP status (0: no response),
 * c = libcurl's CURLcode of the transfer, s1 = nil on success or a message for people,
 * s2 = the hex digest on success or, on failure, one reason code for code to branch on:
 *   "range"      a 206 answer whose range starts at another byte than the one asked for
 *   "too_large"  the body went past max_size (the announced size)
 *   "http"       the transfer completed with a final status outside 2xx (body discarded)
 *   "curl"       libcurl failed (DNS, connect, TLS, timeout, stall, cut connection...): see c
 *   "write"      the file could not be written, reset or synced (disk full, I/O error)
 * libcurl is loaded with dlopen at the first download: it drags in a dozen libraries
 * (gnutls, krb5, ldap, ssh2...) that would otherwise cost every idle agent ~3 MiB of RSS. */
#include <dlfcn.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stdio.h>
#include <stdint.h>
#include <curl/curl.h>
#include <lauxlib.h>
#include "core.h"
#include "loop.h"
#include "sink.h"

#define HTTP_MT "tb.http"
#define MAX_SOCKETS 16

typedef struct tb_http {
  CURL *easy;
  lua_Integer id;
  tb_sink sink;
  int64_t start_offset;   /* bytes already on disk when this attempt started */
  int64_t max_size;       /* -1: unknown */
  int checked_status;     /* the response status was looked at */
  int discard;            /* a non-2xx body: not part of the image */
  const char *failure;     /* reason code of an abort from on_write (see the top), or NULL */
  char failure_text[sizeof ((tb_sink *)0)->error];
  int64_t range_start;    /* start of the last response's Content-Range; -1: none */
  char errbuf[CURL_ERROR_SIZE];
  int active;
} tb_http;

typedef struct {
  curl_socket_t fd;
  int what;               /* CURL_POLL_IN / OUT / INOUT; 0 = free slot */
} curl_sock;

/* the libcurl functions used here, resolved by load_curl() */
static struct {
  void *lib;
  CURLcode (*global_init)(long);
  CURLM *(*multi_init)(void);
  CURLMcode (*multi_setopt)(CURLM *, CURLMoption, ...);
  CURLMcode (*multi_socket_action)(CURLM *, curl_socket_t, int, int *);
  CURLMsg *(*multi_info_read)(CURLM *, int *);
  CURLMcode (*multi_add_handle)(CURLM *, CURL *);
  CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
  CURL *(*easy_init)(void);
  CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
  CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
  void (*easy_cleanup)(CURL *);
  const char *(*easy_strerror)(CURLcode);
} cu;

static const char *load_curl(void) {
  if (cu.lib) return NULL;
  void *lib = dlopen("libcurl.so.4", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return dlerror();
#define RESOLVE(field, name) if (!(*(void **)&cu.field = dlsym(lib, name))) return dlerror()
  RESOLVE(global_init, "curl_global_init");
  RESOLVE(multi_init, "curl_multi_init");
  RESOLVE(multi_setopt, "curl_multi_setopt");
  RESOLVE(multi_socket_action, "curl_multi_socket_action");
  RESOLVE(multi_info_read, "curl_multi_info_read");
  RESOLVE(multi_add_handle, "curl_multi_add_handle");
  RESOLVE(multi_remove_handle, "curl_multi_remove_handle");
  RESOLVE(easy_init, "curl_easy_init");
  RESOLVE(easy_setopt, "curl_easy_setopt");
  RESOLVE(easy_getinfo, "curl_easy_getinfo");
  RESOLVE(easy_cleanup, "curl_easy_cleanup");
  RESOLVE(easy_strerror, "curl_easy_strerror");
#undef RESOLVE
  cu.lib = lib;
  return NULL;
}

static CURLM *multi = NULL;
static curl_sock socks[MAX_SOCKETS];
static int64_t curl_deadline = -1;
static lua_Integer next_http_id = 1;
static int timer_registered = 0;
static int running_handles = 0;

static void check_done(void);

static int sock_fd(void *ctx) {
  curl_sock *s = ctx;
  return s->what ? (int)s->fd : -1;
}

static short sock_events(void *ctx) {
  curl_sock *s = ctx;
  short ev = 0;
  if (s->what & CURL_POLL_IN) ev |= POLLIN;
  if (s->what & CURL_POLL_OUT) ev |= POLLOUT;
  return ev;
}

static void sock_ready(void *ctx, short revents) {
  curl_sock *s = ctx;
  if (!s->what || !revents) return;
  int flags = 0;
  if (revents & POLLIN) flags |= CURL_CSELECT_IN;
  if (revents & POLLOUT) flags |= CURL_CSELECT_OUT;
  if (revents & (POLLERR | POLLHUP)) flags |= CURL_CSELECT_ERR;
  cu.multi_socket_action(multi, s->fd, flags, &running_handles);
  check_done();
}

static int timer_fd(void *ctx) {
  (void)ctx;
  return -1;
}

static short timer_events(void *ctx) {
  (void)ctx;
  return 0;
}

static int64_t timer_deadline(void *ctx) {
  (void)ctx;
  return curl_deadline;
}

static void timer_ready(void *ctx, short revents) {
  (void)ctx; (void)revents;
  if (curl_deadline >= 0 && tb_loop_now() >= curl_deadline) {
    curl_deadline = -1;
    cu.multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running_handles);
    check_done();
  }
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  (void)easy; (void)userp; (void)socketp;
  int slot = -1;
  for (int i = 0; i < MAX_SOCKETS; i++)
    if (socks[i].what && socks[i].fd == fd) slot = i;
  if (what == CURL_POLL_REMOVE) {
    if (slot >= 0) {
      tb_loop_remove_source(&socks[slot]);
      socks[slot].what = 0;
    }
    return 0;
  }
  if (slot < 0) {
    for (int i = 0; i < MAX_SOCKETS && slot < 0; i++)
      if (!socks[i].what) slot = i;
    if (slot < 0) return -1;
    socks[slot].fd = fd;
    socks[slot].what = what;
    tb_source src = {sock_fd, sock_events, sock_ready, NULL, &socks[slot]};
    if (tb_loop_add_source(&src) != 0) {
      socks[slot].what = 0;
      return -1;
    }
  }
  socks[slot].what = what;
  return 0;
}

static int on_timer(CURLM *m, long timeout_ms, void *userp) {
  (void)m; (void)userp;
  curl_deadline = timeout_ms < 0 ? -1 : tb_loop_now() + timeout_ms;
  return 0;
}

/* the start of "Content-Range: bytes N-M/T"; a new status line (a redirect) forgets it */
static size_t on_header(char *data, size_t size, size_t n, void *userp) {
  tb_http *h = userp;
  size_t len = size * n;
  const char *p = data, *end = data + len;
  if (len >= 5 && strncasecmp(p, "HTTP/", 5) == 0) {
    h->range_start = -1;
  } else if (len > 14 && strncasecmp(p, "content-range:", 14) == 0) {
    p += 14;
    while (p < end && (*p == ' ' || *p == '\t')) p++;
    if (end - p > 6 && strncasecmp(p, "bytes ", 6) == 0) {
      int64_t v = 0;
      int digits = 0;
      for (p += 6; p < end && *p >= '0' && *p <= '9' && v < INT64_MAX / 10; p++, digits++) v = v * 10 + (*p - '0');
      if (digits && p < end && *p == '-') h->range_start = v;
    }
  }
  return len;
}

/* abort_write(h, reason, text) -> 0: on_write's result that aborts the transfer, with why */
static size_t abort_write(tb_http *h, const char *reason, const char *text) {
  h->failure = reason;
  snprintf(h->failure_text, sizeof h->failure_text, "%s", text);
  return 0;
}

static size_t on_write(char *data, size_t size, size_t n, void *userp) {
  tb_http *h = userp;
  size_t len = size * n;
  if (!h->checked_status) {
    long code = 0;
    cu.easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &code);
    h->checked_status = 1;
    if (code < 200 || code >= 300) {
      h->discard = 1;
    } else if (code == 200 && h->start_offset > 0) {
      /* the server ignored our Range: the body is the whole image from byte 0 */
      if (tb_sink_reset(&h->sink) != 0) return abort_write(h, "write", h->sink.error);
      h->start_offset = 0;
    } else if (code == 206 && h->range_start != h->start_offset) {
      char text[sizeof h->failure_text];
      snprintf(text, sizeof text, "the server sent a range starting at byte %lld, not %lld",
               (long long)h->range_start, (long long)h->start_offset);
      return abort_write(h, "range", text);
    }
  }
  if (h->discard) return len;
  if (h->max_size >= 0 && h->sink.size + (int64_t)len > h->max_size)
    return abort_write(h, "too_large", "download is larger than the announced size");
  if (tb_sink_write(&h->sink, data, len) != 0) return abort_write(h, "write", h->sink.error);
  return len;
}

static void http_release(lua_State *L, tb_http *h) {
  if (h->easy) {
    cu.multi_remove_handle(multi, h->easy);
    cu.easy_cleanup(h->easy);
    h->easy = NULL;
  }
  tb_sink_close(&h->sink);
  if (h->active && L) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, h);
  }
  h->active = 0;
}

static void check_done(void) {
  CURLMsg *msg;
  int left;
  while ((msg = cu.multi_info_read(multi, &left)) != NULL) {
    if (msg->msg != CURLMSG_DONE) continue;
    tb_http *h = NULL;
    cu.easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&h);
    if (!h) continue;
    long code = 0;
    cu.easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &code);
    tb_event *e = tb_event_new("http_done");
    if (!e) continue;
    e->a = h->id;
    e->b = code;
    e->c = msg->data.result;
    char hex[TB_HASH_HEX_MAX] = "";
    const char *why = NULL, *reason = NULL;
    if (h->failure) {
      reason = h->failure;
      why = h->failure_text;
    } else if (msg->data.result != CURLE_OK) {
      reason = "curl";
      why = h->errbuf[0] ? h->errbuf : cu.easy_strerror(msg->data.result);
    } else if (code < 200 || code >= 300) {
      reason = "http";
      why = "HTTP error status";
    } else if (tb_sink_finish(&h->sink, hex, sizeof hex) != 0) {
      /* the image is complete: synced to disk, its digest handed back */
      reason = "write";
      why = h->sink.error;
    }
    if (why) tb_event_set_s1(e, why, strlen(why));
    if (reason) tb_event_set_s2(e, reason, strlen(reason));
    else tb_event_set_s2(e, hex, strlen(hex));
    tb_loop_push(e);
    cu.multi_remove_handle(multi, h->easy);
    cu.easy_cleanup(h->easy);
    h->easy = NULL;
    tb_sink_close(&h->sink);
  }
}

static int ensure_multi(const char **why) {
  if (multi) return 0;
  *why = load_curl();
  if (*why) return -1;
  *why = "cannot initialise libcurl";
  if (cu.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return -1;
  multi = cu.multi_init();
  if (!multi) return -1;
  cu.multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  cu.multi_setopt(multi, CURLMOPT_TIMERFUNCTION, on_timer);
  if (!timer_registered) {
    tb_source src = {timer_fd, timer_events, timer_ready, timer_deadline, &curl_deadline};
    tb_loop_add_source(&src);
    timer_registered = 1;
  }
  return 0;
}

static const char *opt_str(lua_State *L, const char *key) {
  lua_getfield(L, 1, key);
  const char *s = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
  lua_pop(L, 1);
  return s;
}

static lua_Integer opt_integer(lua_State *L, const char *key, lua_Integer def) {
  lua_getfield(L, 1, key);
  lua_Integer v = lua_isnil(L, -1) ? def : luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  return v;
}

/* core.http_download{url=, path=, algorithm=, resume=bool, max_size=, cafile=, insecure=,
 *   connect_timeout_ms=, stall_seconds=} -> download, id | nil, err
 * Streams url into path; "http_done"(id, http_status, curl_code, message|nil, hex|reason)
 * ends it (see the top of this file). */
static int l_http_download(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  const char *url = opt_str(L, "url");
  const char *path = opt_str(L, "path");
  const char *alg = opt_str(L, "algorithm");
  const char *cafile = opt_str(L, "cafile");
  lua_getfield(L, 1, "resume");
  int resume = lua_toboolean(L, -1);
  lua_getfield(L, 1, "insecure");
  int insecure = lua_toboolean(L, -1);
  lua_pop(L, 2);
  lua_Integer max_size = opt_integer(L, "max_size", -1);
  lua_Integer connect_ms = opt_integer(L, "connect_timeout_ms", 15000);
  lua_Integer stall = opt_integer(L, "stall_seconds", 30);
  luaL_argcheck(L, url && path, 1, "url and path are required");
  const char *why = NULL;
  if (ensure_multi(&why) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "HTTP downloads need libcurl (Debian package libcurl4): %s", why ? why : "unknown error");
    return 2;
  }
  tb_http *h = lua_newuserdatauv(L, sizeof *h, 0);
  memset(h, 0, sizeof *h);
  h->sink.fd = -1;
  luaL_setmetatable(L, HTTP_MT);
  h->id = next_http_id++;
  h->max_size = max_size;
  if (tb_sink_open(&h->sink, path, alg, resume ? -1 : 0) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, h->sink.error);
    tb_sink_close(&h->sink);
    return 2;
  }
  h->start_offset = h->sink.size;
  if (max_size >= 0 && h->start_offset > max_size) {
    tb_sink_reset(&h->sink);
    h->start_offset = 0;
  }
  h->easy = cu.easy_init();
  if (!h->easy) {
    tb_sink_close(&h->sink);
    lua_pushnil(L);
    lua_pushliteral(L, "cannot create a curl handle");
    return 2;
  }
  cu.easy_setopt(h->easy, CURLOPT_URL, url);
  cu.easy_setopt(h->easy, CURLOPT_PRIVATE, (char *)h);
  cu.easy_setopt(h->easy, CURLOPT_WRITEFUNCTION, on_write);
  cu.easy_setopt(h->easy, CURLOPT_WRITEDATA, h);
  cu.easy_setopt(h->easy, CURLOPT_ERRORBUFFER, h->errbuf);
  cu.easy_setopt(h->easy, CURLOPT_FOLLOWLOCATION, 1L);
  cu.easy_setopt(h->easy, CURLOPT_MAXREDIRS, 5L);
  cu.easy_setopt(h->easy, CURLOPT_NOSIGNAL, 1L);
  cu.easy_setopt(h->easy, CURLOPT_PROTOCOLS_STR, "http,https");
  cu.easy_setopt(h->easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  cu.easy_setopt(h->easy, CURLOPT_CONNECTTIMEOUT_MS, (long)connect_ms);
  /* a stalled transfer (under 1 byte/s for `stall` seconds) fails and can be resumed */
  cu.easy_setopt(h->easy, CURLOPT_LOW_SPEED_LIMIT, 1L);
  cu.easy_setopt(h->easy, CURLOPT_LOW_SPEED_TIME, (long)stall);
  cu.easy_setopt(h->easy, CURLOPT_USERAGENT, "tbagent/" TB_VERSION);
  if (cafile) cu.easy_setopt(h->easy, CURLOPT_CAINFO, cafile);
  if (insecure) {
    cu.easy_setopt(h->easy, CURLOPT_SSL_VERIFYPEER, 0L);
    cu.easy_setopt(h->easy, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  cu.easy_setopt(h->easy, CURLOPT_HEADERFUNCTION, on_header);
  cu.easy_setopt(h->easy, CURLOPT_HEADERDATA, h);
  h->range_start = -1;
  /* CURLOPT_RANGE, not CURLOPT_RESUME_FROM_LARGE: with the latter libcurl fails a 200 answer
   * (CURLE_RANGE_ERROR, "HTTP server doesn't seem to support byte ranges") before on_write
   * sees it; this way a 200 restarts the sink from byte 0 and a 206 is checked above */
  char range[32];
  if (h->start_offset > 0) {
    snprintf(range, sizeof range, "%lld-", (long long)h->start_offset);
    cu.easy_setopt(h->easy, CURLOPT_RANGE, range);
  }
  if (cu.multi_add_handle(multi, h->easy) != CURLM_OK) {
    http_release(L, h);
    lua_pushnil(L);
    lua_pushliteral(L, "cannot start the download");
    return 2;
  }
  h->active = 1;
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, h);  /* alive until done or cancelled */
  lua_pushinteger(L, h->id);
  return 2;
}

/* download:progress() -> bytes on disk, bytes this attempt started from */
static int l_progress(lua_State *L) {
  tb_http *h = luaL_checkudata(L, 1, HTTP_MT);
  lua_pushinteger(L, h->sink.size);
  lua_pushinteger(L, h->start_offset);
  return 2;
}

/* download:cancel(): stops the transfer; the partial file stays for a later resume */
static int l_cancel(lua_State *L) {
  tb_http *h = luaL_checkudata(L, 1, HTTP_MT);
  http_release(L, h);
  return 0;
}

/* download:release(): forgets a finished download */
static int l_gc(lua_State *L) {
  tb_http *h = luaL_checkudata(L, 1, HTTP_MT);
  http_release(L, h);
  return 0;
}

int tb_http_open(lua_State *L) {
  static const luaL_Reg methods[] = {{"progress", l_progress}, {"cancel", l_cancel},
    {"release", l_gc}, {NULL, NULL}};
  if (luaL_newmetatable(L, HTTP_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_http_download);
  lua_setfield(L, -2, "http_download");
  return 0;
}
