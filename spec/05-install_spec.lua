-- Packaging: `luarocks make` installs flame offline into a fresh tree, and a program
-- run with `luarocks path` finds the module, the backends and the executable.
-- Tagged "install": it builds the C core again, so the sanitized and valgrind runs
-- skip it.
local H = require "spec.helper"
local run, q = H.run, H.q

describe("luarocks install #install", function()
  local tree = os.tmpname()
  local root = assert(io.popen("pwd")):read("l")

  setup(function()
    os.remove(tree)
  end)

  teardown(function()
    run("rm -rf " .. q(tree) .. " " .. q(root .. "/build.luarocks"))
  end)

  it("installs offline and runs from the tree", function()
    local rc, out = run("cd " .. q(root) .. " && luarocks --lua-version 5.4 make "
      .. "--deps-mode=none --tree " .. q(tree) .. " flame-scm-1.rockspec")
    assert.are.equal(0, rc, out)
    assert.matches("flame scm%-1 is now installed", out)

    -- a clean environment: nothing but the tree's own paths
    local env = "env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 "
    local paths = "eval \"$(luarocks --lua-version 5.4 --tree " .. q(tree) .. " path)\""
    local prog = [[local flame = require "flame"
      local core = require "flame.core"
      local bytes = assert(flame.codec.encode({ 1, "two" }))
      local ok, v = flame.codec.decode(bytes)
      assert(require("flame.backends.local").remote_boot)
      local pool = flame.pool { name = "installed" }
      assert(flame.call(pool, function() return 41 + 1 end) == 42)
      pool:shutdown()
      print(flame.VERSION, ok, v[2], package.searchpath("flame.core", package.cpath),
        package.searchpath("flame.backends.local", package.path))]]
    local rc2, out2 = run(env .. "sh -c " .. q(paths .. " && lua5.4 -e " .. q(prog)))
    assert.are.equal(0, rc2, out2)
    local t = tree:gsub("%p", "%%%0")
    assert.matches("true\ttwo\t" .. t .. "/lib/lua/5.4/flame/core.so\t"
      .. t .. "/share/lua/5.4/flame/backends/local.lua", out2)

    local rc3, out3 = run(env .. "sh -c " .. q(paths
      .. " && command -v flame && flame -e 'print(flame.VERSION)'"))
    assert.are.equal(0, rc3, out3)
    assert.matches(tree:gsub("%p", "%%%0") .. "/bin/flame\n%d+%.%d+%.%d+\n$", out3)

    -- the executable finds its own modules even without `luarocks path`
    local rc4, out4 = run(env .. q(tree .. "/bin/flame") .. " -e 'print(flame.VERSION)'")
    assert.are.equal(0, rc4, out4)
  end)
end)
