/* loop.h: the single poll loop every fd of the agent is driven from. */
#ifndef TB_LOOP_H
#define TB_LOOP_H
#include <stddef.h>
#include <stdint.h>
#include <lua.h>

/* An event copied out of a library callback; dispatched to Lua only after the library call
 * returned, so no user code ever runs inside libmosquitto or libcurl. */
typedef struct tb_event {
  struct tb_event *next;
  const char *kind;      /* static string: "connect", "message", ... */
  lua_Integer a, b, c;   /* integers, meaning depends on kind */
  char *s1;              /* owned strings (may be NULL) */
  char *s2;
  size_t s1len, s2len;
} tb_event;

/* A source of fds and deadlines polled by the loop. */
typedef struct tb_source {
  int (*fd)(void *ctx);                   /* fd to poll, or -1 */
  short (*events)(void *ctx);             /* POLLIN / POLLOUT wanted */
  void (*ready)(void *ctx, short revents); /* after poll, called for every source */
  int64_t (*deadline)(void *ctx);         /* absolute ms when it needs ready(), or -1 */
  void *ctx;
} tb_source;

int64_t tb_loop_now(void);               /* monotonic milliseconds */
int64_t tb_loop_wall(void);              /* wall clock milliseconds since the epoch */
tb_event *tb_event_new(const char *kind);
int tb_event_set_s1(tb_event *e, const void *s, size_t len);
int tb_event_set_s2(tb_event *e, const void *s, size_t len);
void tb_loop_push(tb_event *e);          /* takes ownership */
/* The most sources the loop holds at once, as many as the fds a process may open by default
 * (RLIMIT_NOFILE): past it tb_loop_add_source fails and the Lua caller gets
 * nil, "...: " TB_LOOP_FULL. */
#define TB_LOOP_MAX_SOURCES 1024
#define TB_LOOP_FULL "too many open sources (1024: connections, commands, downloads)"

int tb_loop_add_source(const tb_source *src);   /* 0 ok, -1 full (TB_LOOP_MAX_SOURCES) */
/* A source that polls *fd for POLLIN and has no deadline (a signalfd, an inotify fd); ready
 * gets fd as its ctx. 0 ok, -1 full. */
int tb_loop_add_reader(int *fd, void (*ready)(void *ctx, short revents));
void tb_loop_remove_source(void *ctx);
#endif
