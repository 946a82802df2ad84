-- tb.persist: JSON values by key that survive restarts (SQLite in the state directory under
-- run, memory under check and tb.testing).
local testing = require "tb.testing"
local persist = require "tb.persist"
local core = require "tb.core"

local script = require("spec.support.files").script

local function store_on(backend, opts)
  opts = opts or {}
  return assert(persist.new{backend = backend, encode = core.json_encode, decode = core.json_decode,
    null = core.json_null, max_bytes = opts.max_bytes, in_handler = opts.in_handler})
end

describe("tb.persist", function()
  describe("in a script (tb.testing)", function()
    it("gets, sets, deletes and lists JSON values, keeping their types", function()
      local s = testing.load(script([[
        tb.on_rpc("put", function(p) return tb.persist.set(p.k, p.v) end)
        tb.on_rpc("get", function(k) return {v = tb.persist.get(k, "none")} end)
        tb.on_rpc("del", function(k) return tb.persist.delete(k) end)
        tb.on_rpc("keys", function(prefix) return tb.persist.keys(prefix) end)
        tb.on_rpc("pairs", function()
          local out = {}
          for k, v in tb.persist.pairs() do out[#out + 1] = {k, v} end
          return out
        end)
      ]]))
      assert.is_true(s:rpc("put", {k = "count", v = 3}))
      assert.is_true(s:rpc("put", {k = "cal", v = {offset = 0.5, points = {1, 2}}}))
      assert.is_true(s:rpc("put", {k = "cap", v = 21.0}))
      assert.equal(3, s.persist.get("count"))
      assert.equal("integer", math.type(s.persist.get("count")))
      assert.equal("float", math.type(s.persist.get("cap")))
      assert.same({offset = 0.5, points = {1, 2}}, s.persist.get("cal"))
      assert.same({v = "none"}, s:rpc("get", "missing"))
      assert.same({"cal", "cap"}, s:rpc("keys", "ca"))
      assert.same({{"cal", {offset = 0.5, points = {1, 2}}}, {"cap", 21.0}, {"count", 3}}, s:rpc("pairs"))
      assert.is_true(s:rpc("del", "count"))
      assert.is_nil(s.persist.get("count"))
      assert.same({"cal", "cap"}, s.persist.keys())
    end)

    it("hands out copies: changing a table that get returned changes nothing until set", function()
      local s = testing.load(script([[
        tb.persist.set("cfg", {mode = "auto"})
        local cfg = tb.persist.get("cfg")
        cfg.mode = "manual"
        tb.state.seen = tb.persist.get("cfg").mode
      ]]))
      assert.equal("auto", s:state().seen)
    end)

    it("is pre-seeded by the spec and read back; s:persisted() carries it to the next start", function()
      local path = script([[
        tb.persist.set("boots", tb.persist.get("boots", 0) + 1)
      ]])
      local s = testing.load(path, {persist = {boots = 6, name = "pump"}})
      assert.equal(7, s.persist.get("boots"))
      local again = testing.load(path, {persist = s:persisted()})
      assert.same({boots = 8, name = "pump"}, again:persisted())
      assert.same({boots = 1}, testing.load(path):persisted())   -- nothing carried over by itself
    end)

    it("refuses what JSON cannot carry and a full store with nil, err; misuse raises", function()
      local s = testing.load(script([[
        tb.on_rpc("try", function(what)
          if what == "nan" then return {select(2, tb.persist.set("x", 0 / 0))} end
          if what == "fn" then return {select(2, tb.persist.set("x", print))} end
          if what == "big" then return {select(2, tb.persist.set("big", string.rep("x", 2000000)))} end
          if what == "key" then tb.persist.set(42, 1) end
        end)
      ]]))
      assert.matches('tb.persist.set%("x"%): .*NaN', s:rpc("try", "nan")[1])
      assert.matches('tb.persist.set%("x"%): .*function', s:rpc("try", "fn")[1])
      assert.matches("value too large: over 1048576 bytes", s:rpc("try", "big")[1])
      s:expect_error("key must be a non%-empty string")
      assert.matches("bad argument #1 to 'set' %(key must be a non%-empty string of at most 256 bytes, got number%)",
        s:rpc("try", "key").error)
    end)

    it("is bounded as a whole, with an error that says what to do", function()
      local s = testing.load(script("return"), {config = {persist_max_bytes = 100}})
      assert.is_true(s.persist.set("a", string.rep("x", 60)))
      local ok, err = s.persist.set("b", string.rep("y", 60))
      assert.is_nil(ok)
      assert.equal('tb.persist is full: "b" would make it 126 bytes (limit 100); delete keys no longer needed', err)
      assert.is_true(s.persist.set("a", string.rep("x", 20)))   -- replacing frees the old value
      assert.is_true(s.persist.set("b", string.rep("y", 60)))
    end)

    it("keeps nothing a version that fails to load wrote; a version that goes live keeps its writes", function()
      local s = testing.load(script([[
        tb.persist.set("v", 1)
      ]]))
      assert.is_nil(s:reload([[
        tb.persist.set("v", 2)
        tb.persist.set("extra", true)
        assert(tb.persist.get("v") == 2)   -- the loading version reads its own writes
        error("broken")
      ]]))
      assert.same({v = 1}, s:persisted())
      assert.is_true(s:reload([[
        tb.persist.delete("v")
        tb.persist.set("w", 3)
      ]]))
      assert.same({w = 3}, s:persisted())
    end)

    it("raises at the line of a misspelt name, with the closest one", function()
      local path = script("local tb = require 'tb'\ntb.persist.sett('a', 1)\n")
      local ok, err = pcall(testing.load, path)
      assert.is_false(ok)
      assert.matches(":2: unknown tb.persist.sett; did you mean tb.persist.set%?", err)
    end)
  end)

  describe("on SQLite", function()
    it("keeps values across a close and an open of the database", function()
      local path = os.tmpname()
      local db = assert(core.store_open(path))
      local st = store_on(persist.sqlite_backend(db, true))
      local api = st:api({loading = false})
      assert.is_true(api.set("setpoint", 21.5))
      assert.is_true(api.set("boots", 3))
      assert.is_true(api.set("gone", "soon"))
      assert.is_true(api.delete("gone"))
      st:close()
      db = assert(core.store_open(path))
      local again = store_on(persist.sqlite_backend(db, true)):api({loading = false})
      assert.equal(21.5, again.get("setpoint"))
      assert.equal("float", math.type(again.get("setpoint")))
      assert.equal(3, again.get("boots"))
      assert.same({"boots", "setpoint"}, again.keys())
      db:close()
      os.remove(path)
    end)

    it("shares the outbox's transaction: a write in a handler waits for the handler's commit", function()
      local db = assert(core.store_open(":memory:"))
      local in_handler = true
      local st = store_on(persist.sqlite_backend(db), {in_handler = function() return in_handler end})
      local api = st:api({loading = false})
      api.set("k", 1)
      assert.is_true(st.dirty)           -- written in the open batch, not yet committed
      assert.is_true(st:commit())
      assert.is_false(st.dirty)
      in_handler = false
      api.set("k", 2)
      assert.is_false(st.dirty)          -- outside a handler: committed at once
      assert.same({k = "2"}, db:persist_all())
      db:close()
    end)

    it("an agent context keeps it on the outbox's database and commits it with the handler run", function()
      local path = os.tmpname()
      local db = assert(core.store_open(path))
      local s = testing.load(script([[
        tb.on_rpc("inc", function()
          tb.persist.set("n", tb.persist.get("n", 0) + 1)
          tb.sleep(10)                                    -- committed when the handler yields
          return tb.persist.get("n")
        end)
      ]]), {config = {persist_db = db}})
      assert.is_nil(s:rpc("inc"))
      assert.same({n = "1"}, db:persist_all())
      s:advance(10)
      assert.equal(1, s.rpc_responses[s.last_rpc_id])
      db:close()
      os.remove(path)
    end)
  end)
end)
