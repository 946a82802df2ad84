/* main.c: the tbagent binary. It only sets up a Lua state with the embedded library
 * (package.preload) and tb.core, then hands argv to tb.cli, which owns the command line,
 * the exit codes and the run loop. */
#include <stdio.h>
#include <stdlib.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include "bundle.h"
#include "core.h"

/* preload loader: upvalue 1 is the bundle index */
static int load_bundled(lua_State *L) {
  const tb_bundle_entry *e = &tb_bundle[lua_tointeger(L, lua_upvalueindex(1))];
  if (luaL_loadbuffer(L, (const char *)e->code, e->len, e->chunkname) != LUA_OK)
    return lua_error(L);
  lua_pushstring(L, e->module);
  lua_call(L, 1, 1);
  return 1;
}

static int boot(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_tb_core);
  lua_setfield(L, -2, "tb.core");
  for (int i = 0; tb_bundle[i].module; i++) {
    lua_pushinteger(L, i);
    lua_pushcclosure(L, load_bundled, 1);
    lua_setfield(L, -2, tb_bundle[i].module);
  }
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tb.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_newtable(L);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "tbagent: out of memory\n");
    return 70;
  }
  lua_pushcfunction(L, boot);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status = 70;
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
    fprintf(stderr, "tbagent: internal error: %s\n", lua_tostring(L, -1));
  } else {
    status = (int)luaL_optinteger(L, -1, 0);
  }
  lua_close(L);
  return status;
}
