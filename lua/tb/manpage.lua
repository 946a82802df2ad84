-- tb.manpage: the manual page tbagent(1) in roff, rendered from the tables of tb.cli that
-- `tbagent --help` is made of, so the two cannot disagree. The build runs
-- `tbagent --help-man` to make the page the package installs.
local M = {}

-- text(s) -> s safe in roff running text: backslashes and minus signs escaped, and a line
-- that would start with a control character ('.' or "'") guarded
local function text(s)
  s = tostring(s):gsub("\\", "\\e"):gsub("%-", "\\-")
  return (s:gsub("^([.'])", "\\&%1"):gsub("\n([.'])", "\n\\&%1"))
end
M.text = text

local function bold(s) return "\\fB" .. text(s) .. "\\fR" end
local function italic(s) return "\\fI" .. text(s) .. "\\fR" end

-- synopsis(s) -> a command's synopsis with its words in capitals (arguments) in italics
local function synopsis(s)
  return (text(s):gsub("%u[%u%.%w]*", function(w)
    if w:match("%l") and not w:match("^[%u%.]+lua$") then return w end
    return "\\fI" .. w .. "\\fR"
  end))
end

local function option_line(manual, o)
  local arg = manual.option_arg(o)
  return bold("--" .. o[1]) .. (arg ~= "" and (" " .. italic(arg)) or "")
end

-- render(manual) -> the page. manual: tb.cli.manual() plus version.
function M.render(manual)
  local out = {}
  local function add(...) for i = 1, select("#", ...) do out[#out + 1] = select(i, ...) end end
  add(string.format('.TH TBAGENT 1 "" "tbagent %s" "User Commands"', text(manual.version or "")))
  add(".nh", ".ad l")   -- option names stay whole (no hyphenation at a line end)
  add(".SH NAME", "tbagent \\- a ThingsBoard device agent whose behaviour is a Lua script")
  add(".SH SYNOPSIS", ".nf")
  for _, c in ipairs(manual.commands) do add(bold("tbagent") .. " " .. synopsis(c[1])) end
  add(".fi")
  add(".SH DESCRIPTION",
    text("tbagent connects a device to ThingsBoard over MQTT and runs a Lua 5.4 script that says what "
      .. "the device does: it sends telemetry and attributes, answers RPCs, follows shared attributes "
      .. "and installs firmware and software updates. Data accepted while offline waits in a durable "
      .. "outbox in the state directory. A change to the script is loaded without dropping the session."),
    ".PP",
    text("Scripts use the module tb (require \"tb\"); specs use tb.testing under Busted. The reference "
      .. "is README.md in /usr/share/doc/tbagent; examples are in /usr/share/doc/tbagent/examples."))
  add(".SH COMMANDS")
  for _, c in ipairs(manual.commands) do add(".TP", bold("tbagent") .. " " .. synopsis(c[1]), text(c[2]) .. ".") end
  add(".SH OPTIONS",
    text("Every option of run can also be given by its environment variable; the command line wins."))
  for _, o in ipairs(manual.options) do
    local def = o[4] ~= nil and o[4] ~= false and (" Default: " .. text(tostring(o[4])) .. ".") or ""
    add(".TP", option_line(manual, o), text(o[5]) .. ". Environment: " .. bold(o[2]) .. "." .. def)
  end
  add(".SS Options of status",
    text("With NAME, status reads the state of the systemd instance tbagent@NAME, "
      .. manual.service_state_root .. "/NAME; otherwise --state-dir, TB_STATE_DIR or ./.tbagent."))
  for _, o in ipairs(manual.status_options) do
    add(".TP", option_line(manual, o), text(o[5]) .. ".")
  end
  add(".SH SIGNALS")
  for _, sig in ipairs(manual.signals) do add(".TP", bold(sig[1]), text(sig[2]) .. ".") end
  add(".SH EXIT STATUS", text("run and check:"), ".RS")
  for _, c in ipairs(manual.exit_codes) do add(".TP", bold(c[1]), text(c[2]) .. ".") end
  add(".RE", ".PP", text("Every non-zero exit prints one line on stderr that says what was wrong. status:"), ".RS")
  for _, c in ipairs(manual.status_exit_codes) do add(".TP", bold(c[1]), text(c[2]) .. ".") end
  add(".RE")
  add(".SH ENVIRONMENT", text("The options' variables (above), and:"))
  for _, e in ipairs(manual.environment) do add(".TP", bold(e[1]), text(e[2]) .. ".") end
  add(".SH FILES")
  for _, f in ipairs(manual.files) do add(".TP", italic(f[1]), text(f[2]) .. ".") end
  add(".SH SEE ALSO", "\\fBbusted\\fR(1), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBsystemd.service\\fR(5)")
  return table.concat(out, "\n") .. "\n"
end

return M
