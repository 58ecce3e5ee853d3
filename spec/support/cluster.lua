-- Helpers for the specs that run runners on a real cluster engine: the Slurm
-- cluster of scripts/slurm (spec/15) and the Podman service of scripts/podman
-- (spec/16, and spec/13 run against Podman). Which cluster to use comes from the
-- environment, as scripts/test's cluster step and `eval "$(scripts/slurm start)"`
-- set it; a spec file without one registers nothing (it says so on stderr), so the
-- suite's other runs do not count it as skipped.
local flame = require "flame"
local task = require "flame.task"
local H = require "spec.helper"

local C = {}

-- The file's cluster, or nil and why not. FLAME_SLURM_SPECS=1 asks for the Slurm
-- specs; SLURM_CONF and FLAME_SLURMRESTD say where the cluster is; and
-- FLAME_SLURM_UNAVAILABLE carries why the step could not start one (every test is
-- then pending with it).
function C.slurm()
  if os.getenv("FLAME_SLURM_SPECS") ~= "1" then return nil end
  local why = os.getenv("FLAME_SLURM_UNAVAILABLE")
  if why and why ~= "" then return false, why end
  local conf, restd = os.getenv("SLURM_CONF"), os.getenv("FLAME_SLURMRESTD")
  if not conf or conf == "" or not restd or restd == "" then
    return false, "no Slurm cluster in the environment: eval \"$(scripts/slurm start)\" sets "
      .. "SLURM_CONF and FLAME_SLURMRESTD"
  end
  return { conf = conf, restd = restd }
end

--- Lines a shell command printed (stdout and stderr), and whether it exited 0.
function C.sh(cmd)
  local rc, out = H.run(cmd)
  return rc == 0, out
end

--- Jobs in squeue (any state squeue shows: pending, running, completing) whose
-- name begins with "flame-" .. prefix: a list of { id, name, state, reason }.
function C.jobs(prefix)
  local ok, out = C.sh("squeue -h -o '%i|%j|%T|%r'")
  assert(ok, "squeue failed: " .. out)
  local list = {}
  for id, name, state, reason in out:gmatch("(%d+)|([^|\n]*)|([^|\n]*)|([^\n]*)") do
    if name:sub(1, #prefix + 6) == "flame-" .. prefix then
      list[#list + 1] = { id = id, name = name, state = state, reason = reason }
    end
  end
  return list
end

--- Waits until squeue shows no job of the prefix; true, or false at the end of ms.
function C.wait_no_jobs(prefix, ms)
  return H.wait_for(function() return #C.jobs(prefix) == 0 end, ms)
end

--- A job's fields as `scontrol show job -o` prints them ({ JobState = ..., ... }).
function C.job(id)
  local ok, out = C.sh("scontrol show job -o " .. id)
  if not ok then return nil, out end
  local t = {}
  for k, v in out:gmatch("([%w/:]+)=(%S*)") do
    if t[k] == nil then t[k] = v end
  end
  return t
end

--- Log lines of a pool, kept for the test to read.
function C.capture(p)
  local lines = {}
  for _, level in ipairs { "debug", "info", "warn", "error" } do
    p.log[level] = function(fmt, ...)
      local ok, msg = pcall(string.format, fmt, ...)
      lines[#lines + 1] = level .. ": " .. (ok and msg or fmt)
    end
  end
  return lines
end

--- Starts `flame SCRIPT ARGS...` in the background; returns its pid.
function C.background(script, ...)
  local args = {}
  for i, a in ipairs { ... } do args[i] = H.q(a) end
  local p = io.popen("flame " .. H.q(script) .. " " .. table.concat(args, " ")
    .. " >/dev/null 2>&1 & echo $!")
  local pid = tonumber(p:read("l"))
  p:close()
  return pid
end

--- Waits for a file to exist (a background parent's "I am up").
function C.wait_file(path, ms)
  return H.wait_for(function() return H.exists(path) end, ms)
end

--- A free TCP port on 127.0.0.1.
function C.free_port()
  local ok, out = C.sh([[python3 -c 'import socket; s = socket.socket(); ]]
    .. [[s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])']])
  assert(ok, out)
  return tonumber(out:match("%d+"))
end

C.now = task.now
C.sleep = flame.sleep

return C
