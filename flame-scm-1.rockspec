rockspec_format = "3.0"
package = "flame"
version = "scm-1"
source = {
  url = "git+file:///dev/null",  -- built from a checkout: luarocks make
}
description = {
  summary = "Elastic 'run this closure on fresh compute' for Lua 5.4 (FLAME)",
  detailed = [[
    flame runs a Lua closure, with everything it captured, on a short-lived runner
    booted by a backend (a local process, a Docker container, a cloud machine) and
    hands back the result. Pools grow runners on demand and shrink them when idle.
  ]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "RelWithDebInfo",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}
