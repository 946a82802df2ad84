/* The wire JSON codec of tb.core, for C callers. Lua sees it as core.json_encode,
 * core.json_decode, core.json_null and core.json_array_mt (see json.c for the rules). */
#ifndef TB_JSON_H
#define TB_JSON_H
#include <stddef.h>
#include <lua.h>
#include <lauxlib.h>

/* Deepest nesting of arrays and objects accepted either way. */
#define TB_JSON_MAX_DEPTH 128

/* Registry key of the metatable that marks a Lua table as a JSON array. */
#define TB_JSON_ARRAY_MT "tb.json.array"

/* Appends the JSON text of the value at idx to b, which must be the buffer on top of the
 * stack as usual for luaL_Buffer. Returns 0, or -1 with a message in err and b untouched.
 * Raises only on memory errors. */
int tb_json_encode_at(lua_State *L, int idx, luaL_Buffer *b, char *err, size_t errlen);

/* Decodes the JSON text s[0..len) and pushes its value. Returns 0, or -1 with a message in
 * err and nothing pushed. Raises only on memory errors. */
int tb_json_decode_push(lua_State *L, const char *s, size_t len, char *err, size_t errlen);

/* Room for the text of any finite double, positional (up to 309 digits before the point). */
#define TB_JSON_FLOAT_MAX 400

/* Writes the JSON text of the finite double d to out (not terminated) and returns its length:
 * the shortest digits that read back as d, positional, ".0" on whole numbers; tb_values: at
 * most 16 decimals (ThingsBoard keeps more as a STRING). fast = 1 lets common decimals skip
 * printf and strtod (same text; the C tests compare both ways). */
size_t tb_json_float_text(double d, int tb_values, int fast, char out[TB_JSON_FLOAT_MAX]);
/* The fast path alone: the length written, or 0 when d is not a common decimal. */
size_t tb_json_short_decimal(double d, char out[TB_JSON_FLOAT_MAX]);

#endif
