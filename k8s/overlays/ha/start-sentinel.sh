#!/bin/sh
# Start the Sentinel beside one Valkey. Its configuration is written here, into an
# emptyDir, because Sentinel rewrites its file as it learns replicas, peers and failovers,
# and the passwords must not be in a ConfigMap.
set -eu
. /etc/valkey-ha/primary.sh
me="$(self_name)"
primary="$(find_primary)"
umask 077
cat > /run/sentinel/sentinel.conf <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $me
# Two of the three Sentinels must agree that the primary is down (and a majority must
# vote for the failover): one lost pod leaves two, enough for both.
sentinel monitor $MASTER_NAME $primary 6379 2
sentinel down-after-milliseconds $MASTER_NAME 5000
sentinel failover-timeout $MASTER_NAME 60000
sentinel parallel-syncs $MASTER_NAME 1
# Sentinel's login to each Valkey: taskmux-sentinel (router/acl.py), Secret taskmux-redis-sentinel.
sentinel auth-user $MASTER_NAME taskmux-sentinel
sentinel auth-pass $MASTER_NAME $(cat /etc/valkey-sentinel/password)
# Sentinel's own password (Secret taskmux-redis-sentinel-auth): gateways and workers, the
# other Sentinels and the Valkey start script log in with it.
requirepass $(cat /etc/valkey-sentinel-auth/password)
sentinel sentinel-pass $(cat /etc/valkey-sentinel-auth/password)
CONF
exec valkey-server /run/sentinel/sentinel.conf --sentinel
