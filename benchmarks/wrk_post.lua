-- wrk script for benchmarks/http_load.py: POSTs JSON bodies read from a file (one body per line), in turn.
--   wrk -s benchmarks/wrk_post.lua http://127.0.0.1:8000 -- /tmp/bodies.jsonl /recommend
local bodies = {}
local path = "/recommend"
local n = 0

function init(args)
  local file = assert(io.open(args[1], "r"), "cannot open the bodies file " .. tostring(args[1]))
  for line in file:lines() do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
  file:close()
  assert(#bodies > 0, "no bodies in " .. args[1])
  if args[2] then
    path = args[2]
  end
  n = math.random(#bodies)  -- threads start at different bodies
end

request = function()
  n = n % #bodies + 1
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, bodies[n])
end
