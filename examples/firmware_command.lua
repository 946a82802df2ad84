-- A firmware policy that installs by running a command, the way most Linux gateways do:
-- the verified image is handed to an installer (here FIRMWARE_INSTALLER, e.g. a script that
-- calls swupdate or rauc); its exit status decides UPDATED or FAILED, and its last output
-- line becomes fw_error. tb.exec waits without blocking the agent.
local tb = require "tb"

local installer = os.getenv("FIRMWARE_INSTALLER") or "/usr/local/sbin/install-firmware"
local line = os.getenv("FIRMWARE_TITLE") or "gateway"

tb.firmware{
  current = {title = line, version = os.getenv("FIRMWARE_VERSION") or "1.0.0"},
  chunk_size = 32768,
  -- stay on this device's firmware line; a refusal is reported to ThingsBoard as FAILED,
  -- fw_error "declined: <why>"
  accept = function(info)
    if info.title ~= line then return false, "this device runs the " .. line .. " line, not " .. info.title end
    return true
  end,
  install = function(path, info)
    tb.log.info("running %s for %s %s", installer, info.title, info.version)
    local out, err = tb.exec({installer, path, info.version}, {timeout = 10 * 60 * 1000})
    if not out then return nil, err end
    return true
  end,
}
