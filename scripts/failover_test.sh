#!/usr/bin/env bash
# The multi-instance failover playbook (see scripts/failover.py and OPERATIONS.md), run as a module from the repository root.
# Usage: scripts/failover_test.sh [--rate N] [--seconds S] [--kill-at S] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed >/dev/null
exec .venv/bin/python -m scripts.failover "$@"
