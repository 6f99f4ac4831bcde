#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, for development and tests: a head and N worker nodes,
# each its own raylet with its own CPUs and object store, token authentication on, the dashboard
# (and `ray job submit`) on 127.0.0.1 only. A thin wrapper over `vertstudy cluster`.
#
#   cluster/local.sh start [DIR] [--workers N] [--cpus-per-worker C]   # default DIR /tmp/vs-cluster
#   source DIR/env.sh                  # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH
#   vertstudy study run studies/quickstart.yaml --smoke --storage /tmp/vs-results
#   ray job submit --address "$VERTSTUDY_DASHBOARD" -- vertstudy study run "$PWD/studies/quickstart.yaml" --smoke
#   cluster/local.sh status [DIR]
#   cluster/local.sh kill-worker [DIR] INDEX   # SIGKILL a worker node (fault drills)
#   cluster/local.sh start [DIR] --netns --health-check-s 3  # workers with addresses of their own (root)
#   cluster/local.sh start [DIR] --home-per-node  # no folder shared between nodes (object-storage drills)
#   cluster/local.sh cut-worker [DIR] INDEX [--heal]  # take a worker's link down / up (a partition)
#   cluster/local.sh stop [DIR]
set -euo pipefail
cmd=${1:-}
if [ -z "$cmd" ] || [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
shift
dir=/tmp/vs-cluster
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && { [ "$cmd" != "kill-worker" ] && [ "$cmd" != "cut-worker" ] || [ $# -gt 1 ]; }; then
  dir=$1
  shift
fi
case "$cmd" in
  start|status|stop|kill-worker|cut-worker) exec vertstudy cluster "$cmd" --dir "$dir" "$@" ;;
  *) echo "local.sh: unknown command '$cmd' (accepted: start, status, kill-worker, cut-worker, stop)" >&2; exit 2 ;;
esac
