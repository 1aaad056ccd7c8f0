# Shared by start-valkey.sh and start-sentinel.sh (sourced, POSIX sh).
# REPLICAS (3), MASTER_NAME (taskmux), POD_NAMESPACE come from the container's env.
HEADLESS=taskmux-redis-headless

self_name() {
  echo "$(hostname).$HEADLESS.$POD_NAMESPACE.svc.cluster.local"
}

# The primary the other pods' Sentinels name, else pod 0 (the set's first start).
find_primary() {
  i=0
  while [ "$i" -lt "$REPLICAS" ]; do
    peer="taskmux-redis-$i.$HEADLESS.$POD_NAMESPACE.svc.cluster.local"
    i=$((i + 1))
    [ "$peer" = "$(self_name)" ] && continue
    answer="$(REDISCLI_AUTH="$(cat /etc/valkey-sentinel-auth/password)" timeout 3 \
      valkey-cli --raw -h "$peer" -p 26379 SENTINEL get-master-addr-by-name "$MASTER_NAME" \
      2>/dev/null | head -n 1)" || answer=""
    case "$answer" in
      "" | *ERR* | *NOAUTH* | *"Could not connect"*) ;;
      *) echo "$answer"; return 0 ;;
    esac
  done
  echo "taskmux-redis-0.$HEADLESS.$POD_NAMESPACE.svc.cluster.local"
}
