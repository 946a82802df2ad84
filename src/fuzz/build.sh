#!/usr/bin/env bash
# Builds the libFuzzer targets with clang, without CMake: src/fuzz/fuzz_<name>.c plus the core
# files each one needs, under ASan + UBSan + libFuzzer, into OUT (default build/fuzz).
#   src/fuzz/build.sh [OUT] [target...]     CC=clang-14 to pick a compiler
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/build/fuzz}"
[[ $# -gt 0 ]] && shift
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(fuzz_json fuzz_checksum fuzz_dispatch)
cc="${CC:-}"
if [[ -z "$cc" ]]; then
  for c in clang clang-14 clang-15 clang-16 clang-17 clang-18; do
    if command -v "$c" >/dev/null; then cc="$c"; break; fi
  done
fi
[[ -n "$cc" ]] || { echo "fuzz: clang not found (libFuzzer needs clang)" >&2; exit 2; }
mkdir -p "$out"
flags=(-g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
  -fno-sanitize-recover=undefined -D_GNU_SOURCE -DTB_VERSION='"fuzz"'
  "-DTB_FUZZ_ROOT=\"$root\"" -I"$root/src" $(pkg-config --cflags lua5.4))
core_all=()
for f in "$root"/src/*.c; do [[ "$(basename "$f")" == main.c ]] || core_all+=("$f"); done
pids=()
for t in "${targets[@]}"; do
  case "$t" in
    fuzz_json) srcs=("$root/src/json.c" "$root/src/register.c"); libs=(lua5.4) ;;
    fuzz_checksum) srcs=("$root/src/hash.c" "$root/src/register.c"); libs=(lua5.4 libcrypto) ;;
    fuzz_dispatch) srcs=("${core_all[@]}"); libs=(lua5.4 libcrypto libmosquitto libcurl sqlite3) ;;
    *) echo "fuzz: unknown target $t" >&2; exit 2 ;;
  esac
  ( "$cc" "${flags[@]}" "$root/src/fuzz/$t.c" "${srcs[@]}" -o "$out/$t" $(pkg-config --libs "${libs[@]}") -lm \
      > "$out/$t.build.log" 2>&1 || { cat "$out/$t.build.log" >&2; echo "fuzz: building $t failed" >&2; exit 1; } ) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
