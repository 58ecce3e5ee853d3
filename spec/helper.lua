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

package.loaded["spec.helper"] = H
return H
