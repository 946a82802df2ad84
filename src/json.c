/* The wire JSON codec of tb.core: Lua values to RFC 8259 text and back, keeping Lua's types
 * exactly (README "tb.json.encode", docs/thingsboard.md §4.2). It owns json_encode, json_decode,
 * json_null, json_array_mt and their C entries in json.h.
 *
 * Invariants:
 * - A Lua integer is written with all 64 bits; a float is written in positional notation
 *   with a '.' (never an exponent), because ThingsBoard stores 42 and 1e+15 as LONG and only
 *   42.0 and 1000000000000000.0 as DOUBLE (see enc_float). A decoded number is an
 *   integer exactly when its token has no fraction, no exponent and fits in 64 bits.
 * - Output is valid JSON and valid UTF-8 or nothing: NaN, infinities, invalid UTF-8 and tables
 *   that are neither arrays nor objects are refused, never approximated.
 * - Neither direction raises except on memory errors: failures return -1 (nil, err in Lua)
 *   with the stack as it was. TB_JSON_MAX_DEPTH bounds nesting both ways, which stops cycles
 *   and bounds the C recursion; Lua stack space is checked at each level.
 * - JSON null is json_null (a NULL light userdata) wherever it appears, so a key holding null
 *   stays visible; decoded arrays carry the array metatable, so [] stays [].
 * - Tables are read raw (no __index, __pairs or __len), and nothing depends on the C locale's
 *   decimal point.
 * - json_encode(value, max_bytes) stops as soon as the text passes max_bytes, so refusing a
 *   100 MiB value costs about max_bytes of memory, not the whole text.
 *
 * json_encode fails with nil, message, code. The message is for people (it names the place,
 * "cannot encode NaN at .temp"); the code is for callers that decide what to do, and stays
 * the same whatever the message says:
 *   too_large   the text passed max_bytes
 *   not_finite  a float is NaN or an infinity
 *   bad_utf8    a string, value or key, is not valid UTF-8
 *   bad_key     a table is neither an array (keys exactly 1..n, or empty and marked with
 *               json_array_mt) nor an object (string keys only, not marked)
 *   bad_type    a value JSON has no form for: function, userdata, thread, a light userdata
 *               other than json_null
 *   too_deep    nesting passed TB_JSON_MAX_DEPTH or the Lua stack; a table that contains
 *               itself fails this way too
 * json_decode fails with nil, message only ("invalid JSON at byte N: why", "nesting too deep",
 * "empty JSON text"): no caller tells its failures apart.
 */
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "json.h"

#define R16(x) x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x

/* Strict UTF-8 (RFC 3629): no overlongs, no surrogates, nothing past U+10FFFF. Returns the
 * length of the sequence starting at p (whose first byte is >= 0x80), or 0 if invalid. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
  unsigned char c = p[0], lo = 0x80, hi = 0xBF;
  size_t k, i;
  if (c >= 0xC2 && c <= 0xDF)
    k = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    k = 3;
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    k = 4;
    if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
  } else
    return 0;
  if ((size_t)(end - p) < k || p[1] < lo || p[1] > hi) return 0;
  for (i = 2; i < k; i++)
    if ((p[i] & 0xC0) != 0x80) return 0;
  return k;
}

/* strtod in the "C" locale, whatever setlocale says (a decimal point may even be several
 * bytes, as U+066B is). Made once; the agent has one thread. */
static double c_strtod(const char *s) {
  static locale_t c_locale;
  if (!c_locale) c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
  return c_locale ? strtod_l(s, NULL, c_locale) : strtod(s, NULL);
}

static void push_array_mt(lua_State *L) {
  luaL_newmetatable(L, TB_JSON_ARRAY_MT);  /* the existing one after the first call */
}

/* ---------------------------------------------------------------- encoder */

/* What each byte needs inside a JSON string: 0 nothing, 1 a UTF-8 check, else the letter
 * after the backslash ('u' for \u00XX). */
static const unsigned char enc_escape[256] = {
  'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'b', 't', 'n', 'u', 'f', 'r', 'u', 'u',
  R16('u'),
  0, 0, '"', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  R16(0), R16(0),
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\\', 0, 0, 0,
  R16(0), R16(0),
  R16(1), R16(1), R16(1), R16(1), R16(1), R16(1), R16(1), R16(1),
};

#define ENC_INIT 1024  /* most telemetry fits, so the only allocation is the result string */
#define PATH_LEN 96

/* luaL_Buffer needs its box on top of the stack at every call, which lua_next's key and
 * value never allow; so the output grows in a userdata at a fixed stack slot instead. */
typedef struct enc {
  lua_State *L;
  char *buf;      /* init, or the userdata at buf_slot once the text outgrew init */
  size_t len, cap;
  int buf_slot, mt_slot;
  char msg[64];   /* what went wrong, without the path */
  const char *code;  /* the same as a stable code (see the top of the file) */
  int path_at;    /* the path is built backwards on the way out, ending at path[PATH_LEN-1] */
  int path_cut;   /* 1: it lost its front; -1: this error takes no path */
  size_t max;     /* 0, or the longest text wanted: encoding stops once it is passed */
  int tb_values;  /* floats with at most 16 decimals, as ThingsBoard keeps them (enc_float) */
  char path[PATH_LEN];
  char init[ENC_INIT];
} enc;

static char *enc_grow(enc *e, size_t n) {
  size_t need = e->len + n, cap = e->cap * 2;
  char *nb;
  if (cap < need) cap = need;
  nb = (char *)lua_newuserdatauv(e->L, cap, 0);
  memcpy(nb, e->buf, e->len);
  lua_replace(e->L, e->buf_slot);
  e->buf = nb;
  e->cap = cap;
  return nb + e->len;
}

static char *enc_reserve(enc *e, size_t n) {
  return e->cap - e->len >= n ? e->buf + e->len : enc_grow(e, n);
}

static void enc_put(enc *e, const void *s, size_t n) {
  memcpy(enc_reserve(e, n), s, n);
  e->len += n;
}

static void enc_char(enc *e, char c) {
  *enc_reserve(e, 1) = c;
  e->len++;
}

static int enc_fail(enc *e, const char *code, const char *msg) {
  snprintf(e->msg, sizeof e->msg, "%s", msg);
  e->code = code;
  return -1;
}

/* The text passed e->max: stop, whatever the rest would have been (no path: it is the whole
 * text that is too long, not one value). */
static int enc_too_large(enc *e) {
  snprintf(e->msg, sizeof e->msg, "too large: over %zu bytes", e->max);
  e->code = "too_large";
  e->path_cut = -1;
  return -1;
}

#define ENC_OVER(e, extra) ((e)->max && (e)->len + (extra) > (e)->max)

static void path_prepend(enc *e, const char *seg, size_t n) {
  if (e->path_cut) return;
  if (n > (size_t)e->path_at) {
    e->path_cut = 1;
    return;
  }
  e->path_at -= (int)n;
  memcpy(e->path + e->path_at, seg, n);
}

static void path_key(enc *e, const char *k, size_t n) {
  if (e->path_cut) return;
  if (n + 1 > (size_t)e->path_at) {
    e->path_cut = 1;
    return;
  }
  path_prepend(e, k, n);
  path_prepend(e, ".", 1);
}

static void path_index(enc *e, lua_Integer i) {
  char seg[32];
  int n = snprintf(seg, sizeof seg, "[%lld]", (long long)i);
  path_prepend(e, seg, (size_t)n);
}

static int enc_string(enc *e, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *p = (const unsigned char *)s, *end = p + n, *run = p;
  if (ENC_OVER(e, n + 2)) return enc_too_large(e);
  enc_reserve(e, n + 2);  /* exact unless something needs escaping */
  enc_char(e, '"');
  while (p < end) {
    unsigned char x = enc_escape[*p];
    if (x == 0) {
      p++;
    } else if (x == 1) {
      size_t k = utf8_seq(p, end);
      if (k == 0) return enc_fail(e, "bad_utf8", "invalid UTF-8 in string");
      p += k;
    } else {
      char *o;
      enc_put(e, run, (size_t)(p - run));
      o = enc_reserve(e, 6);
      o[0] = '\\';
      o[1] = (char)x;
      if (x == 'u') {
        o[2] = '0';
        o[3] = '0';
        o[4] = hex[*p >> 4];
        o[5] = hex[*p & 15];
        e->len += 6;
      } else
        e->len += 2;
      run = ++p;
    }
  }
  enc_put(e, run, (size_t)(p - run));
  enc_char(e, '"');
  return 0;
}

static void enc_integer(enc *e, lua_Integer v) {
  char tmp[24], *q = tmp + sizeof tmp;
  lua_Unsigned u = v < 0 ? 0u - (lua_Unsigned)v : (lua_Unsigned)v;  /* safe for mininteger */
  do {
    *--q = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  if (v < 0) *--q = '-';
  enc_put(e, q, (size_t)(tmp + sizeof tmp - q));
}

/* Writes text[0..n) as the locale-free number it is: the locale's decimal point (any bytes
 * that are not digits, signs or 'e') becomes one '.'. Returns the new length. */
static size_t c_number_text(char *text) {
  size_t i, n;
  int in_point = 0;
  for (i = n = 0; text[i]; i++) {  /* in place, as it never lengthens */
    char c = text[i];
    if ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e') {
      text[n++] = c;
      in_point = 0;
    } else if (!in_point) {
      text[n++] = '.';
      in_point = 1;
    }
  }
  text[n] = '\0';
  return n;
}

/* A float in positional notation, always with a '.', never with an exponent: ThingsBoard
 * stores 1e+15 as LONG and 1e+20 as STRING, but 1000000000000000.0 as DOUBLE (docs/thingsboard.md
 * §4.2). The digits are the shortest of %.15g..%.17g that read back as the same double, so
 * the text is exact; the longest (denormals, DBL_MAX) is about 330 bytes.
 * tb_values: ThingsBoard also stores a number with more than 16 digits after the point as a
 * STRING (BigDecimal scale > 16), so telemetry and attributes get at most 16: exact for
 * |v| >= 0.5 (half a step of 1e-16 is below half the spacing of doubles there), rounded
 * below that (0.1 + 0.2 goes as 0.3, values under 5e-17 as 0.0). */
/* The common float, a decimal with at most 15 significant digits and 15 decimals (21.5,
 * 40.25, 0.001), without printf and strtod: m = |d| * 10^k rounded, for the smallest k whose
 * m / 10^k is d again. Both sides of that test are correctly rounded, so it holds exactly when
 * the decimal text reads back as d; with m below 10^15 the digits are those enc_float's
 * shortest-of-15..17 search finds, so the text is the same. 0 when d is not such a number. */
size_t tb_json_short_decimal(double d, char out[TB_JSON_FLOAT_MAX]) {
  static const double pow10[16] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
                                   1e11, 1e12, 1e13, 1e14, 1e15};
  double a = fabs(d);
  char rev[24];
  size_t o = 0, nr = 0;
  if (!(a >= 1e-15 && a < 1e15)) return 0;
  for (int k = 0; k <= 15; k++) {
    double m = nearbyint(a * pow10[k]);
    if (m >= 1e15) return 0;
    if (m < 1 || m / pow10[k] != a) continue;
    unsigned long long u = (unsigned long long)m;
    while (u) {
      rev[nr++] = (char)('0' + u % 10);
      u /= 10;
    }
    if (d < 0) out[o++] = '-';
    int point = (int)nr - k;   /* digits before the point */
    if (point <= 0) {
      out[o++] = '0';
      out[o++] = '.';
      for (int i = 0; i < -point; i++) out[o++] = '0';
      while (nr) out[o++] = rev[--nr];
    } else {
      for (int i = 0; i < point; i++) out[o++] = rev[--nr];
      out[o++] = '.';
      if (nr == 0) out[o++] = '0';
      while (nr) out[o++] = rev[--nr];
    }
    return o;
  }
  return 0;
}

size_t tb_json_float_text(double d, int tb_values, int fast, char out[TB_JSON_FLOAT_MAX]) {
  char tmp[48], digits[24];
  int prec, exp10 = 0, point, nd = 0, lead, i;
  size_t n, o = 0;
  const char *p;
  if (fast && (n = tb_json_short_decimal(d, out)) > 0) return n;
  for (prec = 15;; prec++) {
    snprintf(tmp, sizeof tmp - 2, "%.*e", prec - 1, d);
    c_number_text(tmp);
    if (prec == 17 || c_strtod(tmp) == d) break;
  }
  /* tmp is [-]D.DDDDe[+-]XX: the digits, and where the point goes among them */
  p = tmp;
  if (*p == '-') out[o++] = *p++;
  for (; *p && *p != 'e'; p++)
    if (*p >= '0' && *p <= '9') digits[nd++] = *p;
  if (*p == 'e') exp10 = atoi(p + 1);
  while (nd > 1 && digits[nd - 1] == '0') nd--;
  point = 1 + exp10;  /* digits before the point */
  if (nd == 1 && digits[0] == '0') point = 1;
  if (tb_values && nd - point > 16) {
    /* more than 16 digits after the point: |d| < 1 here, as 17 digits at most were kept */
    snprintf(tmp, sizeof tmp - 2, "%.16f", d);
    n = c_number_text(tmp);
    while (n > 0 && tmp[n - 1] == '0' && tmp[n - 2] != '.') n--;
    memcpy(out, tmp, n);
    return n;
  }
  if (point <= 0) {
    out[o++] = '0';
    out[o++] = '.';
    for (i = 0; i < -point; i++) out[o++] = '0';
    for (i = 0; i < nd; i++) out[o++] = digits[i];
  } else {
    lead = point < nd ? point : nd;
    for (i = 0; i < lead; i++) out[o++] = digits[i];
    for (i = nd; i < point; i++) out[o++] = '0';
    out[o++] = '.';
    if (point >= nd) out[o++] = '0';
    for (i = point; i < nd; i++) out[o++] = digits[i];
  }
  return o;
}

static int enc_float(enc *e, lua_Number v, int tb_values) {
  char out[TB_JSON_FLOAT_MAX];
  double d = (double)v;
  if (isnan(d)) return enc_fail(e, "not_finite", "cannot encode NaN");
  if (isinf(d)) return enc_fail(e, "not_finite", "cannot encode inf");
  enc_put(e, out, tb_json_float_text(d, tb_values, 1, out));
  return 0;
}

static int enc_value(enc *e, int idx, int depth);

static int is_marked_array(enc *e, int t) {
  int r;
  if (!lua_getmetatable(e->L, t)) return 0;
  r = lua_rawequal(e->L, -1, e->mt_slot);
  lua_pop(e->L, 1);
  return r;
}

/* Entered with the first key and value of t on the stack, the key a string. */
static int enc_object(enc *e, int t, int depth) {
  lua_State *L = e->L;
  int first = 1;
  enc_char(e, '{');
  do {
    size_t kl;
    const char *k;
    if (lua_type(L, -2) != LUA_TSTRING) {
      lua_pop(L, 2);
      return enc_fail(e, "bad_key", "cannot encode table with mixed or non-string keys");
    }
    if (!first) enc_char(e, ',');
    first = 0;
    k = lua_tolstring(L, -2, &kl);
    if (enc_string(e, k, kl)) {
      lua_pop(L, 2);
      return -1;
    }
    enc_char(e, ':');
    if (enc_value(e, lua_gettop(L), depth + 1)) {
      path_key(e, k, kl);
      lua_pop(L, 2);
      return -1;
    }
    lua_pop(L, 1);
  } while (lua_next(L, t));
  enc_char(e, '}');
  return 0;
}

/* An array needs keys exactly 1..n, so count them before writing anything: n distinct keys
 * that are integers >= 1 with the largest equal to n are 1..n. */
static int enc_table(enc *e, int t, int depth) {
  lua_State *L = e->L;
  lua_Integer n = 0, max = 0, i;
  if (depth >= TB_JSON_MAX_DEPTH || !lua_checkstack(L, 8)) {
    e->path_cut = -1;
    return enc_fail(e, "too_deep", "nesting too deep");
  }
  lua_pushnil(L);
  if (!lua_next(L, t)) {
    enc_put(e, is_marked_array(e, t) ? "[]" : "{}", 2);
    return 0;
  }
  if (lua_type(L, -2) == LUA_TSTRING) {
    if (!is_marked_array(e, t)) return enc_object(e, t, depth);
    lua_pop(L, 2);
    return enc_fail(e, "bad_key", "cannot encode table with mixed or non-string keys");
  }
  do {
    lua_pop(L, 1);
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
      lua_pop(L, 1);
      return enc_fail(e, "bad_key", "cannot encode table with mixed or non-string keys");
    }
    n++;
    if (lua_tointeger(L, -1) > max) max = lua_tointeger(L, -1);
  } while (lua_next(L, t));
  if (max != n) return enc_fail(e, "bad_key", "cannot encode table with mixed or non-string keys");
  enc_char(e, '[');
  for (i = 1; i <= n; i++) {
    if (i > 1) enc_char(e, ',');
    lua_rawgeti(L, t, i);
    if (enc_value(e, lua_gettop(L), depth + 1)) {
      path_index(e, i);
      lua_pop(L, 1);
      return -1;
    }
    lua_pop(L, 1);
  }
  enc_char(e, ']');
  return 0;
}

static int enc_value(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  int type = lua_type(L, idx);
  if (ENC_OVER(e, 0)) return enc_too_large(e);  /* strings check their own length */
  switch (type) {
  case LUA_TNIL:
    enc_put(e, "null", 4);
    return 0;
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, idx))
      enc_put(e, "true", 4);
    else
      enc_put(e, "false", 5);
    return 0;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      enc_integer(e, lua_tointeger(L, idx));
      return 0;
    }
    return enc_float(e, lua_tonumber(L, idx), e->tb_values);
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return enc_string(e, s, n);
  }
  case LUA_TTABLE:
    return enc_table(e, idx, depth);
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == NULL) {
      enc_put(e, "null", 4);
      return 0;
    }
    /* fall through */
  default:
    snprintf(e->msg, sizeof e->msg, "cannot encode %s", lua_typename(L, type));
    e->code = "bad_type";
    return -1;
  }
}

/* Encodes the value at idx into e. Pushes two slots (array metatable, grown buffer) unless it
 * fails at once; the caller restores the top either way. */
static int enc_run(enc *e, lua_State *L, int idx) {
  e->L = L;
  e->buf = e->init;
  e->len = 0;
  e->cap = sizeof e->init;
  e->msg[0] = '\0';
  e->code = NULL;
  e->path_at = PATH_LEN - 1;
  e->path[PATH_LEN - 1] = '\0';
  e->path_cut = 0;
  if (!lua_checkstack(L, 8)) return enc_fail(e, "too_deep", "nesting too deep");
  push_array_mt(L);
  e->mt_slot = lua_gettop(L);
  lua_pushnil(L);
  e->buf_slot = lua_gettop(L);
  if (enc_value(e, idx, 0)) return -1;
  return ENC_OVER(e, 0) ? enc_too_large(e) : 0;
}

static void enc_message(enc *e, char *err, size_t errlen) {
  if (!err || !errlen) return;
  if (e->path_cut >= 0 && e->path[e->path_at] != '\0')
    snprintf(err, errlen, "%s at %s%s", e->msg, e->path_cut ? "..." : "", e->path + e->path_at);
  else
    snprintf(err, errlen, "%s", e->msg);
}

int tb_json_encode_at(lua_State *L, int idx, luaL_Buffer *b, char *err, size_t errlen) {
  enc e;
  int base;
  idx = lua_absindex(L, idx);
  base = lua_gettop(L);
  e.max = 0;
  e.tb_values = 0;
  if (enc_run(&e, L, idx)) {
    enc_message(&e, err, errlen);
    lua_settop(L, base);
    return -1;
  }
  lua_pushlstring(L, e.buf, e.len);
  lua_replace(L, base + 1);
  lua_settop(L, base + 1);  /* b's box is on top again, under the text */
  luaL_addvalue(b);
  return 0;
}

/* json_encode(value [, max_bytes [, tb_values]]) -> string | nil, err, code. With max_bytes,
 * a text longer than that is refused ("too large: over N bytes", code "too_large") as soon as
 * the encoder passes it, so refusing a huge value costs about max_bytes, not the size of its
 * text. tb_values: floats get at most 16 decimals, so ThingsBoard stores them as DOUBLE (see
 * enc_float). */
static int l_json_encode(lua_State *L) {
  enc e;
  char err[192];
  lua_Integer max;
  luaL_checkany(L, 1);
  max = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, max >= 0, 2, "max_bytes must be >= 0");
  e.tb_values = lua_toboolean(L, 3);
  lua_settop(L, 1);
  e.max = (size_t)max;
  if (enc_run(&e, L, 1)) {
    enc_message(&e, err, sizeof err);
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushstring(L, e.code);
    return 3;
  }
  lua_pushlstring(L, e.buf, e.len);
  return 1;
}

/* ---------------------------------------------------------------- decoder */

/* Bytes inside a JSON string: 0 plain, 1 quote, 2 backslash, 3 control, 4 UTF-8 lead or
 * continuation byte. */
static const unsigned char dec_class[256] = {
  R16(3), R16(3),
  0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  R16(0), R16(0),
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0,
  R16(0), R16(0),
  R16(4), R16(4), R16(4), R16(4), R16(4), R16(4), R16(4), R16(4),
};

/* Values collected on the stack before their table is made, so small containers are created
 * at their final size; larger ones continue into the table directly. */
#define ARRAY_BATCH 32
#define OBJECT_BATCH 16

typedef struct dec {
  lua_State *L;
  const char *s, *p, *end;  /* the whole text, and the next byte to read */
  int mt_slot;
  char *err;
  size_t errlen;
} dec;

static int dec_fail(dec *d, const char *at, const char *why) {
  if (d->err && d->errlen)
    snprintf(d->err, d->errlen, "invalid JSON at byte %zu: %s", (size_t)(at - d->s) + 1, why);
  return -1;
}

static int dec_deep(dec *d) {
  if (d->err && d->errlen) snprintf(d->err, d->errlen, "nesting too deep");
  return -1;
}

static const char *skip_ws(const char *p, const char *end) {
  while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
    p++;
  return p;
}

static int is_digit(const char *p, const char *end) {
  return p < end && *p >= '0' && *p <= '9';
}

static int dec_literal(dec *d, const char *word, size_t n) {
  size_t have = (size_t)(d->end - d->p), i;
  for (i = 0; i < n; i++) {
    if (i == have) return dec_fail(d, d->end, "unexpected end");
    if (d->p[i] != word[i]) return dec_fail(d, d->p + i, "unexpected character");
  }
  d->p += n;
  return 0;
}

/* Integer tokens become lua_Integer unless they overflow 64 bits; all others, and those,
 * become doubles. */
static int dec_number(dec *d) {
  const char *p = d->p, *end = d->end, *start = p, *digits;
  int neg = 0, integral = 1;
  size_t n;
  double v;
  if (*p == '-') {
    neg = 1;
    p++;
  }
  digits = p;
  if (p < end && *p == '0')
    p++;
  else if (is_digit(p, end))
    while (is_digit(p, end))
      p++;
  else
    return dec_fail(d, p, p < end ? "bad number" : "unexpected end");
  if (p < end && *p == '.') {
    if (!is_digit(++p, end)) return dec_fail(d, p, p < end ? "bad number" : "unexpected end");
    while (is_digit(p, end))
      p++;
    integral = 0;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < end && (*p == '+' || *p == '-')) p++;
    if (!is_digit(p, end)) return dec_fail(d, p, p < end ? "bad number" : "unexpected end");
    while (is_digit(p, end))
      p++;
    integral = 0;
  }
  d->p = p;
  if (integral) {
    lua_Unsigned a = 0, lim = neg ? (lua_Unsigned)LUA_MAXINTEGER + 1 : LUA_MAXINTEGER;
    for (; digits < p; digits++) {
      unsigned dg = (unsigned)(*digits - '0');
      if (a > (lim - dg) / 10) break;
      a = a * 10 + dg;
    }
    if (digits == p) {  /* the wrap of 2^63 to mininteger is what Lua itself does */
      lua_pushinteger(d->L, neg ? (lua_Integer)(0u - a) : (lua_Integer)a);
      return 0;
    }
  }
  n = (size_t)(p - start);
  if (n < 64) {
    char tmp[64];
    memcpy(tmp, start, n);
    tmp[n] = '\0';
    v = c_strtod(tmp);
  } else {  /* rare: any length is valid JSON, so borrow a NUL-terminated Lua copy */
    v = c_strtod(lua_pushlstring(d->L, start, n));
    lua_pop(d->L, 1);
  }
  lua_pushnumber(d->L, (lua_Number)v);
  return 0;
}

static int hex4(const unsigned char *p) {
  int v = 0, i;
  for (i = 0; i < 4; i++) {
    int c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= c - '0';
    else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
      v |= (c | 0x20) - 'a' + 10;
    else
      return -1;
  }
  return v;
}

static char *utf8_put(char *o, unsigned long cp) {
  if (cp < 0x80)
    *o++ = (char)cp;
  else if (cp < 0x800) {
    *o++ = (char)(0xC0 | (cp >> 6));
    *o++ = (char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *o++ = (char)(0xE0 | (cp >> 12));
    *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
    *o++ = (char)(0x80 | (cp & 0x3F));
  } else {
    *o++ = (char)(0xF0 | (cp >> 18));
    *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
    *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
    *o++ = (char)(0x80 | (cp & 0x3F));
  }
  return o;
}

/* The slow path of dec_string, from the first backslash at p. Unescaping never lengthens the
 * text, so the output is sized once from the distance to the closing quote. */
static int dec_string_escaped(dec *d, const unsigned char *start, const unsigned char *p) {
  const unsigned char *end = (const unsigned char *)d->end, *q = p;
  luaL_Buffer b;
  char *out, *o;
  while (q < end && *q != '"') {
    if (*q == '\\' && q + 1 < end) q++;
    q++;
  }
  if (q >= end) return dec_fail(d, d->end, "unexpected end");
  out = o = luaL_buffinitsize(d->L, &b, (size_t)(q - start));
  memcpy(o, start, (size_t)(p - start));
  o += p - start;
  while (p < q) {
    switch (dec_class[*p]) {
    case 0:
      *o++ = (char)*p++;
      break;
    case 3:
      return dec_fail(d, (const char *)p, "control character in string");
    case 4: {
      size_t k = utf8_seq(p, q);
      if (k == 0) return dec_fail(d, (const char *)p, "invalid UTF-8");
      memcpy(o, p, k);
      o += k;
      p += k;
      break;
    }
    default: {  /* backslash; the quote class cannot occur before q */
      const unsigned char *esc = p;
      long cp, lo;
      switch (p[1]) {
      case '"': *o++ = '"'; break;
      case '\\': *o++ = '\\'; break;
      case '/': *o++ = '/'; break;
      case 'b': *o++ = '\b'; break;
      case 'f': *o++ = '\f'; break;
      case 'n': *o++ = '\n'; break;
      case 'r': *o++ = '\r'; break;
      case 't': *o++ = '\t'; break;
      case 'u':
        if (q - p < 6 || (cp = hex4(p + 2)) < 0) return dec_fail(d, (const char *)esc, "bad escape");
        p += 4;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return dec_fail(d, (const char *)esc, "lone surrogate");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (q - p < 8 || p[2] != '\\' || p[3] != 'u' || (lo = hex4(p + 4)) < 0xDC00 ||
              lo > 0xDFFF)
            return dec_fail(d, (const char *)esc, "lone surrogate");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          p += 6;
        }
        o = utf8_put(o, (unsigned long)cp);
        break;
      default:
        return dec_fail(d, (const char *)esc, "bad escape");
      }
      p += 2;
    }
    }
  }
  luaL_pushresultsize(&b, (size_t)(o - out));
  d->p = (const char *)q + 1;
  return 0;
}

static int dec_string(dec *d) {
  const unsigned char *start = (const unsigned char *)d->p + 1, *p = start;
  const unsigned char *end = (const unsigned char *)d->end;
  for (;;) {
    while (p < end && dec_class[*p] == 0)
      p++;
    if (p >= end) return dec_fail(d, d->end, "unexpected end");
    switch (dec_class[*p]) {
    case 1:
      lua_pushlstring(d->L, (const char *)start, (size_t)(p - start));
      d->p = (const char *)p + 1;
      return 0;
    case 2:
      return dec_string_escaped(d, start, p);
    case 3:
      return dec_fail(d, (const char *)p, "control character in string");
    default: {
      size_t k = utf8_seq(p, end);
      if (k == 0) return dec_fail(d, (const char *)p, "invalid UTF-8");
      p += k;
    }
    }
  }
}

static int dec_value(dec *d, int depth);

static void flush_array(lua_State *L, int base, int n) {
  int i;
  lua_createtable(L, n, 0);
  lua_insert(L, base + 1);
  for (i = n; i >= 1; i--)
    lua_rawseti(L, base + 1, i);
}

static void flush_object(lua_State *L, int base, int n) {
  int i;
  lua_createtable(L, 0, n);
  lua_insert(L, base + 1);
  for (i = 0; i < n; i++) {  /* in order, so the last of duplicate keys wins */
    lua_pushvalue(L, base + 2 + 2 * i);
    lua_pushvalue(L, base + 3 + 2 * i);
    lua_rawset(L, base + 1);
  }
  lua_settop(L, base + 1);
}

/* Separator after an element: 0 for ',', 1 for the closing byte, -1 after an error. */
static int dec_next(dec *d, char close, const char *expected) {
  d->p = skip_ws(d->p, d->end);
  if (d->p >= d->end) return dec_fail(d, d->end, "unexpected end");
  if (*d->p == ',' || *d->p == close) return *d->p++ == close;
  return dec_fail(d, d->p, expected);
}

static int dec_array(dec *d, int depth) {
  lua_State *L = d->L;
  int base = lua_gettop(L), t = 0, r;
  lua_Integer n = 0;
  if (depth >= TB_JSON_MAX_DEPTH || !lua_checkstack(L, ARRAY_BATCH + 8)) return dec_deep(d);
  d->p = skip_ws(d->p + 1, d->end);
  if (d->p < d->end && *d->p == ']') {
    d->p++;
    lua_createtable(L, 0, 0);
  } else {
    do {
      if (dec_value(d, depth + 1)) return -1;
      if (t)
        lua_rawseti(L, t, ++n);
      else if (++n == ARRAY_BATCH) {
        flush_array(L, base, (int)n);
        t = base + 1;
      }
    } while ((r = dec_next(d, ']', "expected ',' or ']'")) == 0);
    if (r < 0) return -1;
    if (!t) flush_array(L, base, (int)n);
  }
  lua_pushvalue(L, d->mt_slot);
  lua_setmetatable(L, -2);
  return 0;
}

static int dec_object(dec *d, int depth) {
  lua_State *L = d->L;
  int base = lua_gettop(L), t = 0, n = 0, r;
  if (depth >= TB_JSON_MAX_DEPTH || !lua_checkstack(L, 2 * OBJECT_BATCH + 8)) return dec_deep(d);
  d->p = skip_ws(d->p + 1, d->end);
  if (d->p < d->end && *d->p == '}') {
    d->p++;
    lua_createtable(L, 0, 0);
    return 0;
  }
  do {
    d->p = skip_ws(d->p, d->end);
    if (d->p >= d->end) return dec_fail(d, d->end, "unexpected end");
    if (*d->p != '"') return dec_fail(d, d->p, "expected string key");
    if (dec_string(d)) return -1;
    d->p = skip_ws(d->p, d->end);
    if (d->p >= d->end) return dec_fail(d, d->end, "unexpected end");
    if (*d->p != ':') return dec_fail(d, d->p, "expected ':'");
    d->p++;
    if (dec_value(d, depth + 1)) return -1;
    if (t)
      lua_rawset(L, t);
    else if (++n == OBJECT_BATCH) {
      flush_object(L, base, n);
      t = base + 1;
    }
  } while ((r = dec_next(d, '}', "expected ',' or '}'")) == 0);
  if (r < 0) return -1;
  if (!t) flush_object(L, base, n);
  return 0;
}

static int dec_value(dec *d, int depth) {
  d->p = skip_ws(d->p, d->end);
  if (d->p >= d->end) return dec_fail(d, d->end, "unexpected end");
  switch (*d->p) {
  case '{':
    return dec_object(d, depth);
  case '[':
    return dec_array(d, depth);
  case '"':
    return dec_string(d);
  case 't':
    if (dec_literal(d, "true", 4)) return -1;
    lua_pushboolean(d->L, 1);
    return 0;
  case 'f':
    if (dec_literal(d, "false", 5)) return -1;
    lua_pushboolean(d->L, 0);
    return 0;
  case 'n':
    if (dec_literal(d, "null", 4)) return -1;
    lua_pushlightuserdata(d->L, NULL);
    return 0;
  case '-': case '0': case '1': case '2': case '3': case '4':
  case '5': case '6': case '7': case '8': case '9':
    return dec_number(d);
  default:
    return dec_fail(d, d->p, "unexpected character");
  }
}

int tb_json_decode_push(lua_State *L, const char *s, size_t len, char *err, size_t errlen) {
  dec d;
  int base = lua_gettop(L);
  d.L = L;
  d.s = s;
  d.end = s + len;
  d.err = err;
  d.errlen = errlen;
  d.p = skip_ws(s, d.end);
  if (d.p == d.end) {
    if (err && errlen) snprintf(err, errlen, "empty JSON text");
    return -1;
  }
  if (!lua_checkstack(L, 8)) return dec_deep(&d);
  push_array_mt(L);
  d.mt_slot = lua_gettop(L);
  if (dec_value(&d, 0) == 0) {
    d.p = skip_ws(d.p, d.end);
    if (d.p == d.end) {
      lua_remove(L, d.mt_slot);
      return 0;
    }
    dec_fail(&d, d.p, "trailing garbage");
  }
  lua_settop(L, base);
  return -1;
}

/* json_decode(text) -> value | nil, err */
static int l_json_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  char err[128];
  lua_settop(L, 1);
  if (tb_json_decode_push(L, s, len, err, sizeof err) == 0) return 1;
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

int tb_json_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"json_encode", l_json_encode}, {"json_decode", l_json_decode},
    {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  luaL_checkstack(L, 2, NULL);
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "json_null");
  push_array_mt(L);
  lua_setfield(L, -2, "json_array_mt");
  return 0;
}
