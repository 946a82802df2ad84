/* lua_run.h: for C tests that drive tb.core from Lua. check_lua(L, code) runs a chunk with
 * the global `core` as ... and returns its results joined by " | " (or "LUA ERROR: ..."). */
#ifndef TB_LUA_RUN_H
#define TB_LUA_RUN_H
#include <stdio.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>

static const char *check_lua(lua_State *L, const char *code) {
  static char out[512];
  int base = lua_gettop(L);
  if (luaL_loadstring(L, code) != LUA_OK) return lua_tostring(L, -1);
  lua_getglobal(L, "core");
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK) {
    snprintf(out, sizeof out, "LUA ERROR: %s", lua_tostring(L, -1));
  } else {
    out[0] = '\0';
    for (int i = base + 1; i <= lua_gettop(L); i++) {
      size_t n = strlen(out);
      snprintf(out + n, sizeof out - n, "%s%s", i > base + 1 ? " | " : "", luaL_tolstring(L, i, NULL));
      lua_pop(L, 1);
    }
  }
  lua_settop(L, base);
  return out;
}
#endif
