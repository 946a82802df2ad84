-- tb.lint: the static half of `tbagent check`. It reads the script's source and the modules
-- it requires from its folder, without running them, and reports every tb.<name> (and
-- tb.log.<name>, tb.json.<name>, tb.persist.<name>) that the tb API does not have, with
-- file:line: a misspelt name in a handler that would only run at 3 a.m. is found now.
-- The source is split into tokens by a small Lua lexer (strings, long strings and comments
-- are skipped as wholes), so "tb.x" inside a string or a comment is not a use.
-- It also writes the luacheck standard of the tb API for `tbagent init`.
local strict = require "tb.strict"
local read = require("tb.loader").read_file

local M = {}

local KEYWORDS = {}
for w in ([[and break do else elseif end false for function goto if in local nil not or
  repeat return then true until while]]):gmatch("%a+") do KEYWORDS[w] = true end

local OPS3 = {["..."] = true}
local OPS2 = {[".."] = true, ["=="] = true, ["~="] = true, ["<="] = true, [">="] = true,
  ["//"] = true, ["::"] = true, ["<<"] = true, [">>"] = true}

-- tokens(text) -> list of {kind = "name"|"keyword"|"string"|"number"|"op", value=, line=}
-- (a malformed source yields what could be read: check reports the syntax error itself)
function M.tokens(text)
  local out, i, line, n = {}, 1, 1, #text
  local function add(kind, value) out[#out + 1] = {kind = kind, value = value, line = line} end
  local function count_lines(s) local _, k = s:gsub("\n", "") line = line + k end
  -- long_bracket(at) -> the text between [==[ and ]==] starting at `at`, and the index after
  local function long_bracket(at)
    local eq = text:match("^%[(=*)%[", at)
    if not eq then return nil end
    local open_end = at + #eq + 2
    local close = "]" .. eq .. "]"
    local stop = text:find(close, open_end, true)
    if not stop then return text:sub(open_end), n + 1 end
    return text:sub(open_end, stop - 1), stop + #close
  end
  if text:sub(1, 1) == "#" then i = (text:find("\n", 1, true) or n + 1) end  -- #! line
  while i <= n do
    local c = text:sub(i, i)
    if c == "\n" then
      line, i = line + 1, i + 1
    elseif c:match("%s") then
      i = i + 1
    elseif text:sub(i, i + 1) == "--" then
      local body, after = long_bracket(i + 2)
      if body then
        count_lines(body)
        i = after
      else
        i = text:find("\n", i, true) or n + 1
      end
    elseif c:match("[%a_]") then
      local word = text:match("^[%w_]+", i)
      add(KEYWORDS[word] and "keyword" or "name", word)
      i = i + #word
    elseif c:match("%d") or (c == "." and text:sub(i + 1, i + 1):match("%d")) then
      local num = text:match("^0[xX][%x%.]*[pP][%+%-]?%d+", i) or text:match("^0[xX][%x%.]*", i)
        or text:match("^[%d%.]+[eE][%+%-]?%d+", i) or text:match("^[%d%.]+", i)
      add("number", num)
      i = i + #num
    elseif c == "\"" or c == "'" then
      local j, buf = i + 1, {}
      local start_line = line
      while j <= n do
        local d = text:sub(j, j)
        if d == c then break end
        if d == "\n" then break end   -- unfinished string: stop at the line's end
        if d == "\\" then
          local e = text:sub(j + 1, j + 1)
          if e == "\n" then line = line + 1 end
          if e == "z" then
            local ws = text:match("^%s*", j + 2)
            count_lines(ws)
            j = j + 2 + #ws
          else
            buf[#buf + 1] = e == "n" and "\n" or e == "t" and "\t" or e
            j = j + 2
          end
        else
          buf[#buf + 1] = d
          j = j + 1
        end
      end
      out[#out + 1] = {kind = "string", value = table.concat(buf), line = start_line}
      i = j + 1
    elseif c == "[" and text:match("^%[=*%[", i) then
      local start_line = line
      local body, after = long_bracket(i)
      body = body:gsub("^\r?\n", "")
      count_lines(text:sub(i, after - 1))
      out[#out + 1] = {kind = "string", value = body, line = start_line}
      i = after
    else
      local three, two = text:sub(i, i + 2), text:sub(i, i + 1)
      local op = OPS3[three] and three or OPS2[two] and two or c
      add("op", op)
      i = i + #op
    end
  end
  return out
end

-- shape() -> {name = true | {sub names...}}: the names of the tb API, taken from a real tb
-- table (bound to an offline context), so it cannot drift from what scripts get. A list marks
-- a strict sub-table (tb.log, tb.json, tb.persist); tb.state holds anything.
local cached_shape
function M.shape()
  if cached_shape then return cached_shape end
  local api = require "tb"
  local core = require "tb.core"
  local persist = require "tb.persist"
  local log = require("tb.log").new(function() end)
  local store = persist.new{backend = persist.memory_backend(), encode = core.json_encode,
    decode = core.json_decode, null = core.json_null}
  local tbapi = api.bind({core = core, log = log, state = {}, session = {}, sched = {}, persist = store},
    api.new_generation(0))
  local shape = {}
  for _, name in ipairs(strict.names(tbapi)) do
    local v = rawget(tbapi, name)
    local mt = type(v) == "table" and getmetatable(v)
    if mt and mt.__name == "tb." .. name then shape[name] = strict.names(v) else shape[name] = true end
  end
  cached_shape = shape
  return shape
end

local function is_op(tok, value) return tok and tok.kind == "op" and tok.value == value end

-- require_at(toks, i) -> the module name when toks[i] is `require "name"` / `require("name")`
local function require_at(toks, i)
  local t = toks[i]
  if not (t and t.kind == "name" and t.value == "require") then return nil end
  local nxt = toks[i + 1]
  if nxt and nxt.kind == "string" then return nxt.value end
  if is_op(nxt, "(") and toks[i + 2] and toks[i + 2].kind == "string" and is_op(toks[i + 3], ")") then
    return toks[i + 2].value
  end
  return nil
end

-- scan(path, text [, shape]) -> problems ({"file:line: unknown tb.x; did you mean tb.y?"...}),
-- requires (module names, in order). Names are `tb` (the global) and every local bound to
-- require "tb"; `local log = tb.log` makes log a name for tb.log. A field the script assigns
-- itself (tb.helper = ..., function tb.helper() ... end) is not reported.
function M.scan(path, text, shape)
  shape = shape or M.shape()
  local toks = M.tokens(text)
  local names = {tb = "tb"}       -- local name -> what it stands for ("tb", "tb.log", ...)
  local requires, defined, uses = {}, {}, {}
  for i, t in ipairs(toks) do
    local mod = require_at(toks, i)
    if mod and mod ~= "tb" and not mod:find("^tb%.") then requires[#requires + 1] = mod end
    -- local NAME [<attrib>] = require "tb" | tb.log | other
    if t.kind == "keyword" and t.value == "local" and toks[i + 1] and toks[i + 1].kind == "name" then
      local name, j = toks[i + 1].value, i + 2
      if is_op(toks[j], "<") then j = j + 3 end
      if is_op(toks[j], "=") then
        local rhs = toks[j + 1]
        local base = rhs and rhs.kind == "name" and names[rhs.value]
        if require_at(toks, j + 1) == "tb" then
          names[name] = "tb"
        elseif base and not is_op(toks[j + 2], ".") and not is_op(toks[j + 2], ":") then
          names[name] = base    -- local t = tb
        elseif base == "tb" and is_op(toks[j + 2], ".") and toks[j + 3] and type(shape[toks[j + 3].value]) == "table"
          and not is_op(toks[j + 4], ".") and not is_op(toks[j + 4], ":") and not is_op(toks[j + 4], "(") then
          names[name] = "tb." .. toks[j + 3].value   -- local log = tb.log
        else
          names[name] = nil     -- shadowed by something else
        end
      end
    elseif t.kind == "name" and names[t.value] and not is_op(toks[i - 1], ".") and not is_op(toks[i - 1], ":")
      and (is_op(toks[i + 1], ".") or is_op(toks[i + 1], ":")) and toks[i + 2] and toks[i + 2].kind == "name" then
      local label, field = names[t.value], toks[i + 2]
      local assigned = is_op(toks[i + 3], "=") or (toks[i - 1] and toks[i - 1].kind == "keyword" and toks[i - 1].value == "function")
      if label == "tb" and assigned then
        defined[field.value] = true
      else
        uses[#uses + 1] = {label = label, field = field, i = i + 2}
      end
    end
  end
  local problems = {}
  local top = strict.names(shape)
  for _, u in ipairs(uses) do
    local label, name, line = u.label, u.field.value, u.field.line
    if label == "tb" then
      local sub = shape[name]
      if sub == nil and not defined[name] then
        problems[#problems + 1] = string.format("%s:%d: %s", path, line, strict.unknown("tb", name, top))
      elseif type(sub) == "table" and (is_op(toks[u.i + 1], ".") or is_op(toks[u.i + 1], ":"))
        and toks[u.i + 2] and toks[u.i + 2].kind == "name" then
        local member = toks[u.i + 2]
        local known = false
        for _, m in ipairs(sub) do if m == member.value then known = true break end end
        if not known then
          problems[#problems + 1] = string.format("%s:%d: %s", path, member.line,
            strict.unknown("tb." .. name, member.value, sub))
        end
      end
    else
      local sub = shape[label:match("^tb%.(.*)$")]
      local known = false
      for _, m in ipairs(sub) do if m == name then known = true break end end
      if not known then
        problems[#problems + 1] = string.format("%s:%d: %s", path, line, strict.unknown(label, name, sub))
      end
    end
  end
  return problems, requires
end

-- check(path [, text]) -> problems: scan() of the script and of every module it requires
-- from its folder (as the loader finds them: require "lib.util" is <dir>/lib/util.lua), each
-- file once
function M.check(path, text)
  local dir = path:match("^(.*)/[^/]*$") or "."
  local shape = M.shape()
  local problems, seen = {}, {}
  local function visit(file, src)
    if seen[file] then return end
    seen[file] = true
    src = src or read(file)
    if not src then return end
    local found, requires = M.scan(file, src, shape)
    for _, p in ipairs(found) do problems[#problems + 1] = p end
    for _, mod in ipairs(requires) do visit(dir .. "/" .. mod:gsub("%.", "/") .. ".lua") end
  end
  visit(path, text)
  return problems
end

-- luacheck_std() -> Lua source of a luacheck standard "tb": the global tb with every field
-- of the API (tb.state takes any field)
function M.luacheck_std()
  local shape = M.shape()
  local lines = {"stds.tb = {", "  read_globals = {", "    tb = {", "      fields = {"}
  for _, name in ipairs(strict.names(shape)) do
    local sub = shape[name]
    if name == "state" then
      lines[#lines + 1] = "        state = {other_fields = true, read_only = false},"
    elseif type(sub) == "table" then
      local members = {}
      for _, m in ipairs(sub) do members[#members + 1] = m .. " = {}" end
      lines[#lines + 1] = string.format("        %s = {fields = {%s}},", name, table.concat(members, ", "))
    else
      lines[#lines + 1] = string.format("        %s = {},", name)
    end
  end
  lines[#lines + 1] = "      },"
  lines[#lines + 1] = "    },"
  lines[#lines + 1] = "  },"
  lines[#lines + 1] = "}"
  return table.concat(lines, "\n") .. "\n"
end

return M
