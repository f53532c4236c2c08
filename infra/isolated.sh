#!/usr/bin/env bash
# Runs a command in a private network namespace that has only a loopback interface.
# Some components bind every interface (Prism's job server, Beam's loopback worker pool,
# Flink); inside the namespace "every interface" is 127.0.0.1 alone, so nothing memstream
# starts is reachable from outside, and tests cannot touch the network by accident.
# Everything that downloads (pip, mvn, go) runs before, in infra/bootstrap.sh.
set -euo pipefail
if [ "${MEMSTREAM_NO_NETNS:-0}" != 1 ] && unshare --net true 2>/dev/null; then
  exec unshare --net bash -c 'ip link set lo up && exec "$@"' isolated "$@"
fi
echo "memstream: no private network namespace (unshare --net not permitted); running on the host network" >&2
exec "$@"
