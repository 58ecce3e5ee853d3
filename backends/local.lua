--- The local backend: runners inside this process. Each runner is a terminator
-- whose worker threads (up to max_concurrency) run calls in sandboxed Lua states,
-- so work gets the same copy semantics, sandbox and kill path as on a remote runner,
-- without a process or a link. The default backend; the first one to read.
-- @module flame.backends.local
local B = {}

--- A new runner: merge configured defaults with the pool's options.
function B.init(opts, flame)
  return flame.merge(flame.config("local"), opts)
end

--- Boots the runner: here, a terminator in this process, ready at once.
function B.remote_boot(state, flame)
  local term, err = flame.local_terminator(state)
  if not term then return nil, err end
  state.terminator = term
  return term, state
end

--- Nothing to stop: the runner lives in the application's own process.
function B.system_shutdown(flame)
end

return B
