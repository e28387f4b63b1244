#!/usr/bin/env bash
# Stand-in base images for a host that reaches no image registry, built from Debian's packages only:
#   masktune-standin/python:3.11     (for the Dockerfile's PYTHON_IMAGE: Debian bookworm's python3 + venv)
#   masktune-standin/redis:7         (Debian's redis-server)
#   masktune-standin/postgres:15     (Debian's PostgreSQL, initialised from POSTGRES_USER/PASSWORD/DB)
# The compose files take them through MASKTUNE_PYTHON_IMAGE, MASKTUNE_REDIS_IMAGE and MASKTUNE_POSTGRES_IMAGE
# (docs/deploy.md, "Air-gapped hosts"). Needs root, debootstrap and a reachable Debian mirror (apt's own).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if ! docker image inspect masktune-standin/debian:bookworm >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  root="$(mktemp -d /tmp/standin-root.XXXXXX)"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >/dev/null
  tar -C "$root" -c . | docker import - masktune-standin/debian:bookworm >/dev/null
  rm -rf "$root"
fi
# The host's own certificate authorities (a TLS-inspecting proxy's, say) go into the Python stand-in, so
# pip inside image builds trusts what the host trusts.
context="$(mktemp -d /tmp/standin-context.XXXXXX)"
trap 'rm -rf "$context"' EXIT
cp "$here"/*.Dockerfile "$here"/*.sh "$context"/
mkdir -p "$context/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$context/ca-certificates/" 2>/dev/null || true
for name in python redis postgres; do
  tag="masktune-standin/$name:$(sed -n 's/^# tag: //p' "$here/$name.Dockerfile")"
  docker build --network host -q -t "$tag" -f "$context/$name.Dockerfile" "$context" >/dev/null
  echo "$tag"
done
