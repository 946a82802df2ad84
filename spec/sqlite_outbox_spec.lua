-- The durable outbox (tb.sqlite_outbox over tb.core's SQLite store): the same interface as the
-- memory outbox, and what survives a restart.
local store = require "tb.sqlite_outbox"
local core = require "tb.core"
local logmod = require "tb.log"

local function tmpdb()
  return os.tmpname() .. ".db"
end

local function open(path, opts)
  local logs = {}
  local o = {core = core, path = path, clock = function() return opts and opts.now or 1000 end,
    log = logmod.new(function(level, msg) logs[#logs + 1] = level .. " " .. msg end, "debug")}
  for k, v in pairs(opts or {}) do o[k] = v end
  local box = assert(store.open(o))
  return box, logs
end

local function rec(i, size)
  return {topic = "t", payload = size and string.rep("x", size) or ('{"seq":' .. i .. '}'), qos = 1, kind = "telemetry", points = 1}
end

describe("durable outbox", function()
  it("keeps order, hands out records once, and forgets only acknowledged ones", function()
    local box = open(tmpdb())
    for i = 1, 5 do box:push(rec(i)) end
    assert.equal(5, box:count())
    local a, b = box:pop(), box:pop()
    assert.equal('{"seq":1}', a.payload)
    assert.equal('{"seq":2}', b.payload)
    assert.equal(3, box:count())
    box:ack(a)
    box:unshift({b})
    assert.equal(4, box:count())
    assert.equal('{"seq":2}', box:pop().payload)
    box:commit()
  end)

  it("gives back what was not acknowledged after a restart, in order, counting possible duplicates", function()
    local path = tmpdb()
    local box = open(path)
    for i = 1, 4 do box:push(rec(i)) end
    local first = box:pop()
    box:ack(first)
    box:pop()            -- in flight when the agent "dies"
    box:commit()
    box.db:close()
    local again, logs = open(path)
    assert.equal(3, again:count())
    assert.equal(1, again.possible_duplicates)
    assert.matches("3 records kept from before the restart go out first %(1 were in flight", logs[1])
    local got = {}
    while again:peek() do got[#got + 1] = again:pop().payload end
    assert.same({'{"seq":2}', '{"seq":3}', '{"seq":4}'}, got)
  end)

  it("drops the oldest waiting records beyond the record bound", function()
    local box = open(tmpdb(), {limit = 3})
    local dropped = 0
    for i = 1, 5 do dropped = dropped + box:push(rec(i)) end
    assert.equal(2, dropped)
    assert.equal(3, box:count())
    assert.equal('{"seq":3}', box:pop().payload)
  end)

  it("drops the oldest waiting records beyond the byte bound", function()
    local box = open(tmpdb(), {max_bytes = 1000})
    for i = 1, 5 do box:push(rec(i, 300)) end
    assert.is_true(box.bytes <= 1000)
    assert.equal(3, box:count())
  end)

  it("expires records older than the age bound", function()
    local path = tmpdb()
    local box = open(path, {now = 1000})
    box:push(rec(1))
    box:commit()
    box.db:close()
    local later, logs = open(path, {now = 1000 + 8 * 86400000})
    assert.equal(0, later:count())
    assert.matches("older than", logs[#logs])
  end)

  it("refuses a state directory it cannot write, with a clear error", function()
    local ok, err = store.open{core = core, path = "/proc/tbagent-cannot/outbox.db", clock = function() return 0 end,
      log = logmod.new(function() end)}
    assert.is_nil(ok)
    assert.matches("cannot open outbox", err)
  end)

  it("creates its file private to the user", function()
    local path = tmpdb()
    open(path)
    local p = io.popen("stat -c %a " .. path)
    assert.equal("600", p:read("l"))
    p:close()
  end)

  -- counts the calls into the SQLite store, to see what crosses from Lua to disk
  local function counted(box)
    local real, calls = box.db, {}
    box.db = setmetatable({}, {__index = function(_, k)
      return function(_, ...)
        calls[k] = (calls[k] or 0) + 1
        return real[k](real, ...)
      end
    end})
    return calls
  end

  it("publishes the records in hand: nothing is read back while the pipe keeps up", function()
    local path = tmpdb()
    local box = open(path)
    local calls = counted(box)
    for i = 1, 300 do
      box:push(rec(i))
      box:commit()
      local r = box:pop()
      assert.equal('{"seq":' .. i .. '}', r.payload)
      box:ack(r)
    end
    assert.is_nil(calls.next)
    assert.equal(300, calls.push)
    assert.equal(0, box:count())
    box:close()
    assert.equal(0, open(path):count())   -- every acknowledged record left the disk
  end)

  it("deletes acknowledged records in runs of consecutive seqs", function()
    local path = tmpdb()
    local box = open(path)
    local calls = counted(box)
    for i = 1, 10 do box:push(rec(i)) end
    box:commit()
    local out = {}
    for i = 1, 10 do out[i] = box:pop() end
    for _, i in ipairs({1, 2, 3, 5, 6, 9, 10, 4}) do box:ack(out[i]) end   -- 7 and 8 in flight
    box:commit(true)
    assert.equal(2, calls.ack)          -- 1..6 and 9..10
    box.db:close()
    local again = open(path)
    assert.equal(2, again:count())
    assert.same({'{"seq":7}', '{"seq":8}'}, {again:pop().payload, again:pop().payload})
  end)

  it("keeps a backlog on disk beyond its window and reads it back in order", function()
    local box = open(tmpdb())
    local calls = counted(box)
    for i = 1, 700 do box:push(rec(i)) end
    box:commit()
    assert.is_true(#box.buffer - box.head + 1 <= 256)
    local first = {}
    for i = 1, 3 do first[i] = box:pop() end
    box:unshift(first)               -- the connection dropped with three in flight
    for i = 1, 700 do
      local r = box:pop()
      assert.equal('{"seq":' .. i .. '}', r.payload)
      box:ack(r)
    end
    assert.is_nil(box:peek())
    assert.is_true(calls.next >= 2)
  end)

  it("counts what was handed to the connection with one mark per commit", function()
    local path = tmpdb()
    local box = open(path)
    for i = 1, 6 do box:push(rec(i)) end
    box:commit()
    box:ack(box:pop())
    box:pop(); box:pop()          -- two in flight, unacknowledged
    box:push(rec(7))              -- the next handler run's records carry the mark to disk
    box:commit()
    box.db:close()                -- a crash: nothing more is written
    local again, logs = open(path)
    assert.equal(2, again.possible_duplicates)
    assert.matches("6 records kept from before the restart go out first %(2 were in flight", logs[1])
  end)

  it("gathers acknowledgements: on disk with the next records, after a second, or at close", function()
    local path, now = tmpdb(), 1000
    local box = open(path, {clock = function() return now end})
    local calls = counted(box)
    for i = 1, 3 do box:push(rec(i)) end
    box:commit()
    assert.equal(1, calls.commit)
    box:ack(box:pop())
    box:commit()                  -- the loop's commit: one ack alone waits
    assert.equal(1, calls.commit)
    assert.equal(1000, box:idle_commit_in())
    now = now + 1000
    assert.equal(0, box:idle_commit_in())
    box:commit()
    assert.equal(2, calls.commit)
    assert.is_nil(box:idle_commit_in())
    box:ack(box:pop())
    box:close()                   -- a clean stop writes every acknowledgement
    local again = open(path)
    assert.equal(1, again:count())
  end)
end)
