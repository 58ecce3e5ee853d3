--- The Docker backend: each runner is a container, created and started through the
-- Docker Engine API with FLAME_PARENT in its environment; it connects back to the
-- parent (over 127.0.0.1 with host networking) and is removed when it stops.
-- docs/docker.md is the user's guide, docs/backends.md walks through this file.
-- Options (backend_opts): image (required), cmd ({ "flame", "runner" }), env,
-- labels, network ("host"), memory (bytes), cpus, extra_hosts, volumes
-- ({ "/host:/ctr" }), mounts, user, workdir, auto_remove (true), pull ("never",
-- "missing", "always"), boot_timeout, host (DOCKER_HOST, else
-- unix:///var/run/docker.sock), tls ({ ca, cert, key, verify }, or what
-- DOCKER_CERT_PATH / DOCKER_TLS_VERIFY say), hosts (a list to spread runners over),
-- api_version (pin one instead of negotiating), ulimits ({ nofile = { soft, hard }
-- } or { nproc = 4096 }: HostConfig.Ulimits; Podman needs them within the host's
-- hard limits).
-- @module flame.backends.docker
local B = {}

local API_WANT = { 1, 41 }       -- what flame is written against
local API_NEED = { 1, 30 }       -- wait?condition=next-exit, AutoRemove, NanoCpus

local OPTIONS = {
  image = "string", cmd = "table", env = "table", labels = "table", network = "string",
  memory = "number", cpus = "number", extra_hosts = "table", volumes = "table",
  mounts = "table", user = "string", workdir = "string", auto_remove = "boolean",
  pull = "string", boot_timeout = "number", host = "string", hosts = "table",
  tls = "table|boolean", api_version = "string", ulimits = "table",
  -- given by the pool
  pool = "string", runner_id = "string", max_concurrency = "number", sandbox = "table",
  shutdown_timeout = "number",
}

local function version(s)
  local major, minor = tostring(s or ""):match("^(%d+)%.(%d+)$")
  return major and { tonumber(major), tonumber(minor) } or nil
end

local function older(a, b) return a[1] < b[1] or a[1] == b[1] and a[2] < b[2] end

local function vstr(v) return v[1] .. "." .. v[2] end

-- Where to reach the engine of this runner: a base URL (unversioned) and curl options.
local function endpoint(state)
  local h = state.host
  if h:match("^unix://") then
    return { base = "http://localhost", unix_socket = h:sub(8) }
  end
  local addr = h:match("^tcp://(.+)$") or h:match("^https?://(.+)$")
  if not addr or addr == "" then
    error(("docker: cannot use host %q (unix:// or tcp:// expected)"):format(h), 0)
  end
  addr = addr:gsub("/+$", "")
  local tls = state.tls
  if not addr:match(":%d+$") then addr = addr .. (tls and ":2376" or ":2375") end
  return { base = (tls and "https://" or "http://") .. addr,
           ca = tls and tls.ca, cert = tls and tls.cert, key = tls and tls.key,
           insecure = tls and tls.verify == false or nil }
end

-- What the TLS settings are, as the docker CLI reads them: a table as given; true
-- or DOCKER_TLS_VERIFY / DOCKER_CERT_PATH for ca.pem, cert.pem and key.pem in
-- DOCKER_CERT_PATH (else ~/.docker), verified when DOCKER_TLS_VERIFY is set.
local function tls_settings(given, flame)
  if given == false then return nil end
  local path = flame.getenv("DOCKER_CERT_PATH")
  local verify = flame.getenv("DOCKER_TLS_VERIFY")
  if given == nil and (path or "") == "" and (verify or "") == "" then return nil end
  if type(given) == "table" then
    return { ca = given.ca, cert = given.cert, key = given.key, verify = given.verify ~= false }
  end
  if (path or "") == "" then path = (flame.getenv("HOME") or "") .. "/.docker" end
  return { ca = path .. "/ca.pem", cert = path .. "/cert.pem", key = path .. "/key.pem",
           verify = given == true or (verify or "") ~= "" }
end

-- Why the engine could not be reached, and what to do about it.
local function unreachable(state, err)
  err = tostring(err)
  if state.tls and (err:find("SSL", 1, true) or err:find("certificate", 1, true)
                    or err:find("TLS", 1, true)) then
    return ("docker: TLS with the engine at %s failed: %s (check backend_opts.tls or "
      .. "DOCKER_CERT_PATH: ca.pem, cert.pem, key.pem)"):format(state.host, err)
  end
  return ("docker: engine at %s is unreachable: %s (start it, or set backend_opts.host)")
    :format(state.host, err)
end

local function request(state, method, path, body, timeout, flame)
  local e = endpoint(state)
  return {
    method = method, url = e.base .. path, unix_socket = e.unix_socket,
    ca = e.ca, cert = e.cert, key = e.key, insecure = e.insecure,
    headers = body and { ["Content-Type"] = "application/json" } or nil,
    body = body and flame.json.encode(body) or (method == "POST" and "" or nil),
    timeout = timeout,
  }
end

-- One API call: status, decoded JSON (or nil), raw body; or nil and why.
local function api(flame, state, method, path, body, timeout)
  local status, headers, raw = flame.http.request(request(state, method,
    "/v" .. state.api .. path, body, timeout or 30000, flame))
  if not status then return nil, unreachable(state, headers) end
  local data = nil
  if raw and raw:sub(1, 1) == "{" or raw and raw:sub(1, 1) == "[" then
    data = flame.json.decode(raw)
  end
  return status, data, raw
end

local function message(data, raw)
  return type(data) == "table" and data.message or raw or "?"
end

-- The API version to speak with this engine: ours, down to what the engine speaks,
-- up to the oldest it still accepts (an engine newer than ours may refuse 1.41).
local function negotiate(flame, state)
  if state.api_version then
    local v = version(state.api_version)
    if not v or older(v, API_NEED) then
      return nil, ("docker backend: option 'api_version' must be a version like \"1.41\", "
        .. "%s or newer (got %q)"):format(vstr(API_NEED), state.api_version)
    end
    state.api = state.api_version
    return true
  end
  local status, err, raw = flame.http.request(request(state, "GET", "/version", nil,
    math.min(10000, state.left()), flame))
  if not status then return nil, unreachable(state, err) end
  local d = status == 200 and raw and raw:sub(1, 1) == "{" and flame.json.decode(raw) or nil
  if type(d) ~= "table" then
    return nil, ("docker: %s does not answer like a Docker engine (GET /version: %s %s)")
      :format(state.host, tostring(status), tostring(raw):sub(1, 200))
  end
  local max, min = version(d.ApiVersion), version(d.MinAPIVersion)
  local use = API_WANT
  if max and older(max, use) then use = max end
  if min and older(use, min) then use = min end
  if older(use, API_NEED) then
    return nil, ("docker: the engine at %s speaks API %s; flame needs %s or newer "
      .. "(upgrade Docker there)"):format(state.host, vstr(use), vstr(API_NEED))
  end
  state.api = vstr(use)
  if use ~= API_WANT then
    flame.log.debug("docker: speaking API %s with %s (it speaks %s down to %s)", state.api,
      state.host, tostring(d.ApiVersion), tostring(d.MinAPIVersion))
  end
  return true
end

-- The API's multiplexed log stream: 8-byte frame headers (stream 1 stdout, 2
-- stderr; a big-endian length), then text. Calls line(stream, text) for each line
-- of each whole frame in buf; returns what is left of a frame cut short.
local function frames(buf, line)
  local i = 1
  while i + 7 <= #buf do
    local kind, size = buf:byte(i), string.unpack(">I4", buf, i + 4)
    if i + 7 + size > #buf then break end
    for l in buf:sub(i + 8, i + 7 + size):gmatch("[^\n]+") do
      l = l:gsub("\r$", "")
      if l ~= "" then line(kind, l) end
    end
    i = i + 8 + size
  end
  return buf:sub(i)
end

-- The last lines a container printed, for the reason of a failure.
local TAIL = 20
local function tail_text(lines)
  local text = table.concat(lines, "\n")
  if #text > 2000 then text = "..." .. text:sub(-2000) end
  return text
end

local function logs(flame, state, id)
  local status, _, raw = api(flame, state, "GET",
    "/containers/" .. id .. "/logs?stdout=1&stderr=1&tail=" .. TAIL)
  if status ~= 200 or not raw then return "" end
  local lines = {}
  frames(raw, function(_, l) lines[#lines + 1] = l end)
  return tail_text(lines)
end

local function remove(flame, state, id)
  api(flame, state, "DELETE", "/containers/" .. id .. "?force=1&v=1", nil, 10000)
end

local function urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- Containers of this pool left by a parent that died: removed before booting more.
local function sweep(flame, state, me)
  local filters = flame.json.encode { label = { "flame.pool=" .. state.pool } }
  local status, list = api(flame, state, "GET", "/containers/json?all=1&filters="
    .. urlencode(filters))
  if status ~= 200 or type(list) ~= "table" then
    flame.log.warn("docker: cannot list the containers of the pool (%s)", tostring(status))
    return
  end
  for _, c in ipairs(list) do
    local l = c.Labels or {}
    local pid = tonumber(l["flame.parent_pid"])
    -- only a parent this process can see is judged: same host, same boot, same pid
    -- namespace (parents in other containers share the host's name on its network);
    -- its pid gone, or taken by a process that started at another time
    if l["flame.parent"] ~= me.id and l["flame.parent_host"] == me.host and pid
       and l["flame.parent_boot"] == (me.boot or "") and l["flame.parent_pidns"] == (me.pidns or "")
       and not flame.proc_alive(pid, l["flame.parent_started"]) then
      flame.log.info("docker: removing container %s left by a parent that died",
        c.Id:sub(1, 12))
      remove(flame, state, c.Id)
    end
  end
end

-- An image reference as the pull endpoint wants it: the name, and a tag or digest
-- (an empty tag would pull every tag of the repository).
local function reference(image)
  local name, digest = image:match("^(.-)@(.+)$")
  if name then return name, digest end
  local slash = image:match("^.*()/") or 0
  local colon = image:match("^.*():")
  if colon and colon > slash then return image:sub(1, colon - 1), image:sub(colon + 1) end
  return image, "latest"
end

-- Pulls the image on this runner's engine, its progress in the log: one line per
-- layer and step (not every byte count).
local function pull(flame, state)
  local name, tag = reference(state.image)
  local t0 = flame.now()
  flame.log.info("docker: pulling %s on %s", state.image, state.host)
  local s = flame.http.stream(request(state, "POST", ("/v%s/images/create?fromImage=%s&tag=%s")
    :format(state.api, urlencode(name), urlencode(tag)), nil, state.left(), flame))
  local pending, seen, failure, body = "", {}, nil, {}
  local function line(l)
    if l == "" then return end
    local ok, d = pcall(flame.json.decode, l)
    if not ok or type(d) ~= "table" then body[#body + 1] = l return end
    if d.error or d.errorDetail or d.message then
      failure = d.error or (type(d.errorDetail) == "table" and d.errorDetail.message) or d.message
      return
    end
    if not d.status then return end
    local key = tostring(d.id) .. " " .. d.status
    if seen[key] then return end              -- progress ticks of a step: once
    seen[key] = true
    flame.log.info("docker: pull %s: %s%s%s", state.image, d.id and (d.id .. ": ") or "",
      d.status, d.progress and (" " .. d.progress) or "")
  end
  while true do
    local chunk, status, err = s.read()
    if not chunk then
      line(pending)
      if not status and #body == 0 and not failure and not next(seen) then
        return nil, unreachable(state, err)
      end
      if not status then
        return nil, ("docker: the pull of %q on %s broke off: %s (the boot_timeout may be "
          .. "too short for it)"):format(state.image, state.host, tostring(err))
      end
      if status ~= 200 or failure then
        local why = failure or table.concat(body, " ")
        return nil, ("docker: cannot pull image %q on %s: %s (check the name and that the "
          .. "engine reaches its registry, or load the image there and set pull = \"never\")")
          :format(state.image, state.host, why ~= "" and why or ("status " .. status))
      end
      break
    end
    pending = pending .. chunk
    local from = 1
    for l, rest in pending:gmatch("([^\n]*)\n()") do
      line(l)
      from = rest
    end
    pending = pending:sub(from)
  end
  flame.log.info("docker: pulled %s on %s in %d ms", state.image, state.host, flame.now() - t0)
  return true
end

local function check_options(state)
  for k, v in pairs(state) do
    local want = OPTIONS[k]
    if not want then
      error(("docker backend: unknown option '%s' (docs/docker.md lists them)"):format(k), 0)
    end
    if not want:find(type(v), 1, true) then
      error(("docker backend: option '%s' must be a %s (got %s)"):format(k,
        want:gsub("|", " or "), type(v)), 0)
    end
  end
  if type(state.image) ~= "string" or state.image == "" then
    error("docker backend: option 'image' is required (backend_opts = { image = "
      .. "\"flame-runner:latest\" }; scripts/runner-image builds one)", 0)
  end
  local p = state.pull
  if p ~= nil and p ~= "never" and p ~= "missing" and p ~= "always" then
    error(("docker backend: option 'pull' must be \"never\", \"missing\" or \"always\" "
      .. "(got %q)"):format(p), 0)
  end
  if state.hosts ~= nil and #state.hosts == 0 then
    error("docker backend: option 'hosts' must be a list of engine addresses", 0)
  end
  for k, v in pairs(state.env or {}) do
    if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number") then
      error(("docker backend: option 'env' must map names to values, like { LEVEL = \"2\" } "
        .. "(got %s = %s)"):format(tostring(k), tostring(v)), 0)
    end
  end
  for k, v in pairs(state.ulimits or {}) do
    local soft, hard = v, v
    if type(v) == "table" then soft, hard = v[1], v[2] or v[1] end
    if type(k) ~= "string" or math.type(soft) ~= "integer" or math.type(hard) ~= "integer"
       or soft > hard then
      error(("docker backend: option 'ulimits' must map limit names to a number or "
        .. "{ soft, hard }, like { nofile = { 1024, 1024 } } (got %s)"):format(tostring(k)), 0)
    end
  end
  for _, h in ipairs(state.hosts or {}) do
    if type(h) == "table" and h.tls ~= nil and type(h.tls) ~= "table" and type(h.tls) ~= "boolean" then
      error("docker backend: the tls of a 'hosts' entry must be a table or a boolean", 0)
    end
  end
end

--- A new runner: options checked, the engine chosen, FLAME_PARENT and labels made.
function B.init(opts, flame)
  local state = flame.merge(flame.config("docker"), opts)
  check_options(state)
  local tls = state.tls
  if state.hosts then                          -- spread runners over the engines
    local n = tonumber(tostring(state.runner_id):match("(%d+)$")) or 1
    local h = state.hosts[(n - 1) % #state.hosts + 1]
    if type(h) == "table" then                 -- { host = ..., tls = ... }
      if h.tls ~= nil then tls = h.tls end
      h = h.host
    end
    if type(h) ~= "string" then
      error("docker backend: each of 'hosts' must be an address or { host = ..., tls = ... }", 0)
    end
    state.host = h
  end
  state.hosts = nil
  state.host = state.host or flame.getenv("DOCKER_HOST") or "unix:///var/run/docker.sock"
  state.tls = not state.host:match("^unix://") and tls_settings(tls, flame) or nil
  endpoint(state)                              -- a bad host fails here
  state.cmd = state.cmd or { "flame", "runner" }
  state.network = state.network or "host"
  state.pull = state.pull or "never"
  if state.auto_remove == nil then state.auto_remove = true end
  local me = flame.parent_info()
  state.me = me
  -- nil and why when the parent cannot make one (code_sync's pack over its limit)
  local parent, why = flame.parent_new { node_base = state.runner_id, host_env = "HOSTNAME" }
  if not parent then error(why, 0) end
  state.parent = parent
  state.env = flame.merge(state.env, { FLAME_PARENT = flame.parent_encode(state.parent) })
  state.labels = flame.merge(state.labels, {
    ["flame.pool"] = state.pool, ["flame.runner"] = state.runner_id,
    ["flame.parent"] = me.id, ["flame.parent_pid"] = tostring(me.pid),
    ["flame.parent_host"] = me.host, ["flame.parent_started"] = me.started or "",
    ["flame.parent_boot"] = me.boot or "", ["flame.parent_pidns"] = me.pidns or "",
  })
  return state
end

local function create(flame, state)
  local env = {}
  for k, v in pairs(state.env) do env[#env + 1] = k .. "=" .. tostring(v) end
  local mounts
  for _, m in ipairs(state.mounts or {}) do
    mounts = mounts or {}
    mounts[#mounts + 1] = { Type = m.type or "bind", Source = m.source, Target = m.target,
                            ReadOnly = m.read_only }
  end
  -- rlimits of the runner's processes, { Name, Soft, Hard } as the API wants them
  -- (Podman's defaults may exceed the host's hard limits: the start then fails)
  local ulimits
  for name, v in pairs(state.ulimits or {}) do
    ulimits = ulimits or {}
    local soft, hard = v, v
    if type(v) == "table" then soft, hard = v[1], v[2] or v[1] end
    ulimits[#ulimits + 1] = { Name = name, Soft = soft, Hard = hard }
  end
  if ulimits then table.sort(ulimits, function(a, b) return a.Name < b.Name end) end
  return api(flame, state, "POST", "/containers/create", {
    Image = state.image, Cmd = state.cmd, Env = env, Labels = state.labels,
    User = state.user, WorkingDir = state.workdir,
    HostConfig = {
      NetworkMode = state.network, AutoRemove = state.auto_remove,
      Memory = state.memory and math.floor(state.memory),
      NanoCpus = state.cpus and math.floor(state.cpus * 1e9),
      ExtraHosts = state.extra_hosts, Binds = state.volumes, Mounts = mounts,
      Ulimits = ulimits,
    },
  }, state.left())
end

-- The containers of this runner, however far their creation got (a create that timed
-- out here may still have happened on the engine): removed.
local function remove_mine(flame, state)
  local filters = flame.json.encode { label = { "flame.runner=" .. state.runner_id,
                                                "flame.parent=" .. state.me.id } }
  local status, list = api(flame, state, "GET", "/containers/json?all=1&filters="
    .. urlencode(filters), nil, 10000)
  if status ~= 200 or type(list) ~= "table" then return end
  for _, c in ipairs(list) do remove(flame, state, c.Id) end
end

-- The container's end reaches handle_info the moment it happens (a wait), and its
-- output as it comes (an attach: lines in the pool's log, the last ones kept for
-- the reason of its end). Both are registered with the engine before the container
-- starts, so neither misses a container that exits at once.
local function watch(flame, state, id)
  local function opts(method, path, chunks)
    local o = request(state, method, "/v" .. state.api .. "/containers/" .. id .. path, nil,
      nil, flame)
    o.await_response, o.chunks = state.left(), chunks
    return o
  end
  local path = "/wait?condition=next-exit"
  local status, err = flame.http.watch(opts("POST", path), "wait")
  if status == 200 then
    -- attached, not a followed log: a log follow on a container not yet started
    -- ends at once, an attach waits for its output (as `docker run` does)
    path = "/attach?stream=1&logs=1&stdout=1&stderr=1"
    status, err = flame.http.watch(opts("POST", path, true), "logs")
  end
  if status == 200 then return true end
  local why = status and ("status " .. status) or unreachable(state, err)
  if status then
    -- a watch hands over no body: the engine's words come from asking once more
    -- (Podman prepares the container for an attach, and says why that failed)
    local st, data, raw = api(flame, state, "POST", "/containers/" .. id .. path, nil, 2000)
    if st and st >= 400 then why = ("status %d: %s"):format(st, message(data, raw)) end
    if why:find("rlimit", 1, true) then
      why = why .. " (set backend_opts.ulimits within this host's hard limits, `ulimit -Hn` "
        .. "and `ulimit -Hu`: docs/docker.md, Podman)"
    end
  end
  return nil, ("docker: cannot watch container %s: %s"):format(id:sub(1, 12), why)
end

--- Creates and starts the container, and waits for its runner to connect.
function B.remote_boot(state, flame)
  -- one deadline for the whole boot, pull included: each step gets what is left
  local deadline = flame.now() + (state.boot_timeout or 30000)
  function state.left() return math.max(1, deadline - flame.now()) end
  local ok, why = negotiate(flame, state)
  if not ok then return nil, why end
  sweep(flame, state, state.me)
  if state.pull == "always" then
    ok, why = pull(flame, state)
    if not ok then return nil, why end
  end
  local status, data, raw = create(flame, state)
  if status == 404 and state.pull == "missing" then
    ok, why = pull(flame, state)
    if not ok then return nil, why end
    status, data, raw = create(flame, state)
  end
  if not status then
    remove_mine(flame, state)
    return nil, data
  end
  -- Docker says "No such image: x", Podman "no such image: x: image not known"
  if status == 404 and tostring(message(data, raw)):lower():find("no such image", 1, true) then
    return nil, ("docker: image %q not found on %s (build it with scripts/runner-image, "
      .. "pull it, set pull = \"missing\", or set backend_opts.image)")
      :format(state.image, state.host)
  end
  if status ~= 201 or type(data) ~= "table" or not data.Id then
    return nil, "docker: cannot create the container: " .. message(data, raw)
  end
  local id = data.Id
  state.container = id
  state.log_pending, state.tail = "", {}
  ok, why = watch(flame, state, id)
  if not ok then
    remove(flame, state, id)
    return nil, why
  end
  status, data, raw = api(flame, state, "POST", "/containers/" .. id .. "/start")
  if status ~= 204 and status ~= 304 then
    remove(flame, state, id)
    return nil, status and ("docker: cannot start the container: " .. message(data, raw)) or data
  end
  local term
  term, why = flame.await_remote_up(state.parent, state.left())
  if not term then
    if why:find("did not connect within", 1, true) then
      why = ("the runner did not connect within the boot timeout of %s ms"):format(
        tostring(state.boot_timeout or 30000))
    end
    local tail = tail_text(state.tail)
    if tail == "" then tail = logs(flame, state, id) end
    remove(flame, state, id)
    if tail ~= "" and not why:find("the container said", 1, true) then
      why = why .. "; the container said: " .. tail
    end
    return nil, "docker: " .. why
  end
  state.terminator = term
  return term, state
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
    if not msg.status then return state end    -- cancelled, or the engine went away:
                                               -- the link tells
    local d = msg.body and msg.body:sub(1, 1) == "{" and flame.json.decode(msg.body)
    state.exit_code = type(d) == "table" and d.StatusCode and tostring(math.floor(d.StatusCode))
      or "?"
    if state.output then return ended(state) end
    flame.send_after(300, { event = "report" })  -- the output is on its way
    return state
  elseif msg.event == "http" and msg.tag == "logs" and msg.data then
    local lines = {}
    state.log_pending = frames(state.log_pending .. msg.data, function(kind, l)
      lines[#lines + 1] = { kind, l }
      state.tail[#state.tail + 1] = #l > 500 and l:sub(1, 500) .. "..." or l
      if #state.tail > TAIL then table.remove(state.tail, 1) end
    end)
    for _, l in ipairs(lines) do       -- after the state is up to date: logging waits
      flame.log[l[1] == 2 and "warn" or "info"]("[%s] %s", state.runner_id, l[2])
    end
    return state
  elseif msg.event == "http" and msg.tag == "logs" then  -- the stream ended
    state.output = tail_text(state.tail)
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
