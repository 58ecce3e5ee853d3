--- Errors raised by flame: tables with a `kind`, a `message` and `__tostring`
-- (docs/errors.md). `pcall(flame.call, ...)` returns them.
-- Kinds: timeout, remote, runner_down, boot, encode, decode, shutdown, invalid.
-- @module flame.errors
local M = {}

local Error = {}
Error.__index = Error
Error.__name = "flame.error"

function Error.__tostring(e)
  local s = "flame " .. e.kind .. " error: " .. e.message
  if e.kind == "timeout" and e.phase then s = s .. " (while " .. e.phase .. ")" end
  if e.traceback and e.traceback ~= "" then s = s .. "\nremote " .. e.traceback end
  return s
end

M.KINDS = { timeout = true, remote = true, runner_down = true, boot = true,
            encode = true, decode = true, shutdown = true, invalid = true }

--- Makes an error.
-- @tparam string kind one of KINDS
-- @tparam string message what failed and what to do
-- @tparam[opt] table fields more fields (phase, traceback, value, pool...)
function M.new(kind, message, fields)
  assert(M.KINDS[kind], "unknown error kind")
  local e = setmetatable(fields or {}, Error)
  e.kind, e.message = kind, message
  return e
end

--- Raises an error; `level` (as for `error`) adds the caller's position to the
-- message of misuse errors.
function M.raise(kind, message, fields, level)
  if level then
    local info = debug.getinfo(level + 1, "Sl")
    if info and info.currentline and info.currentline > 0 then
      message = ("%s:%d: %s"):format(info.short_src, info.currentline, message)
    end
  end
  error(M.new(kind, message, fields), 0)
end

--- True when `e` is a flame error (of `kind`, when given).
function M.is(e, kind)
  return getmetatable(e) == Error and (kind == nil or e.kind == kind)
end

return M
