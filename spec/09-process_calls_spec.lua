-- flame.call on the process backend: the same cases as the local backend
-- (spec/support/calls.lua), now across a real TCP link to real runner processes.
local shared = assert(loadfile("spec/support/calls.lua", "t", _ENV))()
shared("process", { link = { heartbeat_interval = 500 } })
