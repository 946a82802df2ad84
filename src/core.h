/* tb.core: the C half of tbagent, a real Lua C module (luaopen_tb_core). Each area adds its
 * functions to the module table on top of the stack with tb_<area>_open(L). */
#ifndef TB_CORE_H
#define TB_CORE_H
#include <lua.h>
#include <lauxlib.h>

int tb_json_open(lua_State *L);   /* json.c: the wire JSON codec */
int tb_hash_open(lua_State *L);   /* hash.c: streaming checksums in ThingsBoard's encoding */
int tb_loop_open(lua_State *L);   /* loop.c: the poll loop, clock and signals */
int tb_mqtt_open(lua_State *L);   /* mqtt.c: libmosquitto connections */
int tb_log_open(lua_State *L);    /* log.c: the log line writer */
int tb_sink_open_lua(lua_State *L); /* sink.c: hashed download files */
int tb_fs_open(lua_State *L);     /* fs.c: the state directory's files (mkdirs, write_private) */
int tb_http_open(lua_State *L);   /* http.c: libcurl downloads in the poll loop */
int tb_watch_open(lua_State *L);  /* watch.c: inotify on the script's directory */
int tb_proc_open(lua_State *L);   /* proc.c: child processes for tb.exec */
int tb_store_open(lua_State *L);  /* store.c: the durable outbox (SQLite) */
int tb_clock_open(lua_State *L);  /* clock.c: whether the system clock is synchronised */

/* 1 when the system clock is synchronised (adjtimex; TB_CLOCK_SYNCED=1|0 overrides), else 0 */
int tb_clock_synced(void);
int tb_notify_open(lua_State *L); /* notify.c: the service manager's notify socket */

int luaopen_tb_core(lua_State *L);

/* Adds functions (may be NULL) to the module table on top of the stack and, given mt_name,
 * creates that userdata type's metatable once: the entries of methods named "__..." become
 * its metamethods, the others its __index table. */
void tb_core_register(lua_State *L, const char *mt_name, const luaL_Reg *methods,
                      const luaL_Reg *functions);

/* Pushes nil and "<fmt formatted as lua_pushfstring does>: <reason>" and returns 2, so a
 * function fails with `return tb_core_fail(L, TB_LOOP_FULL, "cannot watch %s", dir);`. */
int tb_core_fail(lua_State *L, const char *reason, const char *fmt, ...);
/* tb_core_fail with strerror(errno) as the reason. */
int tb_core_errno(lua_State *L, const char *fmt, ...);
#endif
