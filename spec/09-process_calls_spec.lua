-- flame.call on the process backend: the same cases as the local backend
-- (spec/support/calls.lua), now across a real TCP link to real runner processes.
-- Heartbeats every 500 ms; heartbeat_interval x heartbeat_misses is also the time the
-- parent has for each runner's handshake: under valgrind (the parent slowed down,
-- busy for seconds with a big value) the window is wider.
local H = require "spec.helper"
local shared = assert(loadfile("spec/support/calls.lua", "t", _ENV))()
shared("process", { link = { heartbeat_interval = 500, heartbeat_misses = H.slow and 20 or 3 } })
