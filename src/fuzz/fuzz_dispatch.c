/* fuzz_dispatch: server messages through the real Lua library (session routing, attribute
 * pushes, RPC requests and responses, firmware and software chunks, v2/fw/error, unknown
 * topics) on the in-process fake transport of tb.testing.
 *
 * One Lua state for the whole run (LLVMFuzzerInitialize): the real lua/tb library from the
 * source tree, tb.core from the same C objects as the agent (package.preload), and
 * src/fuzz/dispatch.lua, which loads src/fuzz/dispatch_device.lua with tb.testing.load.
 * Each input is one message (see dispatch.lua for the layout). A Lua error escaping the
 * library, a library handler that fails, or a plain "ping" RPC not answered with "pong"
 * (checked on the first input and every PING_EVERY inputs) aborts: that is a finding.
 *
 * libFuzzer cannot see Lua's control flow, so a line hook maps (previous line, line) pairs
 * of Lua code to __libfuzzer_extra_counters: inputs that take new paths through the library
 * are kept. The handler budget is 0 so the scheduler leaves that hook on its coroutines
 * (they inherit it); libFuzzer's -timeout stands in for the budget.
 *
 * TB_FUZZ_ROOT (compile-time, or the environment) is the repository root. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "core.h"

#ifndef TB_FUZZ_ROOT
#define TB_FUZZ_ROOT "."
#endif
#define PING_EVERY 64
#define COUNTERS (1 << 16)

__attribute__((used, section("__libfuzzer_extra_counters"))) static uint8_t lua_counters[COUNTERS];

static lua_State *L;
static char state_dir[64];
static unsigned long inputs;
static uintptr_t prev_loc;

static void line_hook(lua_State *l, lua_Debug *ar) {
  uintptr_t loc;
  if (!lua_getinfo(l, "S", ar)) return;
  /* the source string of a loaded chunk is interned and lives as long as its functions */
  loc = ((uintptr_t)ar->source * 0x9E3779B97F4A7C15ULL) ^ ((uintptr_t)ar->currentline * 0x85EBCA6BULL);
  loc ^= loc >> 29;
  lua_counters[(loc ^ (prev_loc >> 1)) & (COUNTERS - 1)]++;
  prev_loc = loc;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb; (void)flag; (void)ftw;
  remove(path);
  return 0;
}

static void cleanup(void) {
  if (state_dir[0]) nftw(state_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *root(void) {
  const char *r = getenv("TB_FUZZ_ROOT");
  return r && *r ? r : TB_FUZZ_ROOT;
}

static void die(const char *what) {
  fprintf(stderr, "fuzz_dispatch: %s: %s\n", what, lua_tostring(L, -1) ? lua_tostring(L, -1) : "(no message)");
  abort();
}

static int traceback(lua_State *l) {
  luaL_traceback(l, l, lua_tostring(l, 1), 1);
  return 1;
}

/* calls H[name](arg) with a traceback; returns 0 or aborts */
static void call(const char *name, const uint8_t *data, size_t size) {
  int base = lua_gettop(L);
  lua_pushcfunction(L, traceback);
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.harness");
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  int nargs = 0;
  if (data) {
    lua_pushlstring(L, (const char *)data, size);
    nargs = 1;
  }
  if (lua_pcall(L, nargs, 0, base + 1) != LUA_OK) {
    fprintf(stderr, "fuzz_dispatch: %s raised after %lu inputs\n", name, inputs);
    die("finding");
  }
  lua_settop(L, base);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  char path[4096];
  (void)argc; (void)argv;
  snprintf(state_dir, sizeof state_dir, "/tmp/fuzz_dispatch.XXXXXX");
  if (!mkdtemp(state_dir)) {
    perror("mkdtemp");
    abort();
  }
  atexit(cleanup);
  L = luaL_newstate();
  if (!L) abort();
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_tb_core);
  lua_setfield(L, -2, "tb.core");
  lua_pop(L, 1);
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s/src/fuzz/?.lua", root(), root(), root());
  lua_setfield(L, -2, "path");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "cpath");  /* only the preloaded tb.core, never a build/tb/core.so */
  lua_pop(L, 1);
  lua_pushcfunction(L, traceback);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "dispatch");
  if (lua_pcall(L, 1, 1, -3) != LUA_OK) die("cannot load src/fuzz/dispatch.lua");
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.harness");
  lua_getfield(L, -1, "init");
  snprintf(path, sizeof path, "%s/src/fuzz/dispatch_device.lua", root());
  lua_pushstring(L, path);
  lua_pushstring(L, state_dir);
  if (lua_pcall(L, 2, 0, -5) != LUA_OK) die("cannot start the session");
  lua_settop(L, 0);
  lua_sethook(L, line_hook, LUA_MASKLINE, 0);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  inputs++;
  prev_loc = 0;
  call("step", data, size);
  if (inputs == 1 || inputs % PING_EVERY == 0) call("ping", NULL, 0);
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
