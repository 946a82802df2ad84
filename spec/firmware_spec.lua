-- The OTA policy through tb.testing: the real OTA state machine (tb.ota and its transfers) and checksums against
-- a fake server that serves chunks the way ThingsBoard does.
local testing = require "tb.testing"
local core = require "tb.core"

local script = require("spec.support.files").script

local POLICY = [[
  local tb = require "tb"
  tb.firmware{
    current = {title = "dev", version = "1.0"},
    chunk_size = %d,
    accept = function(info) return info.version ~= "bad" end,
    install = function(path, info)
      local f = assert(io.open(path, "rb"))
      tb.state.image = f:read("a")
      f:close()
      tb.state.installed = (tb.state.installed or 0) + 1
      if info.version == "explodes" then error("flash write failed") end
      if info.version == "refused" then return nil, "battery too low" end
      return true
    end,
  }
]]

local function image(n)
  local parts = {}
  for i = 1, n do parts[i] = string.char((i * 7 + i // 256) % 256) end
  return table.concat(parts)
end

local function load(chunk, opts)
  return testing.load(script(POLICY:format(chunk or 1024)), opts)
end

-- offered(n, info) -> r, s, img: a new agent (1000-byte chunks) offered info and an image of
-- n bytes (r as Session:offer_firmware gives it)
local function offered(n, info)
  local s = load(1000)
  local img = image(n)
  return s:offer_firmware(info, img), s, img
end

describe("firmware over MQTT", function()
  local FULL = {"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"}

  for _, alg in ipairs({"MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128"}) do
    it("verifies " .. alg .. " and installs", function()
      local r, s, img = offered(4321, {title = "dev", version = "2.0", checksum_algorithm = alg})
      assert.same(FULL, r.states)
      assert.equal(img, s:state().image)
    end)
  end

  it("accepts checksums with leading zero bytes, 0x, upper case and the other byte order", function()
    -- "62" has CRC32 0x0012d20a: ThingsBoard writes it little-endian as 0ad21200
    assert.equal("0ad21200", core.hash_hex("CRC32", "62"))
    for _, typed in ipairs({"0ad21200", "0AD21200", "0x0ad21200", "0x0012d20a", "12d20a"}) do
      local s = load(1)
      local r = s:offer_firmware({title = "dev", version = "2.0", checksum_algorithm = "CRC32", checksum = typed}, "62")
      assert.equal("UPDATED", r.state, typed)
    end
  end)

  it("handles sizes that are and are not a multiple of the chunk size, and the empty image", function()
    for _, n in ipairs({0, 1, 1023, 1024, 1025, 4096, 5000}) do
      local s = load(1024)
      local img = image(n)
      local r = s:offer_firmware({title = "dev", version = "v" .. n}, img)
      assert.equal("UPDATED", r.state, "size " .. n)
      assert.equal(img, s:state().image)
    end
  end)

  it("fails a corrupted image with both checksums in fw_error and does not install", function()
    local s = load(1000)
    local img = image(3000)
    local sum = core.hash_hex("SHA256", img)
    local corrupted = img:sub(1, 1500) .. "X" .. img:sub(1502)
    local r = s:offer_firmware({title = "dev", version = "2.0", checksum = sum}, corrupted)
    assert.equal("FAILED", r.state)
    assert.matches("checksum mismatch", r.error)
    assert.matches(sum, r.error, 1, true)
    assert.is_nil(s:state().installed)
  end)

  it("fails a wrong size clearly", function()
    local r = offered(3000, {title = "dev", version = "2.0", size = 2500,
      checksum = core.hash_hex("SHA256", image(3000))})
    assert.equal("FAILED", r.state)
    assert.matches("size mismatch: chunk 2 has 1000 bytes where fw_size 2500 leaves 500", r.error, 1, true)
  end)

  it("restarts under a new request id when a chunk comes back empty before the end", function()
    local r, s, img = offered(5500, {title = "dev", version = "2.0", expire_at_chunk = 3})
    assert.equal("UPDATED", r.state)
    assert.equal(img, s:state().image)
    assert.truthy(s:logged("chunk 3 has 0 bytes, expected 1000; restarting at byte 3000", "warn"))
    local reqs = {}
    for _, m in ipairs(s.published) do
      local req = m.topic:match("^v2/fw/request/(%d+)/chunk/")
      if req then reqs[req] = true end
    end
    local n = 0
    for _ in pairs(reqs) do n = n + 1 end
    assert.equal(2, n)
  end)

  it("fails with the server's NOT_FOUND", function()
    local s = load(1000)
    s:connect()
    s.packages.fw = nil
    s:push_attributes({fw_title = "dev", fw_version = "3.0", fw_size = 10, fw_checksum = "x",
      fw_checksum_algorithm = "SHA256"})
    s:advance(100)
    assert.truthy(s:logged("FAILED: server refused the download: NOT_FOUND"))
  end)

  it("reports install failures as FAILED with the reason", function()
    local s = load(1000):expect_error("flash write failed")
    local r = s:offer_firmware({title = "dev", version = "explodes"}, image(10))
    assert.equal("FAILED", r.state)
    assert.matches("install failed: .*flash write failed", r.error)
    r = s:offer_firmware({title = "dev", version = "refused"}, image(10))
    assert.equal("FAILED", r.state)
    assert.equal("install failed: battery too low", r.error)
  end)

  it("lets the script decline an update", function()
    local s = load(1000)
    local r = s:offer_firmware({title = "dev", version = "bad"}, image(10))
    assert.is_nil(r.state)
    assert.is_nil(s:state().installed)
  end)

  it("does nothing when the offered version is installed, and reports the new version after", function()
    local s = load(1000)
    local r = s:offer_firmware({title = "dev", version = "1.0"}, image(10))
    assert.is_nil(r.state)
    r = s:offer_firmware({title = "dev", version = "2.0"}, image(10))
    assert.equal("UPDATED", r.state)
    local last = s:sent("v1/devices/me/telemetry")
    assert.same({current_fw_title = "dev", current_fw_version = "2.0"}, last[#last].values)
    assert.is_true(last[#last].ts > last[#last - 1].ts)
  end)

  it("paces chunk requests to the message rate limits (5 a second here)", function()
    local s = testing.load(script(POLICY:format(100)), {config = {rate_limits = "5:1"}})
    local img = image(2000)   -- 20 chunks
    local r = s:offer_firmware({title = "dev", version = "2.0"}, img)
    assert.equal("UPDATED", r.state)
    local times = {}
    for _, m in ipairs(s.published) do
      if m.topic:match("^v2/fw/request/") then times[#times + 1] = m.at end
    end
    assert.equal(20, #times)
    -- any second holds at most the 5 of the bucket plus what refills in it
    for i = 1, #times do
      local n = 0
      for j = i, #times do if times[j] < times[i] + 1000 then n = n + 1 end end
      assert.is_true(n <= 10, string.format("%d chunk requests within 1 s from %d ms", n, times[i]))
    end
    assert.is_true(times[#times] - times[1] >= 2500, "20 requests in " .. (times[#times] - times[1]) .. " ms")
    assert.equal(img, s:state().image)
  end)

  it("resumes after a restart from the partial file in the state directory", function()
    local dir = os.tmpname() .. ".state"
    local img = image(10000)
    local s = load(1000, {state_dir = dir})
    s:connect()
    s.packages.fw = {bytes = img}
    -- the agent "dies" after 4 chunks: stop serving, then start a new session on the same dir
    local serve = s.serve_chunk
    local served = 0
    s.serve_chunk = function(self, ...)
      served = served + 1
      if served <= 4 then return serve(self, ...) end
    end
    s:push_attributes({fw_title = "dev", fw_version = "2.0", fw_size = #img, fw_checksum_algorithm = "SHA256",
      fw_checksum = core.hash_hex("SHA256", img)})
    s:advance(150)
    assert.equal(4000, core.file_size(dir .. "/firmware/dev-2.0.part"))
    -- the new session finds the package still assigned, as the server keeps it
    local s2 = load(1000, {state_dir = dir})
    s2.packages.fw = {bytes = img}
    s2:set_attributes{shared = s.server.shared}
    s2:connect()
    s2:advance(100)
    assert.equal(img, s2:state().image)
    assert.truthy(s2:logged("resuming download at byte 4000"))
    assert.truthy(s2:logged("firmware UPDATED"))
  end)
end)

describe("firmware: a stop during install()", function()
  local HANG = [[
    local tb = require "tb"
    tb.firmware{current = {title = "dev", version = %q}, chunk_size = 1000,
      install = function()
        tb.state.installs = (tb.state.installs or 0) + 1
        tb.sleep(3600000)   -- the installer reboots the device: install() never returns
        return true
      end}
  ]]
  local img = image(3000)
  local offer = {fw_title = "dev", fw_version = "2.0", fw_size = #img, fw_checksum_algorithm = "SHA256",
    fw_checksum = core.hash_hex("SHA256", img)}

  local function states(s)
    local out = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do
      local v = m.values or m
      if v.fw_state then out[#out + 1] = v.fw_state .. (v.fw_error and (": " .. v.fw_error) or "") end
    end
    return out
  end

  -- start(dir, current) -> a session on that state dir, connected, with the offer assigned
  local function start(dir, current)
    local s = testing.load(script(HANG:format(current)), {state_dir = dir})
    s.packages.fw = {bytes = img}
    s:set_attributes{shared = offer}
    s:connect()
    s:advance(500)
    return s
  end

  it("is UPDATED at the next start when the script now runs that version", function()
    local dir = os.tmpname() .. ".state"
    local s = start(dir, "1.0")
    assert.equal(1, s:state().installs)
    assert.same({"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING"}, states(s))
    local s2 = start(dir, "2.0")    -- the device came back up running 2.0
    assert.is_nil(s2:state().installs)
    assert.same({"UPDATED"}, states(s2))
    assert.truthy(s2:logged("firmware dev 2.0: the agent stopped during install%(%) and the script now runs it as current"))
    local sent = s2:sent("v1/devices/me/telemetry")
    local last = sent[#sent].values or sent[#sent]
    assert.same({"dev", "2.0"}, {last.current_fw_title, last.current_fw_version})
    assert.is_nil(io.open(dir .. "/firmware/dev-2.0.bin"))
    assert.is_nil(io.open(dir .. "/firmware/job.json"))
  end)

  it("is FAILED once otherwise, and that package is not installed again at every start", function()
    local dir = os.tmpname() .. ".state"
    start(dir, "1.0")
    local s2 = start(dir, "1.0")    -- back up, still on 1.0
    assert.is_nil(s2:state().installs)
    assert.same({"FAILED: install interrupted: the agent stopped while install() ran and dev 2.0 is not current (the script says dev 1.0)"}, states(s2))
    local s3 = start(dir, "1.0")
    assert.is_nil(s3:state().installs)
    assert.same({}, states(s3))
    -- another package is a fresh start
    local s4 = start(dir, "1.0")
    s4:push_attributes{fw_version = "3.0"}
    s4:advance(500)
    assert.equal(1, s4:state().installs)
  end)
end)

describe("firmware over HTTP and software", function()
  it("downloads fw_url packages", function()
    local r, s, img = offered(2000, {title = "dev", version = "2.0", url = "http://example.invalid/fw.bin"})
    assert.equal("UPDATED", r.state)
    assert.equal(img, s:state().image)
  end)

  it("hands accept() and install() every field of the offer", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.firmware{current = {title = "dev", version = "1.0"},
        accept = function(info) tb.state.accepted = info return true end,
        install = function(path, info) tb.state.installed = info return true end}
    ]]))
    local img = image(1500)
    local sum = core.hash_hex("SHA384", img)
    s:offer_firmware({title = "dev", version = "2.0", tag = "dev 2.0", checksum_algorithm = "SHA384"}, img)
    local want = {title = "dev", version = "2.0", size = 1500, checksum = sum, checksum_algorithm = "SHA384", tag = "dev 2.0"}
    assert.same(want, s:state().accepted)
    assert.same(want, s:state().installed)
    s:offer_firmware({title = "dev", version = "3.0", url = "http://example.invalid/fw3.bin", checksum_algorithm = "MD5",
      tag = "dev 3.0"}, img)
    want = {title = "dev", version = "3.0", size = 1500, checksum = core.hash_hex("MD5", img), checksum_algorithm = "MD5",
      url = "http://example.invalid/fw3.bin", tag = "dev 3.0"}
    assert.same(want, s:state().accepted)
    assert.same(want, s:state().installed)
  end)

  it("keeps the tag that arrives after the rest of the offer (ThingsBoard sends it apart)", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.firmware{current = {title = "dev", version = "1.0"}, chunk_size = 1000,
        install = function(path, info) tb.state.tag = info.tag return true end}
    ]]))
    s:connect()
    local img = image(3000)
    s.packages.fw = {bytes = img}
    local serve = s.serve_chunk
    s.serve_chunk = function() end   -- the server is slow: nothing comes yet
    s:push_attributes({fw_title = "dev", fw_version = "2.0", fw_size = #img, fw_checksum_algorithm = "SHA256",
      fw_checksum = core.hash_hex("SHA256", img), fw_tag = "old tag"})
    s:advance(100)
    s:push_attributes({fw_tag = "dev 2.0"})
    s.serve_chunk = serve
    s:advance(20000)
    assert.equal("dev 2.0", s:state().tag)
  end)

  it("takes ThingsBoard's two-message assignment as one offer (no start from the old fw_url)", function()
    local s = load(1000)
    local r = s:offer_firmware({title = "dev", version = "2.0", url = "http://example.invalid/old.bin"}, image(5000))
    assert.equal("UPDATED", r.state)
    -- the next package comes over MQTT: its keys first, then fw_url deleted in a second message
    r = s:offer_firmware({title = "dev", version = "3.0"}, image(3000))
    assert.same({"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"}, r.states)
    assert.equal(image(3000), s:state().image)
  end)

  it("runs a software policy beside the firmware one", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.firmware{current = {title = "fw", version = "1"}, install = function() tb.state.fw = true return true end}
      tb.software{current = {title = "app", version = "1"}, install = function(p)
        local f = io.open(p, "rb"); tb.state.sw = f:read("a"); f:close(); return true end}
    ]]))
    local r = s:offer_firmware({kind = "sw", title = "app", version = "2"}, "software bytes")
    assert.equal("UPDATED", r.state)
    assert.equal("software bytes", s:state().sw)
    assert.is_nil(s:state().fw)
    local found
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do
      if m.values.sw_state == "UPDATED" then found = true end
    end
    assert.is_true(found)
  end)
end)

describe("firmware and software together, server text and a changing offer", function()
  local BOTH = [[
    local tb = require "tb"
    local function keep(kind)
      return function(path, info)
        local f = assert(io.open(path, "rb")); local d = f:read("a"); f:close()
        tb.state[kind] = d
        tb.state[kind .. "_path"] = path
        if os.getenv("TB_SPEC_SLOW") and info.version == "slow" then tb.sleep(5000) end
        return true
      end
    end
    tb.firmware{current = {title = "fw", version = "1"}, chunk_size = 1000, install = keep("fw")}
    tb.software{current = {title = "app", version = "1"}, chunk_size = 1000, install = keep("sw")}
  ]]

  local function chunk_kinds(s)
    local kinds = {}
    for _, m in ipairs(s.published) do
      local kind = m.topic:match("^v2/(%a%a)/request/%d+/chunk/%d+$")
      if kind and kinds[#kinds] ~= kind then kinds[#kinds + 1] = kind end
    end
    return table.concat(kinds, ",")
  end

  local function attrs(kind, info, img)
    local p = kind .. "_"
    return {[p .. "title"] = info.title, [p .. "version"] = info.version, [p .. "size"] = info.size or #img,
      [p .. "checksum_algorithm"] = "SHA256", [p .. "checksum"] = core.hash_hex("SHA256", img)}
  end

  local function states_of(s, kind)
    local out, last = {}, nil
    for _, e in ipairs(s:sent("v1/devices/me/telemetry")) do
      local st = e.values[kind .. "_state"]
      if st then out[#out + 1] = st end
      if e.values[kind .. "_error"] then last = e.values[kind .. "_error"] end
    end
    return out, last
  end

  it("routes NOT_FOUND on v2/fw/error to a software download", function()
    local s = testing.load(script(BOTH))
    s:connect()
    s.packages.sw = nil
    s:push_attributes(attrs("sw", {title = "app", version = "2"}, image(3000)))
    s:advance(100)
    local states, err = states_of(s, "sw")
    assert.same({"DOWNLOADING", "FAILED"}, states)
    assert.equal("server refused the download: NOT_FOUND", err)
    assert.same({}, (states_of(s, "fw")))
  end)

  it("downloads firmware and software over MQTT one at a time", function()
    local s = testing.load(script(BOTH))
    s:connect()
    local fw, sw = image(5500), image(4200):reverse()
    s.packages.fw = {bytes = fw}
    s.packages.sw = {bytes = sw}
    -- the firmware's first chunks are held back, so the software offer comes mid-download
    local serve, held = s.serve_chunk, {}
    s.serve_chunk = function(self, ...)
      if held and select(2, ...) == "fw" then held[#held + 1] = table.pack(...) else serve(self, ...) end
    end
    s:push_attributes(attrs("fw", {title = "fw", version = "2"}, fw))
    s:push_attributes(attrs("sw", {title = "app", version = "2"}, sw))
    s:advance(100)
    assert.truthy(s:logged("software download waits for the firmware download to end"))
    assert.equal("fw", chunk_kinds(s))
    local replay = held
    held = nil
    for _, a in ipairs(replay) do serve(s, table.unpack(a, 1, a.n)) end
    s:pump()
    s:advance(1000)
    assert.equal("UPDATED", states_of(s, "fw")[5])
    assert.equal("UPDATED", states_of(s, "sw")[5])
    assert.equal(fw, s:state().fw)
    assert.equal(sw, s:state().sw)
    assert.equal("fw,sw", chunk_kinds(s))
  end)

  it("says the size is wrong when a fresh request id gets the same short chunk", function()
    local r = offered(3300, {title = "dev", version = "2.0", size = 5000})
    assert.equal("FAILED", r.state)
    assert.equal("size mismatch: the image ends at byte 3300 but fw_size is 5000", r.error)
  end)

  it("reports the server's error text printable and bounded", function()
    local s = load(1000)
    s:connect()
    s.packages.fw = {bytes = image(3000)}
    s.serve_chunk = function() end   -- the server answers with an error instead
    s:push_attributes(attrs("fw", {title = "dev", version = "2.0"}, image(3000)))
    s:advance(150)   -- the offer settles (tb.firmware waits for deletions after a push)
    s:queue("message", s.session.conn_id, 1, 0, "v2/fw/error", "NOT\255\254\n\27[31m" .. ("E"):rep(100 * 1024))
    s:pump()
    local states, err = states_of(s, "fw")
    assert.same({"DOWNLOADING", "FAILED"}, states)
    assert.truthy(utf8.len(err))
    assert.is_nil(err:find("[%c\128-\255]"))
    assert.truthy(#err < 400)
    assert.matches("^server refused the download: NOT\\xFF\\xFE\\x0A\\x1B%[31mEEE", err)
    for _, l in ipairs(s.logs) do assert.truthy(#l.message < 4096) end
  end)

  it("makes fw_* values from the server printable before they reach names, logs and telemetry", function()
    local r, s, img = offered(1500, {title = "../../etc/\nx", version = "..", checksum_algorithm = "SHA256"})
    assert.equal("UPDATED", r.state)
    assert.truthy(s:logged("firmware download 100%%"))
    for _, l in ipairs(s.logs) do assert.is_nil(l.message:find("\n"), l.message) end
    local last = s:sent("v1/devices/me/telemetry")
    assert.same({current_fw_title = "../../etc/\\x0Ax", current_fw_version = ".."}, last[#last].values)
    -- the next offer of the same package is recognised as installed
    r = s:offer_firmware({title = "../../etc/\nx", version = "..", checksum_algorithm = "SHA256"}, img)
    assert.is_nil(r.state)
    -- file names: no separator, no leading dot
    local ota = require "tb.ota"
    assert.equal("__.._etc_x", ota.sanitize("../../etc/x"))
    assert.equal("_", ota.sanitize(".."))
    assert.equal("_", ota.sanitize(""))
    assert.equal("_etc_passwd", ota.sanitize("/etc/passwd"))
  end)

  it("keeps the result of an install() that runs while the offer changes, then looks at the new offer", function()
    local s = testing.load(script(BOTH:gsub('os.getenv%("TB_SPEC_SLOW"%)', "true")))
    s:connect()
    local a, b = image(2500), image(1800):reverse()
    s.packages.fw = {bytes = a}
    s:push_attributes(attrs("fw", {title = "fw", version = "slow"}, a))
    s:advance(100)
    assert.same({"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING"}, (states_of(s, "fw")))
    s.packages.fw = {bytes = b}
    s:push_attributes(attrs("fw", {title = "fw", version = "3"}, b))
    s:advance(100)
    assert.same({"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING"}, (states_of(s, "fw")))
    s:advance(6000)
    assert.same({"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED",
      "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"}, (states_of(s, "fw")))
    assert.equal(b, s:state().fw)
    assert.equal("3", s.ctx.firmware:current().version)
  end)
end)

describe("firmware offers that change while the agent is away, retries and progress", function()
  local function offer_attrs(info, img)
    return {fw_title = info.title, fw_version = info.version, fw_size = #img, fw_url = info.url,
      fw_checksum_algorithm = "SHA256", fw_checksum = core.hash_hex("SHA256", img)}
  end

  local exists = require("spec.support.files").exists

  -- serves only the first n chunk requests: the download stops part-way
  local function serve_only(s, n)
    local serve, served = s.serve_chunk, 0
    s.serve_chunk = function(self, ...)
      served = served + 1
      if served <= n then return serve(self, ...) end
    end
  end

  -- stopped_download(n, dir) -> s, img: dev 2.0 (10 000 bytes in 1000-byte chunks) offered
  -- and downloaded only as far as n chunks, with its state in dir
  local function stopped_download(n, dir)
    local img = image(10000)
    local s = load(1000, {state_dir = dir})
    s:connect()
    s.packages.fw = {bytes = img}
    serve_only(s, n)
    s:push_attributes(offer_attrs({title = "dev", version = "2.0"}, img))
    s:advance(150)
    return s, img
  end

  -- stopped_state(n) -> a new state dir left by a download stopped after n chunks
  local function stopped_state(n)
    local dir = os.tmpname() .. ".state"
    stopped_download(n, dir)
    return dir
  end

  it("abandons a download whose package was unassigned while the agent was offline", function()
    local dir = os.tmpname() .. ".state"
    local s = stopped_download(3, dir)
    assert.equal(3000, core.file_size(dir .. "/firmware/dev-2.0.part"))
    s:disconnect()
    s.server.shared = {}          -- unassigned while the agent cannot hear the deletion
    s:advance(3000)               -- reconnects; the current attributes no longer offer it
    assert.is_true(s:connected())
    assert.truthy(s:logged("firmware dev 2.0 withdrawn or replaced"))
    assert.is_false(exists(dir .. "/firmware/dev-2.0.part"))
    assert.is_false(exists(dir .. "/firmware/job.json"))
    assert.is_nil(s.ctx.firmware.job)
  end)

  it("does not carry an attribute of the old offer into a package assigned while offline", function()
    local s = load(1000)
    s:connect()
    -- a fw_url package the script declines (version "bad"): its fw_url stays known
    local old = image(3000)
    s.http_files["http://example.invalid/old.bin"] = old
    s:push_attributes(offer_attrs({title = "dev", version = "bad", url = "http://example.invalid/old.bin"}, old))
    s:advance(150)
    s:disconnect()
    -- a binary package replaces it while the agent is offline: no fw_url any more
    local img = image(4500)
    s.packages.fw = {bytes = img}
    s.server.shared = offer_attrs({title = "dev", version = "2.0"}, img)
    local function last_state()   -- the declined offer reported none
      local states = {}
      for _, e in ipairs(s:sent("v1/devices/me/telemetry")) do states[#states + 1] = e.values.fw_state end
      return states[#states]
    end
    s:advance(3000)
    for _ = 1, 100 do
      if last_state() == "UPDATED" or last_state() == "FAILED" then break end
      s:advance(100)
    end
    assert.equal("UPDATED", last_state())
    assert.equal(img, s:state().image)
    local chunks = 0
    for _, m in ipairs(s.published) do
      if m.topic:match("^v2/fw/request/%d+/chunk/") then chunks = chunks + 1 end
    end
    assert.is_true(chunks >= 5, "downloaded over MQTT, not from the old fw_url")
  end)

  it("removes the partial download of an earlier package when another one is offered after a restart", function()
    local dir = stopped_state(4)
    assert.equal(4000, core.file_size(dir .. "/firmware/dev-2.0.part"))
    local s2 = load(1000, {state_dir = dir})
    local img3 = image(2500)
    s2.packages.fw = {bytes = img3}
    s2:set_attributes{shared = offer_attrs({title = "dev", version = "3.0"}, img3)}
    s2:connect()
    s2:advance(100)
    assert.equal(img3, s2:state().image)
    assert.is_false(exists(dir .. "/firmware/dev-2.0.part"))
    assert.truthy(s2:logged("removed the partial download of dev 2.0: no longer offered"))
  end)

  it("keeps the partial download while the current offer is not known yet (no connection)", function()
    local dir = stopped_state(4)
    assert.is_true(exists(dir .. "/firmware/dev-2.0.part"))
    -- restarted while the broker is unreachable, then the script is edited: a reload looks at
    -- the (still empty) offer before any current set came
    local s2 = load(1000, {state_dir = dir})
    assert.is_true(s2:reload(POLICY:format(1000) .. "\n-- edited\n"))
    s2:advance(1000)
    assert.is_true(exists(dir .. "/firmware/dev-2.0.part"))
    assert.is_true(exists(dir .. "/firmware/job.json"))
  end)

  it("removes the partial download left by a stopped agent when nothing is offered any more", function()
    local dir = stopped_state(4)
    assert.is_true(exists(dir .. "/firmware/job.json"))
    local s2 = load(1000, {state_dir = dir})
    s2:connect()
    s2:advance(100)
    assert.is_false(exists(dir .. "/firmware/dev-2.0.part"))
    assert.is_false(exists(dir .. "/firmware/job.json"))
    assert.truthy(s2:logged("removed the partial download of dev 2.0"))
  end)

  it("keeps an MQTT download going through more empty chunks than fw_restarts when each is followed by progress", function()
    local s = load(1000)
    local img = image(9500)
    s:connect()
    -- every chunk index comes back empty the first time it is asked for (a cache that
    -- expires again and again): 10 restarts in all, never two in a row at one offset
    local serve, seen = s.serve_chunk, {}
    s.serve_chunk = function(self, conn_id, kind, req, idx, payload)
      if not seen[idx] then
        seen[idx] = true
        self:queue("message", conn_id, 1, 0, "v2/fw/response/" .. req .. "/chunk/" .. idx, "")
        return
      end
      return serve(self, conn_id, kind, req, idx, payload)
    end
    local r = s:offer_firmware({title = "dev", version = "2.0"}, img)
    assert.equal("UPDATED", r.state)
    assert.equal(img, s:state().image)
  end)

  it("resumes an HTTP download through more interruptions than fw_retries while each one brings bytes", function()
    local s = load(1000)
    local img = image(8000)
    local attempts = 0
    s.core.http_download = function(o)
      attempts = attempts + 1
      local id = 1000 + attempts
      local have = core.file_size(o.path) or 0
      local sink = assert(core.sink_open(o.path, o.algorithm, have))
      local dl = {progress = function() return have, 0 end, cancel = function() end, release = function() end}
      if have + 1000 < #img then
        sink:write(img:sub(have + 1, have + 1000))
        sink:close()
        s:queue("http_done", id, 200, 18, "transfer closed with outstanding read data remaining", "curl")
      else
        sink:write(img:sub(have + 1))
        s:queue("http_done", id, 200, 0, nil, (sink:finish()))
      end
      return dl, id
    end
    local r = s:offer_firmware({title = "dev", version = "2.0", url = "http://example.invalid/fw.bin"}, img)
    assert.equal("UPDATED", r.state)
    assert.equal(img, s:state().image)
    assert.equal(8, attempts)
  end)

  it("still gives up on an HTTP download that brings nothing, after fw_retries attempts", function()
    local s = load(1000)
    local attempts = 0
    s.core.http_download = function()
      attempts = attempts + 1
      s:queue("http_done", attempts, 0, 7, "Failed to connect to example.invalid", "curl")
      return {progress = function() return 0, 0 end, cancel = function() end, release = function() end}, attempts
    end
    local r = s:offer_firmware({title = "dev", version = "2.0", url = "http://example.invalid/fw.bin"}, image(100))
    assert.equal("FAILED", r.state)
    assert.equal(5, attempts)
    assert.matches("download failed: Failed to connect", r.error)
  end)

  -- offered_by_url(failures) -> r, attempts, s: a new agent (1000-byte chunks) offered a
  -- fw_url package of 3000 bytes; core.http_download ends its first attempts as failures[i] =
  -- {status, curl_code, message, reason} say (as src/http.c reports them), then serves the
  -- image whole; attempts: how many downloads it started
  local function offered_by_url(failures)
    local s = load(1000)
    local img = image(3000)
    local attempts = 0
    s.core.http_download = function(o)
      attempts = attempts + 1
      local dl = {progress = function() return 0, 0 end, cancel = function() end, release = function() end}
      local f = failures[attempts]
      if f then
        s:queue("http_done", attempts, f[1], f[2], f[3], f[4])
      else
        local sink = assert(core.sink_open(o.path, o.algorithm, 0))
        sink:write(img)
        s:queue("http_done", attempts, 200, 0, nil, (sink:finish()))
      end
      return dl, attempts
    end
    local r = s:offer_firmware({title = "dev", version = "2.0", url = "http://example.invalid/fw.bin"}, img)
    return r, attempts, s
  end

  it("downloads again from byte 0, once and without counting it, when the server sends another range", function()
    local misranged = {206, 23, "the server sent a range starting at byte 0, not 1000", "range"}
    local cut = {200, 18, "transfer closed with outstanding read data remaining", "curl"}
    local r, attempts, s = offered_by_url({misranged, cut, cut, cut, cut})
    assert.equal("UPDATED", r.state)
    assert.equal(6, attempts)
    assert.truthy(s:logged("server refused the resume %(the server sent a range starting at byte 0, not 1000%); downloading again from byte 0"))
  end)

  it("gives up at once on a body larger than the announced size, by the reason code, not the message", function()
    -- a libcurl failure whose text happens to read like the size refusal is retried
    local r, attempts = offered_by_url({{200, 56, "received data larger than expected", "curl"},
      {200, 23, "download is larger than the announced size", "too_large"}})
    assert.equal("FAILED", r.state)
    assert.equal(2, attempts)
    assert.equal("download failed: download is larger than the announced size (HTTP 200)", r.error)
  end)

  it("fails at once on an HTTP status of 4xx, and retries a 5xx", function()
    local r, attempts = offered_by_url({{503, 0, "HTTP error status", "http"}, {404, 0, "HTTP error status", "http"}})
    assert.equal("FAILED", r.state)
    assert.equal(2, attempts)
    assert.equal("download failed: HTTP error status (HTTP 404)", r.error)
  end)

  it("calls progress(info, received, total) every 10 % and logs an error it raises", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.calls = {}
      tb.firmware{
        current = {title = "dev", version = "1.0"}, chunk_size = 1000,
        progress = function(info, received, total)
          tb.state.calls[#tb.state.calls + 1] = string.format("%s %d/%d", info.version, received, total)
          if received == 5000 then error("display broken") end
        end,
        install = function() return true end,
      }
    ]]))
    s:expect_error("display broken")
    local r = s:offer_firmware({title = "dev", version = "2.0"}, image(10000))
    assert.equal("UPDATED", r.state)
    assert.same({"2.0 1000/10000", "2.0 2000/10000", "2.0 3000/10000", "2.0 4000/10000", "2.0 5000/10000",
      "2.0 6000/10000", "2.0 7000/10000", "2.0 8000/10000", "2.0 9000/10000", "2.0 10000/10000"}, s:state().calls)
    assert.truthy(s:logged("firmware progress%(%) failed: .*display broken", "error"))
  end)

  it("refuses a progress that is not a function at load", function()
    assert.has_error(function()
      testing.load(script([[require("tb").firmware{install = function() return true end, progress = 5}]]))
    end)
  end)
end)
