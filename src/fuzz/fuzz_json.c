/* fuzz_json: the wire JSON codec (json.c) on arbitrary bytes.
 *
 * For every input: decode it; the decoder must either refuse (nothing pushed, stack as it
 * was) or push exactly one value. A decoded value is encoded, and the text decoded and
 * encoded again: the second value must equal the first (same Lua types, integers and floats
 * bit for bit, same keys, arrays still marked) and the second text must have the same length
 * as the first (key order may differ between two tables, so bytes are not compared). The only
 * value the decoder may produce that the encoder refuses is an infinity (1e999).
 * Each input gets a fresh lua_State that is closed afterwards, so LeakSanitizer sees every
 * allocation of the codec. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "core.h"
#include "json.h"

#define FUZZ_NAME "fuzz_json"
#include "fuzz.h"

static int contains_inf(lua_State *L, int idx, int depth) {
  int found = 0;
  if (lua_type(L, idx) == LUA_TNUMBER)
    return !lua_isinteger(L, idx) && isinf(lua_tonumber(L, idx));
  if (lua_type(L, idx) != LUA_TTABLE || depth > 200) return 0;
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 4, NULL);
  lua_pushnil(L);
  while (!found && lua_next(L, idx)) {
    found = contains_inf(L, -1, depth + 1);
    lua_pop(L, 1);
  }
  if (found) lua_pop(L, 1);
  return found;
}

/* Deep equality with exact types; 1 equal. */
static int same(lua_State *L, int a, int b, int depth) {
  int ta = lua_type(L, a), tb = lua_type(L, b);
  a = lua_absindex(L, a);
  b = lua_absindex(L, b);
  if (ta != tb) return 0;
  switch (ta) {
  case LUA_TNUMBER:
    if (lua_isinteger(L, a) != lua_isinteger(L, b)) return 0;
    if (lua_isinteger(L, a)) return lua_tointeger(L, a) == lua_tointeger(L, b);
    {
      double x = lua_tonumber(L, a), y = lua_tonumber(L, b);
      return memcmp(&x, &y, sizeof x) == 0;
    }
  case LUA_TSTRING:
  case LUA_TBOOLEAN:
  case LUA_TLIGHTUSERDATA:
    return lua_rawequal(L, a, b);
  case LUA_TTABLE: {
    int ma, mb, ok = 1;
    lua_Integer na = 0, nb = 0;
    if (depth > 200) return 0;
    luaL_checkstack(L, 8, NULL);
    ma = lua_getmetatable(L, a);
    mb = lua_getmetatable(L, b);
    if (ma != mb) ok = 0;
    else if (ma && !lua_rawequal(L, -1, -2)) ok = 0;
    lua_pop(L, ma + mb);
    if (!ok) return 0;
    lua_pushnil(L);
    while (lua_next(L, a)) {
      na++;
      lua_pushvalue(L, -2);
      lua_rawget(L, b);
      if (!same(L, -2, -1, depth + 1)) {
        lua_pop(L, 3);
        return 0;
      }
      lua_pop(L, 2);
    }
    lua_pushnil(L);
    while (lua_next(L, b)) {
      nb++;
      lua_pop(L, 1);
    }
    return na == nb;
  }
  default:
    return 0;
  }
}

/* encode the value at idx into a new string on top; 0 ok, -1 with err */
static int encode(lua_State *L, int idx, char *err, size_t errlen) {
  luaL_Buffer b;
  int top;
  idx = lua_absindex(L, idx);
  top = lua_gettop(L);
  luaL_buffinit(L, &b);
  if (tb_json_encode_at(L, idx, &b, err, errlen) != 0) {
    luaL_pushresult(&b);
    lua_pop(L, 1);
    if (lua_gettop(L) != top) FAIL("encode failure changed the stack (%d -> %d)", top, lua_gettop(L));
    return -1;
  }
  luaL_pushresult(&b);
  if (lua_gettop(L) != top + 1) FAIL("encode left %d slots", lua_gettop(L) - top);
  return 0;
}

static int decode(lua_State *L, const char *s, size_t n, char *err, size_t errlen) {
  int top = lua_gettop(L), rc = tb_json_decode_push(L, s, n, err, errlen);
  if (rc == 0 && lua_gettop(L) != top + 1) FAIL("decode pushed %d values", lua_gettop(L) - top);
  if (rc != 0 && lua_gettop(L) != top) FAIL("failed decode changed the stack (%d -> %d)", top, lua_gettop(L));
  if (rc != 0 && errlen && err[0] == '\0') FAIL("failed decode without a message");
  return rc;
}

typedef struct {
  const uint8_t *data;
  size_t size;
} input;

static int run(lua_State *L) {
  input *in = lua_touserdata(L, 1);
  char err[200], err2[200];
  size_t n1, n2;
  const char *t1, *t2;
  lua_settop(L, 0);
  err[0] = '\0';
  /* sometimes no error buffer at all, or a tiny one: the message must still be safe */
  if (in->size > 0 && in->data[0] == ' ') {
    if (tb_json_decode_push(L, (const char *)in->data, in->size, NULL, 0) == 0) lua_pop(L, 1);
    if (tb_json_decode_push(L, (const char *)in->data, in->size, err, 1) == 0) lua_pop(L, 1);
    else if (err[0] != '\0') FAIL("errlen 1 not NUL-terminated");
  }
  if (decode(L, (const char *)in->data, in->size, err, sizeof err) != 0) return 0;
  /* 1: v1 */
  if (encode(L, 1, err, sizeof err) != 0) {
    if (!contains_inf(L, 1, 0)) FAIL("decoded value does not encode: %s", err);
    if (!strstr(err, "cannot encode inf")) FAIL("unexpected encode error for inf: %s", err);
    return 0;
  }
  /* 2: text1 */
  t1 = lua_tolstring(L, 2, &n1);
  if (decode(L, t1, n1, err, sizeof err) != 0)
    FAIL("encoded text does not decode: %s\ntext: %.*s", err, (int)(n1 > 400 ? 400 : n1), t1);
  /* 3: v2 */
  if (!same(L, 1, 3, 0)) FAIL("round trip changed the value; text: %.*s", (int)(n1 > 400 ? 400 : n1), t1);
  if (encode(L, 3, err2, sizeof err2) != 0) FAIL("re-decoded value does not encode: %s", err2);
  /* 4: text2 */
  t2 = lua_tolstring(L, 4, &n2);
  if (n1 != n2) FAIL("second encoding differs in length: %zu vs %zu\n%.*s\n%.*s", n1, n2, (int)n1, t1, (int)n2, t2);
  /* scalars and arrays have one text only: those must be byte-identical */
  if (lua_type(L, 1) != LUA_TTABLE && memcmp(t1, t2, n1) != 0) FAIL("unstable scalar text %s vs %s", t1, t2);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  input in = {data, size};
  lua_State *L = luaL_newstate();
  if (!L) abort();
  luaL_requiref(L, "_G", luaopen_base, 0);
  lua_pop(L, 1);
  lua_pushcfunction(L, run);
  lua_pushlightuserdata(L, &in);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) FAIL("raised: %s", lua_tostring(L, -1));
  lua_close(L);
  return 0;
}
