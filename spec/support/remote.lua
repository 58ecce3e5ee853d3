-- spec/support/remote.lua - what the specs of remote runners share: a flame error
-- expected, a link connection played by hand, and the process backend with parts
-- of the test's own. (Apart from spec/helper.lua: code_sync's specs ship every
-- module loaded, the helper included, within a budget.)
local H = require "spec.helper"

local M = {}

--- Calls f(...) and expects it to raise a flame error of kind; returns the error.
function M.fails(kind, f, ...)
  local errors = require "flame.errors"
  local ok, err = pcall(f, ...)
  assert(not ok, "expected a " .. kind .. " error, it succeeded")
  assert(errors.is(err), "not a flame error: " .. tostring(err))
  assert(err.kind == kind, ("expected a %s error, got: %s"):format(kind, tostring(err)))
  return err
end

--- A link connection to "host:port" as a stranger or a hand-played runner makes
-- it: the connection, a future set with the reason it closed, and the messages it
-- got ({ type, id, payload } each, in order).
function M.connect(addr)
  local core = require "flame.core"
  local task = require "flame.task"
  local host, port = addr:match("^(.+):(%d+)$")
  local f = task.future()
  core.connect { host = host, port = tonumber(port), on_connect = function(c, e) f:set(c, e) end }
  local c, err = f:wait()
  assert(c, err)
  local closed = task.future()
  local got = {}
  c:start(function(t, id, payload) got[#got + 1] = { t, id, payload } end,
    function(reason) closed:set(reason) end)
  return c, closed, got
end

--- The process backend with callbacks of the test's own in place of its init,
-- remote_boot, handle_info or remote_shutdown; the others are the process
-- backend's (required in the backend state, where the table is copied).
function M.process_backend(own)
  local b = {}
  for _, name in ipairs { "init", "remote_boot", "handle_info", "remote_shutdown" } do
    b[name] = own[name] or function(...) return require("flame.backends.process")[name](...) end
  end
  return b
end

--- The process backend whose runners get their FLAME_PARENT with edit's fields in
-- place of the pool's (a runner of another mind than its pool).
function M.edited_parent(edit)
  return M.process_backend { init = function(opts, env)
    local state = require("flame.backends.process").init(opts, env)
    state.env.FLAME_PARENT = env.parent_encode(env.merge(state.parent, edit))
    return state
  end }
end

--- spec/support/uv_fail.c built into dir: the environment to give a command so that
-- libuv refuses uv_poll_start, uv_timer_start or uv_check_start while the file
-- dir/fail_poll, fail_timer or fail_check exists ("SHIM_DIR=... LD_PRELOAD=...",
-- after the sanitized run's libasan); nil and why where there is no compiler.
function M.uv_fail_shim(dir)
  if H.run("command -v gcc") ~= 0 then return nil, "no C compiler (gcc) here" end
  local so = dir .. "/uv_fail.so"
  local rc, out = H.run("env -u LD_PRELOAD gcc -std=gnu11 -Wall -Wextra -Werror -shared -fPIC -o "
    .. H.q(so) .. " spec/support/uv_fail.c $(pkg-config --cflags libuv) -ldl")
  assert(rc == 0, out)
  local preload = os.getenv("LD_PRELOAD")
  return "SHIM_DIR=" .. H.q(dir) .. " LD_PRELOAD=" .. H.q((preload and preload .. " " or "") .. so)
end

return M
