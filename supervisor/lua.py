"""Lua pieces the maintenance scripts share (Redis 7 runs them atomically)."""

# `id_lt(a, b)`: stream id a < b. Redis writes ids as `<ms>-<seq>` in decimal without leading
# zeros, so comparing lengths, then the digits, is exact for the whole 64-bit range (Lua's
# numbers are doubles and are not). `to_table(flat)`: a RESP2 map reply (name, value, …) as a
# table; a nil value arrives as `false`.
PRELUDE = """
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local function to_table(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
"""
