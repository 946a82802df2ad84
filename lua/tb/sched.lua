-- tb.sched: the coroutine scheduler. Every handler runs in its own coroutine; yielding calls
-- park it under a key (a request id or a timer) and only the loop resumes it. Timers live in
-- a binary heap keyed on (due, seq); a cancelled timer is dropped lazily when it surfaces.
-- A handler that runs too long without yielding is cut off by an instruction-count hook.
local strict = require "tb.strict"

local M = {}

local co_create, co_resume, co_status, co_running = coroutine.create, coroutine.resume,
  coroutine.status, coroutine.running
local unpack = table.unpack
local gethook, sethook, getinfo = debug.gethook, debug.sethook, debug.getinfo
local guard_coroutines   -- below, with the runaway guard

local Timer = {}
Timer.__index = Timer

-- timer:cancel(): stops further runs; a run already in progress finishes.
function Timer:cancel()
  self.cancelled = true
end

function Timer:__tostring()
  return string.format("tb.timer (%s%d ms)", self.period and "every " or "after ", self.period or self.delay)
end

-- A timer a script holds (tb.every, tb.after) raises when the script reads a name it does not
-- have (t:cancle()); the scheduler's own fields that may be nil read as nil.
local TIMER_FIELDS = {due = true, seq = true, fn = true, period = true, delay = true, gen = true,
  name = true, cancelled = true, running = true, wake_key = true, system = true}
local ScriptTimer = {__tostring = Timer.__tostring, __name = "tb.timer"}
ScriptTimer.__index = function(_, k)
  local v = Timer[k]
  if v ~= nil or TIMER_FIELDS[k] then return v end
  error(strict.unknown("timer", k, {"cancel"}, ":"), 2)
end

-- strict_timer(t) -> t, as a script's timer (above)
function M.strict_timer(t)
  return setmetatable(t, ScriptTimer)
end

-- new{now=fn, log=logger, budget_ms=1000, budget_now=fn} -> scheduler
function M.new(opts)
  local self = setmetatable({}, {__index = M})
  self.now = opts.now
  -- the runaway guard needs real time even when the clock is virtual (tb.testing)
  self.budget_now = opts.budget_now or opts.now
  self.log = opts.log
  self.budget_ms = opts.budget_ms or 1000
  if self.budget_ms > 0 then guard_coroutines() end
  self.heap, self.seq = {}, 0
  self.waiting = {}      -- key -> coroutine
  self.handlers = {}     -- coroutine -> {name=, gen=}
  self.running_count = 0
  return self
end

local function heap_less(a, b)
  return a.due < b.due or (a.due == b.due and a.seq < b.seq)
end

local function heap_push(h, t)
  h[#h + 1] = t
  local i = #h
  while i > 1 do
    local p = i // 2
    if heap_less(h[i], h[p]) then h[i], h[p] = h[p], h[i]; i = p else break end
  end
end

local function heap_pop(h)
  local n = #h
  local top = h[1]
  h[1] = h[n]
  h[n] = nil
  n = n - 1
  local i = 1
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= n and heap_less(h[l], h[m]) then m = l end
    if r <= n and heap_less(h[r], h[m]) then m = r end
    if m == i then break end
    h[i], h[m] = h[m], h[i]
    i = m
  end
  return top
end

-- The runaway guard: the hook is per coroutine, the deadline is reset at each resume.
-- Past the deadline the hook raises at every instruction of the script, not only every 20000:
-- a handler that catches the error (pcall in a loop) dies at its first instruction outside the
-- pcall. It never raises inside the agent's own Lua code (the tb modules, whose state a raise
-- could leave half updated, and the wrapper that reports the error): the script's next
-- instruction does. Coroutines a script makes itself get guest_hook, which applies the budget
-- of the handler that resumes them (active_hook), or at load the loader's hook on the main
-- thread; without it a loop inside coroutine.wrap(...)() would run forever (a debug.sethook
-- hook is per thread).
local exempt = setmetatable({}, {__mode = "k"})
local active_hook   -- the budget hook of the handler running now, nil outside handlers
local main_thread = debug.getregistry()[1]
-- "@lua/tb/" when embedded, "@/usr/.../tb/" when installed
local AGENT_SRC = (getinfo(1, "S").source or ""):match("^(@.*/)[^/]*$")

local function agent_code(level)
  local f = getinfo(level + 1, "fS")
  if not f then return false end
  if exempt[f.func] then return true end
  return AGENT_SRC ~= nil and f.source:sub(1, #AGENT_SRC) == AGENT_SRC
end

local function guest_hook()
  local h = active_hook
  if not h and type(main_thread) == "thread" then
    h = gethook(main_thread)
    if type(h) ~= "function" then h = nil end
  end
  if h then return h() end
end

local function set_budget(self, co)
  if self.budget_ms <= 0 then return end
  local now = self.budget_now
  self.deadline = now() + self.budget_ms
  local hook, escalated
  hook = function()
    if now() <= self.deadline then return end
    if not escalated then
      escalated = true
      sethook(co, hook, "", 1)
    end
    local cur = co_running()
    if cur ~= co then sethook(cur, guest_hook, "", 1) end
    if agent_code(2) then return end
    error(string.format("handler ran %d ms without yielding (budget %d ms): cut off",
      now() - self.deadline + self.budget_ms, self.budget_ms), 2)
  end
  active_hook = hook
  sethook(co, hook, "", 20000)
end

-- The guard reaches coroutines a script makes (coroutine.create and coroutine.wrap are
-- replaced once, keeping their behaviour; the scheduler keeps the originals).
local guarded = false
function guard_coroutines()
  if guarded then return end
  guarded = true
  local create, wrap = coroutine.create, coroutine.wrap
  local function check(f, name)
    if type(f) ~= "function" then
      error(string.format("bad argument #1 to '%s' (function expected, got %s)", name,
        f == nil and "no value" or type(f)), 3)
    end
  end
  coroutine.create = function(f)  -- luacheck: ignore 122 (deliberately replaced, see above)
    check(f, "create")
    local co = create(f)
    sethook(co, guest_hook, "", 20000)
    return co
  end
  coroutine.wrap = function(f)  -- luacheck: ignore 122
    check(f, "wrap")
    return wrap(function(...)
      sethook(guest_hook, "", 20000)
      return f(...)
    end)
  end
end

-- For an error object that is not a string, where it was raised (report logs it).
local object_traceback
-- Whether the script raised the last error itself, with error() or assert() called from its
-- own code: an RPC handler's way of answering with an error. A runtime error (indexing nil,
-- a misspelt tb name, bad arguments to a library function, the budget cut-off) is not.
local raised_by_script = false

local function traceback(err)
  local f = getinfo(2, "f")
  raised_by_script = f ~= nil and (f.func == error or f.func == assert) and not agent_code(3)
  if type(err) ~= "string" then
    object_traceback = debug.traceback("", 2)
    return err
  end
  return debug.traceback(err, 2)
end
exempt[traceback] = true

-- Reports a handler's failure once, with file:line and a traceback. An error object's
-- __tostring may itself fail. self.on_failure(info, message, raised_by_script), when set,
-- sees every failure (tb.testing fails the spec with it).
local function report(self, info, err, by_script)
  local msg = err
  if type(err) ~= "string" then
    local ok, text = pcall(tostring, err)
    msg = "error object: " .. (ok and type(text) == "string" and text or ("(tostring failed: " .. tostring(text) .. ")"))
      .. (object_traceback or "")
  end
  object_traceback = nil
  self.log.error("%s failed: %s", info.name, msg)
  if self.on_failure then self.on_failure(info, msg, by_script or false) end
  if info.on_error then info.on_error(err) end
end

function M:resume(co, ...)
  local info = self.handlers[co]
  local saved_hook, saved_deadline = active_hook, self.deadline
  set_budget(self, co)
  local ok, err = co_resume(co, ...)
  -- a handler resumed from another handler returns to the outer one's budget
  active_hook, self.deadline = saved_hook, saved_deadline or self.deadline
  if not ok then
    -- errors escaping the xpcall wrapper (the hook firing in the wrapper itself)
    report(self, info or {name = "handler"}, err)
  end
  if co_status(co) == "dead" and info then
    self.handlers[co] = nil
    self.running_count = self.running_count - 1
  end
  -- what the handler sent goes to disk and out now (tb.session), before anything else runs
  if self.after_resume then self.after_resume() end
end

-- spawn(name, fn, ...) -> coroutine: runs fn(...) as a handler now, until it yields or ends.
-- opts (optional, as fn = {fn=, gen=, on_error=, on_done=, answers_errors=}) lets callers see
-- errors/results; answers_errors: an error the script raises itself is the handler's answer
-- (an RPC's {"error": ...}), not a failure of the script.
-- finish(self, info, on_done, ok, ...): the end of a handler, with what xpcall returned
local function finish(self, info, on_done, ok, ...)
  sethook()   -- the handler is over: the budget no longer applies (see set_budget)
  -- before its result goes anywhere (an RPC answer): what it wrote to tb.persist is on disk
  if self.on_handler_end then self.on_handler_end() end
  if ok then
    if on_done then on_done(...) end
  else
    report(self, info, (...), raised_by_script)
  end
end

function M:spawn(name, fn, ...)
  local spec = type(fn) == "table" and fn or {fn = fn}
  local info = {name = name, gen = spec.gen, on_error = spec.on_error, answers_errors = spec.answers_errors}
  local on_done, handler = spec.on_done, spec.fn
  local function body(...)
    return finish(self, info, on_done, xpcall(handler, traceback, ...))
  end
  if not AGENT_SRC then exempt[body] = true end   -- (sched.lua is agent code by its source otherwise)
  local co = co_create(body)
  self.handlers[co] = info
  self.running_count = self.running_count + 1
  self:resume(co, ...)
  return co
end

-- call(name, fn, ...) -> true, results... | false, err: the one way agent code calls user code
-- that is not a handler of its own (a firmware policy's accept, install and progress, which run
-- inside the update's handler). An error is reported as a handler's is (file:line, traceback)
-- and returned, so the caller decides what it means (err: the message's first line).
function M:call(name, fn, ...)
  local res = table.pack(xpcall(fn, traceback, ...))
  if res[1] then return unpack(res, 1, res.n) end
  report(self, {name = name}, res[2], raised_by_script)
  local first = type(res[2]) == "string" and res[2]:match("^[^\n]*") or tostring(res[2])
  return false, first
end

-- current() -> info of the running handler, or nil outside handlers (top level, loop).
function M:current()
  local co, main = co_running()
  if main then return nil end
  return self.handlers[co], co
end

-- Checks that a yielding call comes from a handler; raises Lua-style otherwise.
function M:check_yieldable(fname)
  local info = self:current()
  if not info then
    error(string.format("%s yields and cannot be called at a script's top level; call it from a handler (e.g. tb.after(0, fn))", fname), 3)
  end
end

-- timer(delay_ms, fn, period_ms, gen, name) -> timer; fn runs as a handler each time.
function M:timer(delay, fn, period, gen, name)
  self.seq = self.seq + 1
  local t = setmetatable({due = self.now() + delay, seq = self.seq, fn = fn, period = period,
    delay = delay, gen = gen, name = name or "timer"}, Timer)
  heap_push(self.heap, t)
  return t
end

-- wait(key, timeout_ms) -> ...: parks the running handler until wake(key, ...) or the timeout
-- (then returns nil, "timeout").
-- system_timer(delay, fn, name) -> timer: fn runs once on the loop's own stack, not in a
-- handler coroutine, so it may do what only the loop may (load a script version: a yielding
-- call at its top level must raise there, as it does at start).
function M:system_timer(delay, fn, name)
  local t = self:timer(delay, fn, nil, nil, name)
  t.system = true
  return t
end

function M:wait(key, timeout)
  local _, co = self:current()
  assert(co, "wait outside a handler")
  self.waiting[key] = co
  local t
  if timeout then
    t = self:timer(timeout, nil, nil, nil, "timeout")
    t.wake_key = key
  end
  local res = table.pack(coroutine.yield())
  if t then t.cancelled = true end
  return unpack(res, 1, res.n)
end

-- wake(key, ...) -> true if a handler was waiting on key.
function M:wake(key, ...)
  local co = self.waiting[key]
  if not co then return false end
  self.waiting[key] = nil
  self:resume(co, ...)
  return true
end

-- wake_all(prefix, ...) wakes every waiter whose string key starts with prefix.
function M:wake_all(prefix, ...)
  local keys = {}
  for k in pairs(self.waiting) do
    if type(k) == "string" and k:sub(1, #prefix) == prefix then keys[#keys + 1] = k end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do self:wake(k, ...) end
end

function M:sleep(ms)
  local key = {}
  self:wait(key, ms)
end

-- next_due() -> ms until the next live timer (nil when none).
function M:next_due()
  local h = self.heap
  while h[1] and h[1].cancelled do heap_pop(h) end
  if not h[1] then return nil end
  local d = h[1].due - self.now()
  return d > 0 and d or 0
end

-- run_due(): runs every timer whose time has come (each in its own handler).
function M:run_due()
  local h, now = self.heap, self.now()
  local batch = 0
  while h[1] and h[1].due <= now and batch < 10000 do
    local t = heap_pop(h)
    batch = batch + 1
    if not t.cancelled then
      if t.wake_key then
        local key = t.wake_key
        self:wake(key, nil, "timeout")
      elseif t.system then
        local ok, err = xpcall(t.fn, debug.traceback)
        if not ok then self.log.error("%s failed: %s", t.name, err) end
      else
        if t.period then
          -- catch up without bursts: the next run is a period after this one, never in the past
          t.due = math.max(t.due + t.period, now)
          self.seq = self.seq + 1
          t.seq = self.seq
          heap_push(h, t)
        end
        if t.running and t.period then
          self.log.debug("%s still running; skipping this period", t.name)
        else
          t.running = true
          self:spawn(t.name, {fn = t.fn, gen = t.gen, on_done = function() t.running = false end,
            on_error = function() t.running = false end}, t)
        end
      end
    end
  end
end

-- cancel_gen(gen): cancels every timer a generation created (hot reload retires them).
function M:cancel_gen(gen)
  for _, t in ipairs(self.heap) do
    if t.gen == gen then t.cancelled = true end
  end
end

return M
