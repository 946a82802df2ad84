/* Module entry of tb.core: builds the module table from every area. The same objects are
 * linked into the tbagent binary (package.preload) and into build/tb/core.so for Busted.
 * The shapes every area shares are in register.c. */
#include "core.h"

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
