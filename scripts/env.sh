# scripts/env.sh STAGE - sourced: puts a staged (or luarocks) tree on the Lua paths
# and PATH, the way `luarocks path` does for an installed tree.
flame_stage=$1
export LUA_PATH_5_4="$flame_stage/share/lua/5.4/?.lua;$flame_stage/share/lua/5.4/?/init.lua;;"
export LUA_CPATH_5_4="$flame_stage/lib/lua/5.4/?.so;;"
export PATH="$flame_stage/bin:$PATH"
