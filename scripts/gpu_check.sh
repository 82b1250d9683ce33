#!/usr/bin/env bash
# One-shot GPU verification (see scripts/gpu_check.py for the steps, budgets and tolerances).
#
#   scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--offline] [--dry-run] [--only STEP ...] [--budget STEP=SECONDS ...]
#
# Runs with $PYTHON (default: python3, the interpreter that holds the machine's CUDA torch).
# Online it installs what is missing into that interpreter's environment, pinned, never
# replacing an installed torch; offline (--offline, or no registry answers) it uses what is
# installed plus the wheels in --wheels DIR, and reports what it skipped. Writes
# OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; exits non-zero on any mismatch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$#" -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [options]   (scripts/gpu_check.sh OUT_DIR --help for the options)" >&2
    exit 2
fi
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
