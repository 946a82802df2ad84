/* log.c: writes log lines to stderr, one write() per line so lines never interleave, and
 * masks every registered secret (access token, password) wherever it appears, so no code
 * path can leak one into a log by accident. Whatever a message holds (server text included),
 * a record stays readable and bounded: control characters are escaped, a newline continues
 * the record on an indented line (tracebacks), and a message is cut at TB_LOG_MAX bytes.
 * When stderr is the journal ($JOURNAL_STREAM names its device and inode, as systemd sets it
 * for StandardError=journal) a line carries no timestamp of its own but its level as a
 * syslog priority prefix ("<4>"), on every line of a record, so `journalctl -p warning` works. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <lauxlib.h>
#include "core.h"
#include "loop.h"

#define TB_MAX_SECRETS 8
#define TB_LOG_MAX 3000

static char *secrets[TB_MAX_SECRETS];
static int nsecrets = 0;

/* core.log_secret(s): masks s in every later log line (ignored when shorter than 3 bytes) */
static int l_log_secret(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (len < 3 || nsecrets >= TB_MAX_SECRETS) return 0;
  for (int i = 0; i < nsecrets; i++)
    if (strcmp(secrets[i], s) == 0) return 0;
  secrets[nsecrets] = strdup(s);
  if (secrets[nsecrets]) nsecrets++;
  return 0;
}

/* Appends msg to b with every secret replaced by "***". */
static void add_masked(luaL_Buffer *b, const char *msg, size_t len) {
  size_t i = 0;
  while (i < len) {
    int hit = 0;
    for (int k = 0; k < nsecrets; k++) {
      size_t sl = strlen(secrets[k]);
      if (sl <= len - i && memcmp(msg + i, secrets[k], sl) == 0) {
        luaL_addstring(b, "***");
        i += sl;
        hit = 1;
        break;
      }
    }
    if (!hit) luaL_addchar(b, msg[i++]);
  }
}

/* stderr_is_journal() -> 1 when stderr is the stream $JOURNAL_STREAM ("DEV:INODE") names:
 * the variable alone is inherited by children whose stderr went elsewhere */
static int stderr_is_journal(void) {
  const char *stream = getenv("JOURNAL_STREAM");
  if (!stream) return 0;
  char *end;
  unsigned long long dev = strtoull(stream, &end, 10);
  if (end == stream || *end != ':') return 0;
  const char *ino_text = end + 1;
  unsigned long long ino = strtoull(ino_text, &end, 10);
  if (end == ino_text || *end != '\0') return 0;
  struct stat st;
  if (fstat(2, &st) != 0) return 0;
  return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

/* journal_prefix(level) -> "<N>", the syslog priority of a level name */
static const char *journal_prefix(const char *level) {
  if (strcmp(level, "ERROR") == 0) return "<3>";
  if (strcmp(level, "WARN") == 0) return "<4>";
  if (strcmp(level, "DEBUG") == 0) return "<7>";
  return "<6>";
}

/* Appends msg to b so that it cannot forge or break log lines (see the top of the file);
 * a continuation line starts with line_prefix. */
static void add_printable(luaL_Buffer *b, const char *msg, size_t len, const char *line_prefix) {
  size_t cut = len > TB_LOG_MAX ? TB_LOG_MAX : len;
  for (size_t i = 0; i < cut; i++) {
    unsigned char c = (unsigned char)msg[i];
    if (c == '\n') {
      luaL_addchar(b, '\n');
      luaL_addstring(b, line_prefix);
      luaL_addstring(b, "  ");
    } else if ((c < 0x20 && c != '\t') || c == 0x7f) {
      char esc[8];
      snprintf(esc, sizeof esc, "\\x%02X", c);
      luaL_addstring(b, esc);
    } else {
      luaL_addchar(b, (char)c);
    }
  }
  if (cut < len) {
    char more[64];
    snprintf(more, sizeof more, "... (%zu more bytes)", len - cut);
    luaL_addstring(b, more);
  }
}

/* logging_to_journal() -> stderr_is_journal(), asked once: stderr does not change under a
 * running agent */
static int logging_to_journal(void) {
  static int journal = -1;
  if (journal < 0) journal = stderr_is_journal();
  return journal;
}

/* core.log_journal() -> true when log lines go to the journal (see the top of the file) */
static int l_log_journal(lua_State *L) {
  lua_pushboolean(L, logging_to_journal());
  return 1;
}

/* core.log_write(level, message): "2026-11-25T18:00:00.123Z INFO message\n" on stderr, or
 * "<6>INFO message\n" when stderr is the journal (the journal stamps each line itself) */
static int l_log_write(lua_State *L) {
  const char *level = luaL_checkstring(L, 1);
  size_t len;
  const char *msg = luaL_checklstring(L, 2, &len);
  int journal = logging_to_journal();
  const char *prefix = journal ? journal_prefix(level) : "";
  char stamp[40] = "";
  if (!journal) {
    int64_t ms = tb_loop_wall();
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof stamp - n, ".%03dZ ", (int)(ms % 1000));
  }
  luaL_Buffer m;
  luaL_buffinit(L, &m);
  add_masked(&m, msg, len);
  luaL_pushresult(&m);
  size_t mlen;
  const char *masked = lua_tolstring(L, -1, &mlen);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, prefix);
  luaL_addstring(&b, stamp);
  luaL_addstring(&b, level);
  luaL_addchar(&b, ' ');
  add_printable(&b, masked, mlen, prefix);
  luaL_addchar(&b, '\n');
  luaL_pushresult(&b);
  size_t outlen;
  const char *out = lua_tolstring(L, -1, &outlen);
  while (outlen > 0) {
    ssize_t w = write(2, out, outlen);
    if (w <= 0) break;
    out += w;
    outlen -= (size_t)w;
  }
  return 0;
}

/* core.mask(s) -> s with every secret replaced (for messages that leave the agent) */
static int l_mask(lua_State *L) {
  size_t len;
  const char *msg = luaL_checklstring(L, 1, &len);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  add_masked(&b, msg, len);
  luaL_pushresult(&b);
  return 1;
}

int tb_log_open(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"log_write", l_log_write}, {"log_secret", l_log_secret}, {"mask", l_mask},
    {"log_journal", l_log_journal}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
