#!/usr/bin/env bash
# Build the benchmark's text domains from Debian packages (real English text that installs
# offline from a Debian mirror), into benchmarks/data/out/<domain>.txt (gitignored).
# Sources and licences: docs/benchmark.md. Needs root (apt-get) or the packages installed.
set -euo pipefail
cd "$(dirname "$0")"
PG_DOC=$(apt-cache pkgnames postgresql-doc- 2>/dev/null | grep -E '^postgresql-doc-[0-9]+$' | sort -V | tail -1 || true)
PY_DOC=$(apt-cache pkgnames python3 2>/dev/null | grep -E '^python3\.[0-9]+-doc$' | sort -V | tail -1 || true)
PACKAGES=(bible-kjv bible-kjv-text dict-gcide dict-foldoc dict-jargon "${PG_DOC:-postgresql-doc-15}" "${PY_DOC:-python3.11-doc}")
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python3 extract.py --out out "$@"
python3 end_tasks.py --out out/end_tasks
