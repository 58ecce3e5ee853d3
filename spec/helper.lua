-- Loaded by busted before the specs (.busted): shared helpers.
local H = {}

--- Runs a shell command; returns its exit code and its combined output.
function H.run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"__rc=$?\""))
  local out = p:read("a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return rc, (out:gsub("__rc=%d+%s*$", ""))
end

--- Quotes a string for the shell.
function H.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- True under valgrind or the sanitizers, where slow loops are made shorter.
H.slow = os.getenv("FLAME_VALGRIND") ~= nil

--- Pools made through H.pool are shut down after each test; a test that leaves any
-- pool (made any way) running fails.
local made = {}
function H.pool(opts)
  local flame = require "flame"
  local p = flame.pool(opts)
  made[#made + 1] = p
  return p
end

function H.cleanup()
  for _, p in ipairs(made) do p:shutdown() end
  made = {}
  local live = require("flame.pool").live()
  if #live > 0 then
    for _, name in ipairs(live) do
      io.stderr:write("left behind: pool ", name, "\n")
    end
    error("a test left pools running: " .. table.concat(live, ", "))
  end
end

--- A fresh temporary directory; removed by H.rmdir.
function H.tmpdir()
  local p = assert(io.popen("mktemp -d"))
  local dir = p:read("l")
  p:close()
  return dir
end

function H.rmdir(dir)
  os.execute("rm -rf " .. H.q(dir))
end

package.loaded["spec.helper"] = H
return H
