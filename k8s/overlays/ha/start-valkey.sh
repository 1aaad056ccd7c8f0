#!/bin/sh
# Start one Valkey of the replicated set: as a replica of the primary that Sentinel
# names, or, when no Sentinel knows one yet (the set's first start), pod 0 as primary and
# the others as its replicas. Sentinel moves the roles from then on (REPLICAOF at runtime);
# a restarted pod asks again, so it rejoins whoever won the last failover.
set -eu
. /etc/valkey-ha/primary.sh
me="$(self_name)"
primary="$(find_primary)"
umask 077
{
  # Sentinel and the replicas know each Valkey by its pod DNS name, not its pod IP (which
  # changes on restart).
  echo "replica-announce-ip $me"
  # Replicas log in to the primary as taskmux-replica (router/acl.py: PSYNC, REPLCONF,
  # PING); the password comes from the Secret taskmux-redis-replica, never a ConfigMap.
  echo "masteruser taskmux-replica"
  printf 'masterauth %s\n' "$(cat /etc/valkey-replica/password)"
  # A primary cut off from both replicas for 10 s refuses writes, so a failover on the
  # other side of a partition loses at most those 10 s of jobs.
  echo "min-replicas-to-write 1"
  echo "min-replicas-max-lag 10"
  if [ "$primary" != "$me" ]; then
    echo "replicaof $primary 6379"
  fi
} > /run/valkey/ha.conf
echo "starting as $([ "$primary" = "$me" ] && echo primary || echo "replica of $primary")"
exec valkey-server /etc/valkey/valkey.conf --include /run/valkey/ha.conf
