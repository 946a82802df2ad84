/* register.c: the shapes every area of tb.core shares: registering its functions and userdata
 * type, and turning a reason or errno into Lua's nil, err. Its own file, so a fuzz target can
 * link one area without the whole module. */
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

