#!/usr/bin/env bash
# Check the shipped units with `systemd-analyze verify` (CI runs it). The
# units name /usr/local/bin/tend; verify needs the executable to exist, so
# they are checked as copies pointing at the binary given (default: the
# release build).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/tend}")
[ -x "$bin" ] || { echo "verify.sh: no executable at $bin (cargo build --release first)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in deploy/*.service deploy/*.timer; do
  sed "s#/usr/local/bin/tend#$bin#g" "$unit" > "$tmp/$(basename "$unit")"
done
cd "$tmp"
# man:tend(1) is not installed here: only that warning is tolerated.
out=$(systemd-analyze verify --man=no ./*.service ./*.timer 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
  echo "$out" >&2
  echo "verify.sh: systemd-analyze verify printed warnings" >&2
  exit 1
fi
echo "deploy/: every unit passes systemd-analyze verify"
