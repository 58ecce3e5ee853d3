--- The Docker backend: each runner is a container, created and started through the
-- Docker Engine API with FLAME_PARENT in its environment; it connects back to the
-- parent (over 127.0.0.1 with host networking) and is removed when it stops.
-- Options (backend_opts): image (required), cmd ({ "flame", "runner" }), env,
-- labels, network ("host"), memory (bytes), cpus, extra_hosts, volumes
-- ({ "/host:/ctr" }), user, workdir, auto_remove (true), host (DOCKER_HOST, else
-- unix:///var/run/docker.sock), hosts (a list to spread runners over), tls
-- ({ ca, cert, key } for tcp:// hosts).
-- @module flame.backends.docker
local B = {}

local API = "/v1.41"

-- Where to reach the engine of this runner: a base URL and curl options.
local function endpoint(state)
  local h = state.host
  if h:match("^unix://") then
    return { base = "http://localhost" .. API, unix_socket = h:sub(8) }
  end
  local addr = h:match("^tcp://(.+)$") or h:match("^https?://(.+)$")
  if not addr then error(("docker: cannot use host %q (unix:// or tcp:// expected)"):format(h), 0) end
  local tls = state.tls
  return { base = (tls and "https://" or "http://") .. addr .. API,
           ca = tls and tls.ca, cert = tls and tls.cert, key = tls and tls.key }
end

-- One API call: status, decoded JSON (or nil), raw body; or nil and why.
local function api(flame, state, method, path, body, timeout)
  local e = endpoint(state)
  local status, headers, raw = flame.http.request {
    method = method, url = e.base .. path, unix_socket = e.unix_socket,
    ca = e.ca, cert = e.cert, key = e.key,
    headers = body and { ["Content-Type"] = "application/json" } or nil,
    body = body and flame.json.encode(body) or (method == "POST" and "" or nil),
    timeout = timeout or 30000,
  }
  if not status then
    return nil, ("docker: engine at %s is unreachable: %s (start it, or set "
      .. "backend_opts.host)"):format(state.host, tostring(headers))
  end
  local data = nil
  if raw and raw:sub(1, 1) == "{" or raw and raw:sub(1, 1) == "[" then
    data = flame.json.decode(raw)
  end
  return status, data, raw
end

local function message(data, raw)
  return type(data) == "table" and data.message or raw or "?"
end

-- The text of the API's multiplexed log stream (8-byte frame headers, then text),
-- its last lines.
local function frames(raw)
  local out, i = {}, 1
  while i + 7 <= #raw do
    local size = string.unpack(">I4", raw, i + 4)
    out[#out + 1] = raw:sub(i + 8, i + 7 + size)
    i = i + 8 + size
  end
  local text = table.concat(out):gsub("%s+$", "")
  if #text > 2000 then text = "..." .. text:sub(-2000) end
  return text
end

local function logs(flame, state, id)
  local status, _, raw = api(flame, state, "GET",
    "/containers/" .. id .. "/logs?stdout=1&stderr=1&tail=20")
  if status ~= 200 or not raw then return "" end
  return frames(raw)
end

local function remove(flame, state, id)
  api(flame, state, "DELETE", "/containers/" .. id .. "?force=1&v=1", nil, 10000)
end

-- Containers of this pool left by a parent that died: removed before booting more.
local function sweep(flame, state, me)
  local filters = flame.json.encode { label = { "flame.pool=" .. state.pool } }
  local status, list = api(flame, state, "GET", "/containers/json?all=1&filters="
    .. filters:gsub("[^%w]", function(c) return ("%%%02X"):format(c:byte()) end))
  if status ~= 200 or type(list) ~= "table" then
    flame.log.warn("docker: cannot list the containers of the pool (%s)", tostring(status))
    return
  end
  flame.log.debug("docker: %d containers of pool %s", #list, state.pool)
  for _, c in ipairs(list) do
    local l = c.Labels or {}
    local pid = tonumber(l["flame.parent_pid"])
    if l["flame.parent"] ~= me.id and l["flame.parent_host"] == me.host and pid
       and not flame.proc_alive(pid) then
      flame.log.info("docker: removing container %s left by a parent that died",
        c.Id:sub(1, 12))
      remove(flame, state, c.Id)
    end
  end
end

--- A new runner: options checked, the engine chosen, FLAME_PARENT and labels made.
function B.init(opts, flame)
  local state = flame.merge(flame.config("docker"), opts)
  if type(state.image) ~= "string" or state.image == "" then
    error("docker backend: option 'image' is required (backend_opts = { image = "
      .. "\"flame-runner:latest\" }; scripts/runner-image builds one)", 0)
  end
  local hosts = state.hosts
  if hosts ~= nil and (type(hosts) ~= "table" or #hosts == 0) then
    error("docker backend: option 'hosts' must be a list of engine addresses", 0)
  end
  if hosts then                                -- spread runners over the engines
    local n = tonumber(tostring(state.runner_id):match("(%d+)$")) or 1
    state.host = hosts[(n - 1) % #hosts + 1]
  end
  state.host = state.host or flame.getenv("DOCKER_HOST") or "unix:///var/run/docker.sock"
  endpoint(state)                              -- a bad host fails here
  state.cmd = state.cmd or { "flame", "runner" }
  state.network = state.network or "host"
  if state.auto_remove == nil then state.auto_remove = true end
  local me = flame.parent_info()
  state.me = me
  state.parent = flame.parent_new { node_base = state.runner_id, host_env = "HOSTNAME" }
  state.env = flame.merge(state.env, { FLAME_PARENT = flame.parent_encode(state.parent) })
  state.labels = flame.merge(state.labels, {
    ["flame.pool"] = state.pool, ["flame.runner"] = state.runner_id,
    ["flame.parent"] = me.id, ["flame.parent_pid"] = tostring(me.pid),
    ["flame.parent_host"] = me.host,
  })
  return state
end

--- Creates and starts the container, and waits for its runner to connect.
function B.remote_boot(state, flame)
  sweep(flame, state, state.me)
  local env = {}
  for k, v in pairs(state.env) do env[#env + 1] = k .. "=" .. v end
  local body = {
    Image = state.image, Cmd = state.cmd, Env = env, Labels = state.labels,
    User = state.user, WorkingDir = state.workdir,
    HostConfig = {
      NetworkMode = state.network, AutoRemove = state.auto_remove,
      Memory = state.memory, NanoCpus = state.cpus and math.floor(state.cpus * 1e9),
      ExtraHosts = state.extra_hosts, Binds = state.volumes,
    },
  }
  local status, data, raw = api(flame, state, "POST", "/containers/create", body)
  if not status then return nil, data end
  if status == 404 then
    return nil, ("docker: image %q not found on %s (build it with scripts/runner-image, "
      .. "pull it, or set backend_opts.image)"):format(state.image, state.host)
  end
  if status ~= 201 or type(data) ~= "table" or not data.Id then
    return nil, "docker: cannot create the container: " .. message(data, raw)
  end
  local id = data.Id
  state.container = id
  -- its end reaches handle_info the moment it happens, with what it printed (read
  -- as it goes: an auto-removed container leaves no logs to fetch afterwards)
  local e = endpoint(state)
  flame.http.watch({ method = "POST", url = e.base .. "/containers/" .. id
                       .. "/wait?condition=next-exit",
                     unix_socket = e.unix_socket, ca = e.ca, cert = e.cert, key = e.key,
                     body = "" }, "wait")
  flame.http.watch({ method = "GET", url = e.base .. "/containers/" .. id
                       .. "/logs?follow=1&stdout=1&stderr=1",
                     unix_socket = e.unix_socket, ca = e.ca, cert = e.cert, key = e.key },
                   "logs")
  status, data, raw = api(flame, state, "POST", "/containers/" .. id .. "/start")
  if status ~= 204 and status ~= 304 then
    remove(flame, state, id)
    return nil, "docker: cannot start the container: " .. (status and message(data, raw) or data)
  end
  local term, why = flame.await_remote_up(state.parent, state.boot_timeout)
  if not term then
    local tail = logs(flame, state, id)
    remove(flame, state, id)
    if tail ~= "" then why = why .. "; the container said: " .. tail end
    return nil, "docker: " .. why
  end
  state.terminator = term
  return term, state
end

--- Hands a call to the runner over its link.
function B.remote_spawn_monitor(state, work, flame)
  return flame.spawn_monitor(state.terminator, work)
end

--- The container's end: the runner is down, with its exit code and last output.
local function ended(state)
  local reason = ("container %s exited with code %s"):format(
    tostring(state.container):sub(1, 12), state.exit_code)
  if state.output and state.output ~= "" then
    reason = reason .. "; the container said: " .. state.output
  end
  return nil, reason
end

function B.handle_info(msg, state, flame)
  if msg.event == "http" and msg.tag == "wait" then
    local d = msg.body and flame.json.decode(msg.body)
    state.exit_code = type(d) == "table" and d.StatusCode and tostring(math.floor(d.StatusCode))
      or "?"
    if state.output then return ended(state) end
    flame.send_after(300, { event = "report" })  -- the output is on its way
    return state
  elseif msg.event == "http" and msg.tag == "logs" then
    state.output = msg.body and frames(msg.body) or ""
    if state.exit_code then return ended(state) end
    return state
  elseif msg.event == "report" and state.exit_code then
    return ended(state)
  end
  return state
end

--- The pool is done with the runner: the container goes, whatever happened.
function B.remote_shutdown(state, reason, flame)
  if state.container then
    flame.sleep(200)                           -- a runner told to stop exits by itself
    remove(flame, state, state.container)
  end
end

--- On the runner: end the process, so the container stops (and is removed).
function B.system_shutdown(flame)
  flame.exit(0)
end

return B
