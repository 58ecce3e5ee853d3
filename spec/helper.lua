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

--- How long a spec waits for an event before it gives up and fails: generous, so
-- that no spec depends on how fast anything boots or runs (a wait that succeeds
-- returns as soon as the event is seen).
H.patience = 60000

--- Waits (driving the loop) until cond() is true; polls every 10 ms for up to ms
-- (default H.patience). Returns true, or false when the time ran out: specs wait for
-- the event they need this way, never for a fixed time.
function H.wait_for(cond, ms)
  local flame = require "flame"
  local task = require "flame.task"
  local deadline = task.now() + (ms or H.patience)
  while not cond() do
    if task.now() >= deadline then return cond() and true or false end
    flame.sleep(10)
  end
  return true
end

--- The first line a shell command prints.
function H.line(cmd)
  local p = assert(io.popen(cmd))
  local l = p:read("l")
  p:close()
  return l
end

--- True while a process lives: it has a /proc entry that is not a zombie's.
function H.alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")       -- nil when the process ended since the open (ESRCH)
  f:close()
  return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
end

--- True when a file exists at path.
function H.exists(path)
  local f = io.open(path)
  if f then f:close() return true end
  return false
end

--- Creates an empty file at path (a marker, or a gate opened for H.gate).
function H.touch(path)
  assert(io.open(path, "w")):close()
end

--- For work on a runner: blocks in one subprocess until a file exists at path, so a
-- call holds its slot until the test opens the gate with H.touch(path). Removing the
-- file's directory opens it too, and it gives up after about a minute. Sent with the
-- work as an upvalue; it uses only the runner's globals.
function H.gate(path)
  os.execute(("i=0; while [ ! -e '%s' ] && [ -d '%s' ] && [ $i -lt 6000 ]; do "
    .. "sleep 0.01; i=$((i+1)); done"):format(path, path:match("^(.*)/") or "."))
end

--- Pools made through H.pool are shut down after each test; a test that leaves any
-- pool (made any way) running fails. Every file that makes pools runs H.cleanup
-- after each test: busted loads flame afresh for each file, and a pool left to a
-- later file's cleanup belongs to a copy of flame whose tasks nobody runs any more,
-- so its shutdown waits out its whole bound (36 s a pool).
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
  local live = require("flame")._live_pools()
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
