--- A small logger writing to stderr: `log = false` shows errors only, a level name
-- shows that level and above.
-- @module flame.log
local M = {}

local LEVELS = { debug = 1, info = 2, warn = 3, error = 4 }
M.LEVELS = LEVELS

--- A logger for `name` at `level` (false or a level name).
function M.new(level, name)
  local min = level and LEVELS[level] or LEVELS.error
  local logger = {}
  for lvl, n in pairs(LEVELS) do
    logger[lvl] = function(fmt, ...)
      if n < min then return end
      local ok, msg = pcall(string.format, fmt, ...)
      io.stderr:write(("flame[%s] %s: %s\n"):format(name, lvl, ok and msg or tostring(fmt)))
    end
  end
  return logger
end

return M
