#!/usr/bin/env bash
# diffusers' own DiT and PixArt fast pipeline tests, run twice from a diffusers source checkout:
# as they are, and with every pipeline optimized by an all-compute schedule right after it is
# built; prints the tests that fail only with cachecompile. Offline: the hub's tiny T5 config and
# tokenizer are stood in for locally (the pixel tests that need its real weights fail both times).
#
#   scripts/diffusers_tests/run.sh /path/to/diffusers        # uses .venv/bin/python
#
# The tests import pytest, parameterized, accelerate, psutil and requests-mock.
set -u
diffusers=${1:?usage: run.sh DIFFUSERS_CHECKOUT}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)  # this checkout's cachecompile, whatever is installed
python=${PYTHON:-$here/../../.venv/bin/python}
out=$(mktemp -d)
for mode in plain optimized; do
  (cd "$diffusers" && CC_MODE=$mode HF_HUB_OFFLINE=1 PYTHONPATH="$repo:$here:$diffusers" "$python" -m pytest -q \
     -p no:cacheprovider -p cc_plugin tests/pipelines/dit tests/pipelines/pixart_alpha tests/pipelines/pixart_sigma -rf \
     2>&1 | grep -E "^FAILED|passed|failed" > "$out/$mode.log")
  echo "$mode: $(tail -n 1 "$out/$mode.log")"
done
grep "^FAILED" "$out/plain.log" | sed 's/ - .*//' | sort > "$out/plain"
grep "^FAILED" "$out/optimized.log" | sed 's/ - .*//' | sort > "$out/optimized"
echo "fail only with cachecompile:"
comm -13 "$out/plain" "$out/optimized"
