-- The RPC echo service of ThingsBoard's MQTT API document (mqtt-js-rpc-from-server.js):
-- every server-side RPC is answered with the request itself, {"method":..., "params":...},
-- whatever its method. A starting point for RPC-driven devices.
local tb = require "tb"

tb.on_rpc("*", function(params, request_id, method)
  tb.log.info("RPC %d %s", request_id, method)
  return {method = method, params = params}
end)
