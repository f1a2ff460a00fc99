#!/usr/bin/env bash
# Prefect deployment round trip on loopback: start a throwaway Prefect server, create the
# process work pool, `prefect deploy --all` from PROJECT (which validates prefect.yaml),
# start a worker, run 'ptq-pipeline/nightly' (and 'ptq-sweep/sweep' with SWEEP_PARAMS when
# given) until Completed, check the accuracy artifacts exist, then stop everything it started.
#
#   .ci/prefect-deploy.sh PROJECT [SWEEP_PARAMS_JSON]
#
# PROJECT is a git checkout of this project whose params.yaml makes a run quick (tests/test_prefect_deploy.py
# prepares one on tiny data). Each run may take PTQ_DEPLOY_TIMEOUT seconds (default 300).
set -euo pipefail
venv_bin=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
project=$(cd "${1:?usage: $0 PROJECT [SWEEP_PARAMS_JSON]}" && pwd -P)  # physical, as the build step records it
sweep_params=${2:-}
run_timeout=${PTQ_DEPLOY_TIMEOUT:-300}  # seconds per flow run
pool=gpu-pool                           # the work pool prefect.yaml names

work=$(mktemp -d)
export PATH="$venv_bin:$PATH" DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="$work/prefect-home"  # a fresh database, profiles and settings, deleted at the end
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL="http://127.0.0.1:$port/api"

groups=()
stop_group() {
    # Each background command leads its own process group (setsid): stop it with its children,
    # politely first; a worker whose server is gone may hang in its shutdown.
    kill -TERM -- "-$1" 2>/dev/null || return 0
    for _ in $(seq 30); do kill -0 -- "-$1" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_all() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "== failed ($status); worker log:"; tail -n 60 "$work/worker.log" 2>/dev/null || true
        echo "== server log:"; tail -n 20 "$work/server.log" 2>/dev/null || true
        # A flow run lives in its own process group, out of the worker's: ask the worker to stop it.
        cancelled=0
        for run in $(sed -n 's/.*UUID: \([0-9a-f-]*\).*/\1/p' "$work/runs.log" 2>/dev/null); do
            prefect flow-run cancel "$run" >/dev/null 2>&1 && cancelled=1
        done
        if [ "$cancelled" -eq 1 ]; then sleep 20; fi  # seconds for the worker to see the cancellation
    fi
    # The worker before the server it talks to.
    for (( index = ${#groups[@]} - 1; index >= 0; index-- )); do stop_group "${groups[index]}"; done
    rm -rf "$work"
}
trap stop_all EXIT
trap 'exit 143' TERM INT  # through the EXIT trap, so a killed run still stops the server and worker

start=$(date +%s)
echo "== prefect server on 127.0.0.1:$port"
setsid prefect server start --host 127.0.0.1 --port "$port" --no-ui >"$work/server.log" 2>&1 &
groups+=("$!")
python - "$PREFECT_API_URL/health" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 120  # seconds; the server takes 10-20 s on 2 busy cores
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"no healthy Prefect server at {sys.argv[1]} after 120 s")
        time.sleep(0.5)
PY
echo "server healthy after $(( $(date +%s) - start )) s"

cd "$project"
prefect work-pool create "$pool" --type process
prefect --no-prompt deploy --all
# What the templating in prefect.yaml must have produced for this checkout.
prefect deployment inspect 'ptq-pipeline/nightly' --output json >"$work/nightly.json"
python - "$project" "$work/nightly.json" <<'PY'
import json, sys
project, path = sys.argv[1:]
nightly = json.load(open(path))
[pull] = nightly["pull_steps"]
assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == project, pull
assert nightly["job_variables"]["env"]["PATH"].startswith(f"{project}/.venv/bin:"), nightly["job_variables"]
assert nightly["global_concurrency_limit"]["limit"] == 1, nightly["global_concurrency_limit"]
print(f"nightly: runs in {project}, one at a time, schedules {[s['schedule'] for s in nightly['schedules']]}")
PY

echo "== worker"
setsid prefect worker start --pool "$pool" --limit 1 >"$work/worker.log" 2>&1 &
groups+=("$!")

run_deployment() {
    local began=$(date +%s)
    echo "== prefect deployment run $*"
    prefect deployment run "$@" --watch --watch-timeout "$run_timeout" | tee -a "$work/runs.log"
    echo "$1 completed in $(( $(date +%s) - began )) s"
}
run_deployment 'ptq-pipeline/nightly'
keys=(ptq-accuracy ptq-metrics-diff)
if [ -n "$sweep_params" ]; then
    run_deployment 'ptq-sweep/sweep' --params "$sweep_params"
    keys+=(ptq-sweep)
fi

echo "== artifacts"
for key in "${keys[@]}"; do
    prefect artifact inspect "$key" --output json >"$work/artifact.json"
    python - "$key" "$work/artifact.json" <<'PY'
import json, sys
key, path = sys.argv[1:]
latest = json.load(open(path))[0]  # newest first
if latest["type"] not in ("table", "markdown") or not latest["data"]:
    sys.exit(f"artifact {key} is empty or not a table/markdown: {latest}")
print(f"artifact {key}: {latest['type']}, {len(latest['data'])} characters")
PY
done
echo "OK: deploy round trip in $(( $(date +%s) - start )) s"
