#!/usr/bin/env bash
# Creates .venv with pinned dependencies and the vmlend package (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
echo "installing Python packages into .venv (pinned)"
if ! .venv/bin/pip install -q -c constraints.txt -r requirements-dev.txt -e . >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
rm -f "$log"
# trio-typing (a runtime dependency of libp2p) ships "trio-stubs", stubs for an old trio that
# shadow trio's own inline types under mypy (e.g. no trio.TaskStatus). They are types only.
rm -rf .venv/lib/python3*/site-packages/trio-stubs
.venv/bin/python -c "import libvirt, libp2p, trio, msgpack"
echo "$want" > "$stamp"
