-- luacheck for the library, the specs and device scripts (the tb API is a module, not a global).
std = "lua54"
max_line_length = 160
unused_args = false
exclude_files = {"build/**", "build-*/**", "scripts/node_modules/**"}
files["spec/**/*_spec.lua"] = {std = "+busted"}
