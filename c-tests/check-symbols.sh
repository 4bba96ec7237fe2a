#!/usr/bin/env bash
# The shared library exports exactly upstream's rsocket.h calls plus our documented extensions.
set -euo pipefail
lib=${1:?usage: check-symbols.sh LIB.so [UPSTREAM_HEADER]}
hdr=${2:-/usr/include/rdma/rsocket.h}
extensions="rioread"
upstream=$(grep -oE '\br[a-z]+\s*\(' "$hdr" | tr -d ' (' | grep -vE '^(return)$' | sort -u)
expected=$(printf '%s\n' $upstream $extensions | sort -u)
exported=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TtWi]$/ {print $3}' | sed 's/@.*//' | sort -u)
if [ "$expected" != "$exported" ]; then
  echo "check-symbols: exported symbols differ from rsocket.h + extensions" >&2
  diff <(echo "$expected") <(echo "$exported") >&2 || true
  exit 1
fi
echo "check-symbols: $(echo "$exported" | wc -l) exported symbols = upstream rsocket.h ($(echo "$upstream" | wc -l)) + extensions ($extensions)"
