--- The process backend: each runner is a child process, `flame runner`, started
-- with FLAME_PARENT in its environment. It connects back to this process over TCP
-- on 127.0.0.1, proves it holds its secret, and runs calls on its own worker
-- threads. The worked example of docs/backends.md.
-- Options (backend_opts): command (default { flame_bin(), "runner" }), args (extra
-- arguments, e.g. { "--require", "app" }), env (more environment), cwd. The runner
-- gets this program's package.path, package.cpath and working directory as they are
-- when it boots (env's LUA_PATH/LUA_CPATH and cwd win over them).
-- @module flame.backends.process
local B = {}

--- A new runner: settings merged, a parent record made, FLAME_PARENT set.
function B.init(opts, flame)
  local state = flame.merge(flame.config("process"), opts)
  if state.command ~= nil and (type(state.command) ~= "table" or type(state.command[1]) ~= "string") then
    error("process backend: option 'command' must be a list like { \"/usr/bin/flame\", \"runner\" }", 0)
  end
  state.command = state.command or { flame.flame_bin(), "runner" }
  -- nil and why when the parent cannot make one (code_sync's pack over its limit)
  local parent, why = flame.parent_new { node_base = state.runner_id, host_env = "HOSTNAME" }
  if not parent then error(why, 0) end
  state.parent = parent
  -- a runner on this machine finds modules as this program does now: its
  -- package.path and package.cpath (a lib/ it added at run time included) and its
  -- working directory, unless the options say otherwise
  local paths, own = flame.code_paths(), state.env or {}
  -- Lua 5.4 reads LUA_PATH_5_4 before LUA_PATH: a LUA_PATH of the options must not
  -- lose to one this process inherited
  local env = { LUA_PATH_5_4 = own.LUA_PATH or paths.path,
                LUA_CPATH_5_4 = own.LUA_CPATH or paths.cpath }
  state.cwd = state.cwd or paths.cwd
  state.env = flame.merge(flame.merge(env, own),
                          { FLAME_PARENT = flame.parent_encode(state.parent) })
  return state
end

--- Starts the child and waits for its runner to connect and prove itself.
function B.remote_boot(state, flame)
  local args = {}
  for i = 2, #state.command do args[#args + 1] = state.command[i] end
  for _, a in ipairs(state.args or {}) do args[#args + 1] = a end
  local proc, err = flame.proc.spawn { path = state.command[1], args = args,
                                       env = state.env, cwd = state.cwd, group = true }
  if not proc then return nil, "cannot start the runner process: " .. err end
  state.proc = proc
  local term, why = flame.await_remote_up(state.parent, state.boot_timeout)
  if not term then
    proc:kill("SIGKILL", true)              -- a failed boot leaves nothing running
    return nil, why
  end
  state.terminator = term
  return term, state
end

--- On the runner: end the process.
function B.system_shutdown(flame)
  flame.exit(0)
end

--- The child exited: the runner is down, with the exit status as the reason.
function B.handle_info(msg, state, flame)
  if msg.event == "reap" then
    if state.proc then state.proc:kill("SIGKILL", true) end
    return state
  end
  if msg.event == "exit" then
    if state.proc then state.proc:kill("SIGKILL", true) end  -- what its work left behind
    if msg.signal ~= 0 then
      return nil, ("runner process %d was killed by signal %d"):format(state.proc:pid() or 0,
        msg.signal)
    end
    return nil, ("runner process exited with code %d"):format(msg.code)
  end
  return state
end

--- The pool is done with the runner (stopped, lost, or idle): make sure the
-- process is gone. A runner told to shut down exits by itself; a lost one may not.
function B.remote_shutdown(state, reason, flame)
  local proc = state.proc
  if proc and not proc:exited() then
    flame.send_after(state.shutdown_timeout == math.huge and 5000
                     or state.shutdown_timeout + 1000, { event = "reap" })
    state.reap = true
  end
end

return B
