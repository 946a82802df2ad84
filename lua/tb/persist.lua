-- tb.persist: a small store of JSON values by key that survives restarts, for what a script
-- must remember across them (a boot counter, a calibration, a setpoint). `run` keeps it in the
-- state directory's SQLite database (tb.core's store, table persist), written in the same
-- transaction as the outbox records of the handler run that changed it; `check` and
-- tb.testing keep it in memory. Values are kept as JSON text, so what get returns is a fresh
-- copy (changing it changes nothing until it is set again) and only what JSON carries can be
-- kept. The whole store is bounded (keys and JSON text, MAX_BYTES): a set past it is refused.
local M = {}

M.MAX_BYTES = 1024 * 1024
M.MAX_KEY = 256

local Store = {}
Store.__index = Store

-- memory_backend([seed]) -> a backend that keeps nothing past the process; seed: {key = text}
function M.memory_backend(seed)
  local texts = {}
  for k, v in pairs(seed or {}) do texts[k] = v end
  return {
    load = function() return texts end,
    put = function() return true end,
    delete = function() return true end,
  }
end

-- sqlite_backend(db [, owned]) -> a backend over a tb.core store (shared with the outbox;
-- owned: this store opened it and closes it)
function M.sqlite_backend(db, owned)
  return {
    load = function() return db:persist_all() end,
    put = function(key, text) return db:persist_put(key, text) end,
    delete = function(key) return db:persist_delete(key) end,
    commit = function() return db:commit() end,
    close = owned and function() db:close() end or nil,
  }
end

-- new{backend=, encode=, decode=, null=, max_bytes=, log=, in_handler=fn() -> bool} -> store | nil, err
-- in_handler says whether a handler runs now: its writes are committed when it yields or ends
-- (store:commit, called by the scheduler), others at once.
function M.new(o)
  local texts, err = o.backend.load()
  if not texts then return nil, err end
  local self = setmetatable({backend = o.backend, encode = o.encode, decode = o.decode, null = o.null,
    max_bytes = o.max_bytes or M.MAX_BYTES, log = o.log, in_handler = o.in_handler,
    texts = {}, bytes = 0, dirty = false}, Store)
  for k, text in pairs(texts) do
    self.texts[k] = text
    self.bytes = self.bytes + #k + #text
  end
  return self
end

-- seed(values) -> {key = json_text}: plain Lua values as a memory backend's seed
function M.seed(values, encode)
  local out = {}
  for k, v in pairs(values or {}) do
    local text, err = encode(v)
    if not text then error(string.format("tb.persist seed %q: %s", tostring(k), err), 2) end
    out[k] = text
  end
  return out
end

local function check_key(key, fname)
  if type(key) ~= "string" or key == "" or #key > M.MAX_KEY then
    error(string.format("bad argument #1 to '%s' (key must be a non-empty string of at most %d bytes, got %s)",
      fname, M.MAX_KEY, type(key) == "string" and (#key == 0 and "\"\"" or #key .. " bytes") or type(key)), 3)
  end
end

-- text(key [, held]) -> the JSON text under key, looking at held writes first (false: deleted)
function Store:text(key, held)
  if held and held[key] ~= nil then return held[key] or nil end
  return self.texts[key]
end

function Store:decoded(text)
  if text == nil then return nil end
  local v = self.decode(text)
  if v == self.null then return nil end
  return v
end

-- write(key, text|nil) -> true | nil, err: one change, through the backend
function Store:write(key, text)
  local old = self.texts[key]
  local ok, err
  if text then ok, err = self.backend.put(key, text) else ok, err = self.backend.delete(key) end
  if not ok then
    if self.log then self.log.error("tb.persist: %s", err) end
    return nil, err
  end
  self.texts[key] = text
  self.bytes = self.bytes - (old and #key + #old or 0) + (text and #key + #text or 0)
  self.dirty = true
  if not (self.in_handler and self.in_handler()) then self:commit() end
  return true
end

-- commit() -> true | nil, err: writes since the last commit go to disk (once per handler run)
function Store:commit()
  if not self.dirty then return true end
  self.dirty = false
  if not self.backend.commit then return true end
  local ok, err = self.backend.commit()
  if not ok and self.log then self.log.error("tb.persist: changes not on disk: %s", err) end
  return ok, err
end

function Store:close()
  self:commit()
  if self.backend.close then self.backend.close() end
end

-- apply(held): the writes a version held while it loaded, now that it is live
function Store:apply(held)
  local keys = {}
  for k in pairs(held) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local ok, err = self:write(k, held[k] or nil)
    if not ok and self.log then self.log.warn("tb.persist: held write of %q lost: %s", k, err) end
  end
end

-- snapshot() -> {key = value}: every value, decoded (tb.testing's s:persisted())
function Store:snapshot()
  local out = {}
  for k, text in pairs(self.texts) do out[k] = self:decoded(text) end
  return out
end

-- api(gen) -> the tb.persist table of one generation. While gen loads, its writes are held in
-- gen.persist_held (read back by that version only) and applied when it goes live: a version
-- that fails to load has changed nothing.
function Store:api(gen)
  local store = self
  local function held() return gen.loading and gen.persist_held or nil end
  local api = {}

  -- get(key [, default]) -> value | default
  function api.get(key, default)
    check_key(key, "get")
    local v = store:decoded(store:text(key, held()))
    if v == nil then return default end
    return v
  end

  -- set(key, value) -> true | nil, err (nil deletes). err: a value JSON cannot carry, or the
  -- store would pass its bound.
  function api.set(key, value)
    check_key(key, "set")
    if value == nil then return api.delete(key) end
    local text, err, code = store.encode(value, store.max_bytes)
    if not text then
      if code == "too_large" then
        err = string.format("value too large: over %d bytes", store.max_bytes)
      end
      return nil, string.format("tb.persist.set(%q): %s", key, err)
    end
    local h = held()
    local old = store:text(key, h)
    local total = store.bytes
    if h then
      for k, t in pairs(h) do total = total - (store.texts[k] and #k + #store.texts[k] or 0) + (t and #k + #t or 0) end
    end
    total = total - (old and #key + #old or 0) + #key + #text
    if total > store.max_bytes then
      return nil, string.format("tb.persist is full: %q would make it %d bytes (limit %d); delete keys no longer needed",
        key, total, store.max_bytes)
    end
    if h then
      h[key] = text
      return true
    end
    return store:write(key, text)
  end

  -- delete(key) -> true | nil, err
  function api.delete(key)
    check_key(key, "delete")
    local h = held()
    if h then
      h[key] = false
      return true
    end
    if store.texts[key] == nil then return true end
    return store:write(key, nil)
  end

  -- keys([prefix]) -> sorted list of the keys (starting with prefix)
  function api.keys(prefix)
    if prefix ~= nil and type(prefix) ~= "string" then
      error("bad argument #1 to 'keys' (string expected, got " .. type(prefix) .. ")", 2)
    end
    local h, seen, out = held(), {}, {}
    local function add(k)
      if not seen[k] and (not prefix or k:sub(1, #prefix) == prefix) and store:text(k, h) then
        seen[k] = true
        out[#out + 1] = k
      end
    end
    for k in pairs(store.texts) do add(k) end
    for k in pairs(h or {}) do add(k) end
    table.sort(out)
    return out
  end

  -- pairs([prefix]) -> iterator of key, value in key order (values as get returns them)
  function api.pairs(prefix)
    local keys, i = api.keys(prefix), 0
    return function()
      i = i + 1
      local k = keys[i]
      if k == nil then return nil end
      return k, store:decoded(store:text(k, held()))
    end
  end

  return api
end

-- open_db(core, config, log) -> the tb.core store tb.persist keeps its values in under `run`,
-- owned: that of the durable outbox (config.outbox), or the same file opened for tb.persist
-- alone (--memory-outbox, or an outbox that could not open); nil when neither opens (logged:
-- the values then live in memory only).
function M.open_db(core, config, log)
  if config.outbox and config.outbox.db then return config.outbox.db, false end
  local db, err = core.store_open(config.state_dir .. "/outbox.db")
  if not db then
    log.error("tb.persist: the state directory's database is unusable (%s): values kept in memory only, lost on a restart", err)
    return nil
  end
  return db, true
end

-- attach(ctx) -> store: the store of an agent context (tb.agent.build): on the database of
-- config.persist_db (owned when config.persist_db_owned), else in memory, seeded from
-- config.persist ({key = value}, tb.testing). Writes a handler makes are committed when it
-- yields (the scheduler's after_resume) or ends (on_handler_end, before an RPC answer is
-- sent), with the outbox records it queued.
function M.attach(ctx)
  local c, core, sched, log = ctx.config, ctx.core, ctx.sched, ctx.log
  local function open(backend)
    return M.new{backend = backend, encode = core.json_encode, decode = core.json_decode,
      null = core.json_null, max_bytes = c.persist_max_bytes, log = log,
      in_handler = function() return sched:current() ~= nil end}
  end
  local store, err
  if c.persist_db then
    store, err = open(M.sqlite_backend(c.persist_db, c.persist_db_owned))
    if not store then
      log.error("tb.persist: cannot read the stored values (%s): values kept in memory only", err)
    end
  end
  store = store or open(M.memory_backend(M.seed(c.persist, core.json_encode)))
  local after = sched.after_resume
  sched.after_resume = function()
    store:commit()
    if after then after() end
  end
  -- an RPC answer goes out when the handler ends, before the scheduler's after_resume
  sched.on_handler_end = function() store:commit() end
  return store
end

return M
