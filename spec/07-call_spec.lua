-- flame.call on the local backend: the shared cases of spec/support/calls.lua,
-- loaded with this file's environment so it sees busted's describe/it.
local shared = assert(loadfile("spec/support/calls.lua", "t", _ENV))()
shared("local")
