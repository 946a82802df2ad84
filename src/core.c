/* Module entry of tb.core: builds the module table from every area. The same objects are
 * linked into the tbagent binary (package.preload) and into build/tb/core.so for Busted.
 * Also the two shapes every area shares: registering its functions and userdata type, and
 * turning errno into Lua's nil, err. */
#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include "core.h"

void tb_core_register(lua_State *L, const char *mt_name, const luaL_Reg *methods,
                      const luaL_Reg *functions) {
  luaL_checkstack(L, 4, NULL);
  if (mt_name && luaL_newmetatable(L, mt_name)) {
    lua_newtable(L);  /* __index */
    for (const luaL_Reg *r = methods; r && r->name; r++) {
      lua_pushcfunction(L, r->func);
      lua_setfield(L, strncmp(r->name, "__", 2) == 0 ? -3 : -2, r->name);
    }
    lua_setfield(L, -2, "__index");
  }
  if (mt_name) lua_pop(L, 1);
  if (functions) luaL_setfuncs(L, functions, 0);
}

static int vfail(lua_State *L, const char *reason, const char *fmt, va_list ap) {
  lua_pushnil(L);
  lua_pushvfstring(L, fmt, ap);
  lua_pushfstring(L, ": %s", reason);
  lua_concat(L, 2);
  return 2;
}

int tb_core_fail(lua_State *L, const char *reason, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(L, reason, fmt, ap);
  va_end(ap);
  return 2;
}

int tb_core_errno(lua_State *L, const char *fmt, ...) {
  const char *reason = strerror(errno);  /* before anything Lua allocates changes errno */
  va_list ap;
  va_start(ap, fmt);
  vfail(L, reason, fmt, ap);
  va_end(ap);
  return 2;
}

int luaopen_tb_core(lua_State *L) {
  lua_newtable(L);
  tb_json_open(L);
  tb_hash_open(L);
  tb_loop_open(L);
  tb_mqtt_open(L);
  tb_log_open(L);
  tb_sink_open_lua(L);
  tb_fs_open(L);
  tb_http_open(L);
  tb_watch_open(L);
  tb_proc_open(L);
  tb_store_open(L);
  tb_clock_open(L);
  tb_notify_open(L);
  lua_pushliteral(L, TB_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
