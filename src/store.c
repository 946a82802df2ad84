/* store.c: the durable outbox, an SQLite database in WAL mode in the state directory, and
 * the values a script keeps with tb.persist (table persist, in the same transactions).
 * A record is inserted, and deleted only when the broker acknowledged it. Inserts, deletions
 * and the high-water mark of what was sent are grouped into one transaction that Lua commits
 * when the handler that sent yields or ends, before the records are published (tb.session): a
 * commit per record would cost more than the rest of the agent's work per message. Lua
 * publishes the records it has in hand; reading back (store:next) is for a restart or a
 * backlog. The database is
 * opened in exclusive locking mode (one agent per state directory; no shared-memory index)
 * with 1 KiB pages (a commit of one small record writes one small page).
 * Lua sees userdata "tb.store"; all statements are prepared once. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sqlite3.h>
#include <lauxlib.h>
#include "core.h"

#define STORE_MT "tb.store"

typedef struct {
  sqlite3 *db;
  sqlite3_stmt *insert, *next, *del, *sent_upto, *count, *oldest, *drop_oldest, *drop_before, *resend;
  sqlite3_stmt *persist_all, *persist_put, *persist_del;
  int in_batch;
} tb_store;

static const char *SCHEMA =
  "PRAGMA page_size=1024;"
  "PRAGMA locking_mode=EXCLUSIVE;"
  "PRAGMA journal_mode=WAL;"
  "PRAGMA synchronous=NORMAL;"
  "CREATE TABLE IF NOT EXISTS outbox("
  "  seq INTEGER PRIMARY KEY AUTOINCREMENT, created INTEGER NOT NULL, topic TEXT NOT NULL,"
  "  payload BLOB NOT NULL, qos INTEGER NOT NULL, kind TEXT, points INTEGER, sent INTEGER DEFAULT 0);"
  /* sent_upto: the highest seq handed to a connection, one row updated per commit (the `sent`
   * column above is only read, from databases of versions that marked each record) */
  "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
  /* tb.persist: the script's JSON values by key, written in the same batch as the outbox */
  "CREATE TABLE IF NOT EXISTS persist(k TEXT PRIMARY KEY, v TEXT NOT NULL);";

static tb_store *check_store(lua_State *L) {
  tb_store *s = luaL_checkudata(L, 1, STORE_MT);
  if (!s->db) luaL_error(L, "attempt to use a closed store");
  return s;
}

static int db_error(lua_State *L, tb_store *s, const char *what) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, s->db ? sqlite3_errmsg(s->db) : "no database");
  return 2;
}

static void store_close(tb_store *s) {
  sqlite3_stmt **stmts[] = {&s->insert, &s->next, &s->del, &s->sent_upto, &s->count, &s->oldest,
                            &s->drop_oldest, &s->drop_before, &s->resend, &s->persist_all,
                            &s->persist_put, &s->persist_del};
  for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++) {
    sqlite3_finalize(*stmts[i]);
    *stmts[i] = NULL;
  }
  if (s->db) {
    if (s->in_batch) sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
    sqlite3_close(s->db);
    s->db = NULL;
  }
}

/* core.store_open(path) -> store | nil, err */
static int l_store_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  tb_store *s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  luaL_setmetatable(L, STORE_MT);
  /* created private to the user first: SQLite gives its -wal and -shm files the same mode */
  if (strcmp(path, ":memory:") != 0) {
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) close(fd);
  }
  if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
    int n = db_error(L, s, "cannot open outbox");
    store_close(s);
    return n;
  }
  sqlite3_busy_timeout(s->db, 2000);
  if (sqlite3_exec(s->db, SCHEMA, NULL, NULL, NULL) != SQLITE_OK) {
    int n = db_error(L, s, "cannot initialise outbox");
    store_close(s);
    return n;
  }
  struct { sqlite3_stmt **st; const char *sql; } prep[] = {
    {&s->insert, "INSERT INTO outbox(created, topic, payload, qos, kind, points) VALUES(?,?,?,?,?,?)"},
    {&s->next, "SELECT seq, created, topic, payload, qos, kind, points FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"},
    {&s->del, "DELETE FROM outbox WHERE seq BETWEEN ? AND ?"},
    {&s->sent_upto, "INSERT INTO meta(k, v) VALUES('sent_upto', ?) ON CONFLICT(k) DO UPDATE SET v = max(v, excluded.v)"},
    {&s->count, "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(seq), 0) FROM outbox"},
    {&s->oldest, "SELECT seq, created FROM outbox ORDER BY seq LIMIT 1"},
    {&s->drop_oldest, "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?)"},
    {&s->drop_before, "DELETE FROM outbox WHERE created < ?"},
    {&s->resend, "SELECT count(*) FROM outbox WHERE sent = 1"
                 " OR seq <= (SELECT coalesce(max(v), 0) FROM meta WHERE k = 'sent_upto')"},
    {&s->persist_all, "SELECT k, v FROM persist"},
    {&s->persist_put, "INSERT INTO persist(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"},
    {&s->persist_del, "DELETE FROM persist WHERE k = ?"},
  };
  for (size_t i = 0; i < sizeof prep / sizeof prep[0]; i++) {
    if (sqlite3_prepare_v3(s->db, prep[i].sql, -1, SQLITE_PREPARE_PERSISTENT, prep[i].st, NULL) != SQLITE_OK) {
      int n = db_error(L, s, "cannot prepare outbox statement");
      store_close(s);
      return n;
    }
  }
  return 1;
}

static int batch_begin(tb_store *s) {
  if (s->in_batch) return SQLITE_OK;
  int rc = sqlite3_exec(s->db, "BEGIN", NULL, NULL, NULL);
  if (rc == SQLITE_OK) s->in_batch = 1;
  return rc;
}

/* store:push(created_ms, topic, payload, qos, kind, points) -> seq | nil, err (in the batch:
 * on disk at the next store:commit()) */
static int l_push(lua_State *L) {
  tb_store *s = check_store(L);
  lua_Integer created = luaL_checkinteger(L, 2);
  size_t tlen, plen;
  const char *topic = luaL_checklstring(L, 3, &tlen);
  const char *payload = luaL_checklstring(L, 4, &plen);
  lua_Integer qos = luaL_checkinteger(L, 5);
  const char *kind = luaL_optstring(L, 6, "");
  lua_Integer points = luaL_optinteger(L, 7, 0);
  sqlite3_stmt *st = s->insert;
  if (batch_begin(s) != SQLITE_OK) return db_error(L, s, "cannot store record");
  sqlite3_bind_int64(st, 1, created);
  sqlite3_bind_text(st, 2, topic, (int)tlen, SQLITE_STATIC);
  sqlite3_bind_blob(st, 3, payload, (int)plen, SQLITE_STATIC);
  sqlite3_bind_int64(st, 4, qos);
  sqlite3_bind_text(st, 5, kind, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 6, points);
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  if (rc != SQLITE_DONE) return db_error(L, s, "cannot store record");
  lua_Integer seq = sqlite3_last_insert_rowid(s->db);
  lua_pushinteger(L, seq);
  return 1;
}

/* store:next(after_seq, n) -> {{seq=, created=, topic=, payload=, qos=, kind=, points=}...} */
static int l_next(lua_State *L) {
  tb_store *s = check_store(L);
  lua_Integer after = luaL_checkinteger(L, 2);
  lua_Integer n = luaL_optinteger(L, 3, 64);
  sqlite3_stmt *st = s->next;
  sqlite3_bind_int64(st, 1, after);
  sqlite3_bind_int64(st, 2, n);
  lua_newtable(L);
  int i = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, sqlite3_column_int64(st, 0));
    lua_setfield(L, -2, "seq");
    lua_pushinteger(L, sqlite3_column_int64(st, 1));
    lua_setfield(L, -2, "created");
    lua_pushlstring(L, (const char *)sqlite3_column_text(st, 2), (size_t)sqlite3_column_bytes(st, 2));
    lua_setfield(L, -2, "topic");
    const void *blob = sqlite3_column_blob(st, 3);
    lua_pushlstring(L, blob ? blob : "", (size_t)sqlite3_column_bytes(st, 3));
    lua_setfield(L, -2, "payload");
    lua_pushinteger(L, sqlite3_column_int64(st, 4));
    lua_setfield(L, -2, "qos");
    lua_pushstring(L, (const char *)sqlite3_column_text(st, 5));
    lua_setfield(L, -2, "kind");
    lua_pushinteger(L, sqlite3_column_int64(st, 6));
    lua_setfield(L, -2, "points");
    lua_rawseti(L, -2, ++i);
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return db_error(L, s, "cannot read outbox");
  return 1;
}

/* store:ack(first_seq [, last_seq]) -> true | nil, err: the broker has the records from
 * first_seq to last_seq (one range: acknowledgements mostly come in order); batched until
 * store:commit() */
static int l_ack(lua_State *L) {
  tb_store *s = check_store(L);
  lua_Integer first = luaL_checkinteger(L, 2);
  lua_Integer last = luaL_optinteger(L, 3, first);
  if (batch_begin(s) != SQLITE_OK) return db_error(L, s, "cannot delete record");
  sqlite3_bind_int64(s->del, 1, first);
  sqlite3_bind_int64(s->del, 2, last);
  int rc = sqlite3_step(s->del);
  sqlite3_reset(s->del);
  if (rc != SQLITE_DONE) return db_error(L, s, "cannot delete record");
  lua_pushboolean(L, 1);
  return 1;
}

/* store:commit([sent_upto]) -> true | nil, err: ends the batch of inserts and acks, with the
 * highest seq handed to a connection when given; on failure it is rolled back */
static int l_commit(lua_State *L) {
  tb_store *s = check_store(L);
  if (!lua_isnoneornil(L, 2)) {
    lua_Integer upto = luaL_checkinteger(L, 2);
    if (batch_begin(s) != SQLITE_OK) return db_error(L, s, "cannot record sent records");
    sqlite3_bind_int64(s->sent_upto, 1, upto);
    int rc = sqlite3_step(s->sent_upto);
    sqlite3_reset(s->sent_upto);
    if (rc != SQLITE_DONE) return db_error(L, s, "cannot record sent records");
  }
  if (s->in_batch) {
    s->in_batch = 0;
    if (sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
      /* a failed COMMIT may leave the transaction open: end it, so the database is as it was
       * at the last commit and Lua knows which records are not on disk */
      lua_pushnil(L);
      lua_pushfstring(L, "cannot commit outbox: %s", sqlite3_errmsg(s->db));
      if (!sqlite3_get_autocommit(s->db)) sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
      return 2;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* store:stats() -> records, payload_bytes, oldest_created_ms|nil, oldest_seq|nil, sent_marked,
 *   newest_seq */
static int l_stats(lua_State *L) {
  tb_store *s = check_store(L);
  sqlite3_stmt *st = s->count;
  lua_Integer n = 0, bytes = 0, newest = 0;
  if (sqlite3_step(st) == SQLITE_ROW) {
    n = sqlite3_column_int64(st, 0);
    bytes = sqlite3_column_int64(st, 1);
    newest = sqlite3_column_int64(st, 2);
  }
  sqlite3_reset(st);
  lua_pushinteger(L, n);
  lua_pushinteger(L, bytes);
  st = s->oldest;
  if (sqlite3_step(st) == SQLITE_ROW) {
    lua_pushinteger(L, sqlite3_column_int64(st, 1));
    lua_pushinteger(L, sqlite3_column_int64(st, 0));
  } else {
    lua_pushnil(L);
    lua_pushnil(L);
  }
  sqlite3_reset(st);
  st = s->resend;
  lua_Integer sent = 0;
  if (sqlite3_step(st) == SQLITE_ROW) sent = sqlite3_column_int64(st, 0);
  sqlite3_reset(st);
  lua_pushinteger(L, sent);
  lua_pushinteger(L, newest);
  return 6;
}

/* Runs a DELETE whose parameters are bound: the number of records dropped | nil, err */
static int run_drop(lua_State *L, tb_store *s, sqlite3_stmt *st, const char *what) {
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return db_error(L, s, what);
  lua_pushinteger(L, sqlite3_changes(s->db));
  return 1;
}

/* store:drop_oldest(after_seq, n) -> dropped | nil, err: the n oldest records after after_seq */
static int l_drop_oldest(lua_State *L) {
  tb_store *s = check_store(L);
  sqlite3_bind_int64(s->drop_oldest, 1, luaL_checkinteger(L, 2));
  sqlite3_bind_int64(s->drop_oldest, 2, luaL_checkinteger(L, 3));
  return run_drop(L, s, s->drop_oldest, "cannot trim outbox");
}

/* store:drop_before(created_ms) -> dropped | nil, err */
static int l_drop_before(lua_State *L) {
  tb_store *s = check_store(L);
  sqlite3_bind_int64(s->drop_before, 1, luaL_checkinteger(L, 2));
  return run_drop(L, s, s->drop_before, "cannot expire outbox records");
}

/* store:persist_all() -> {key = json_text, ...} | nil, err: what tb.persist holds on disk */
static int l_persist_all(lua_State *L) {
  tb_store *s = check_store(L);
  sqlite3_stmt *st = s->persist_all;
  lua_newtable(L);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    lua_pushlstring(L, (const char *)sqlite3_column_text(st, 0), (size_t)sqlite3_column_bytes(st, 0));
    lua_pushlstring(L, (const char *)sqlite3_column_text(st, 1), (size_t)sqlite3_column_bytes(st, 1));
    lua_rawset(L, -3);
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE) return db_error(L, s, "cannot read persisted values");
  return 1;
}

/* store:persist_put(key, json_text) / store:persist_delete(key) -> true | nil, err (in the
 * batch: on disk at the next store:commit(), with the outbox records of the same handler run) */
static int persist_write(lua_State *L, sqlite3_stmt *st, int with_value) {
  tb_store *s = check_store(L);
  size_t klen, vlen = 0;
  const char *key = luaL_checklstring(L, 2, &klen);
  const char *value = with_value ? luaL_checklstring(L, 3, &vlen) : NULL;
  if (batch_begin(s) != SQLITE_OK) return db_error(L, s, "cannot persist value");
  sqlite3_bind_text(st, 1, key, (int)klen, SQLITE_STATIC);
  if (with_value) sqlite3_bind_text(st, 2, value, (int)vlen, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  if (rc != SQLITE_DONE) return db_error(L, s, "cannot persist value");
  lua_pushboolean(L, 1);
  return 1;
}

static int l_persist_put(lua_State *L) {
  return persist_write(L, check_store(L)->persist_put, 1);
}

static int l_persist_delete(lua_State *L) {
  return persist_write(L, check_store(L)->persist_del, 0);
}

static int l_close(lua_State *L) {
  store_close(luaL_checkudata(L, 1, STORE_MT));
  return 0;
}

int tb_store_open(lua_State *L) {
  static const luaL_Reg methods[] = {{"push", l_push}, {"next", l_next}, {"ack", l_ack},
    {"commit", l_commit}, {"stats", l_stats},
    {"drop_oldest", l_drop_oldest}, {"drop_before", l_drop_before},
    {"persist_all", l_persist_all}, {"persist_put", l_persist_put}, {"persist_delete", l_persist_delete},
    {"close", l_close},
    {"__gc", l_close}, {"__close", l_close}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"store_open", l_store_open}, {NULL, NULL}};
  tb_core_register(L, STORE_MT, methods, fns);
  return 0;
}
