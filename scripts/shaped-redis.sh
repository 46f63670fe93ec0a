#!/usr/bin/env bash
# A redis-server behind a rate-shaped link, for benchmarks of remote tiers (e.g. the codec
# end-to-end rows of `lmcache bench codec --e2e-redis URL`).
#
#   scripts/shaped-redis.sh up [RATE [BURST]]   # RATE: a tc rate, default 4gbit (about 0.5 GB/s);
#                                               # BURST: tbf's bucket, default 8mb (megabytes)
#   scripts/shaped-redis.sh url         # the redis:// URL of a running setup
#   scripts/shaped-redis.sh down        # stop redis-server, delete the namespace and the veth pair
#
# Needs root, `ip`, `tc` and `redis-server`. `up` builds:
#   * a network namespace ($LMCACHE_SHAPED_NS, default lmcache-shaped) holding redis-server,
#     bound to 10.213.0.2 only, with a random password (a file under the state folder);
#   * a veth pair, lmc-shaped0 on the host (10.213.0.1/30) and lmc-shaped1 (10.213.0.2/30) in
#     the namespace;
#   * `tc qdisc ... tbf rate RATE burst BURST latency 100ms` on the namespace end, so Redis's
#     replies (what a tier read waits for) leave at RATE; the host's loopback is untouched.
#     Mind the bucket: after an idle spell, up to BURST bytes leave at full speed, so reads
#     smaller than a few BURSTs see a faster link than RATE (use e.g. 1mb for a strict link).
# Shaping is done by the kernel (no proxy process using the host's CPU). `up` prints the URL
# (`redis://10.213.0.2:6379/0?password_file=...`); `down` undoes everything `up` made, also after
# a half-finished `up`. State (password, pid file, rate) lives in $LMCACHE_SHAPED_DIR (default
# /tmp/lmcache-shaped-redis). Two setups side by side need their own LMCACHE_SHAPED_NS, _DIR,
# _IF (veth name prefix, at most 10 characters) and _NET (first three octets of a free /30).
set -euo pipefail

NS="${LMCACHE_SHAPED_NS:-lmcache-shaped}"
DIR="${LMCACHE_SHAPED_DIR:-/tmp/lmcache-shaped-redis}"
PORT="${LMCACHE_SHAPED_PORT:-6379}"
IF="${LMCACHE_SHAPED_IF:-lmc-shaped}"     # veth names: ${IF}0 on the host, ${IF}1 in the namespace
NET="${LMCACHE_SHAPED_NET:-10.213.0}"     # a /30: .1 on the host, .2 in the namespace
HOST_IF="${IF}0"
NS_IF="${IF}1"
HOST_IP="$NET.1"
NS_IP="$NET.2"

die() {
    echo "shaped-redis: $*" >&2
    exit 1
}

url() {
    [[ -f "$DIR/password" ]] || die "not up (no $DIR/password)"
    echo "redis://$NS_IP:$PORT/0?password_file=$DIR/password"
}

down() {
    if [[ -f "$DIR/redis.pid" ]]; then
        local pid
        pid="$(cat "$DIR/redis.pid")"
        # Only the redis-server this script started (its pid file), never a broad name match.
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
    fi
    # Deleting the namespace deletes its veth end, and with it the host end and the qdisc.
    ip netns del "$NS" 2>/dev/null || true
    ip link del "$HOST_IF" 2>/dev/null || true
    rm -rf "$DIR"
}

up() {
    local rate="${1:-4gbit}" burst="${2:-8mb}"
    [[ "$(id -u)" == 0 ]] || die "needs root (ip netns, tc)"
    command -v redis-server >/dev/null || die "no redis-server on the PATH (apt-get install redis-server)"
    if ip netns list | grep -qw "$NS"; then
        die "namespace $NS exists already: run '$0 down' first"
    fi
    trap 'echo "shaped-redis: up failed, cleaning up" >&2; down' ERR
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/password"
    chmod 600 "$DIR/password"
    echo "$rate $burst" >"$DIR/rate"

    ip netns add "$NS"
    ip link add "$HOST_IF" type veth peer name "$NS_IF"
    ip link set "$NS_IF" netns "$NS"
    ip addr add "$HOST_IP/30" dev "$HOST_IF"
    ip link set "$HOST_IF" up
    ip netns exec "$NS" ip addr add "$NS_IP/30" dev "$NS_IF"
    ip netns exec "$NS" ip link set "$NS_IF" up
    ip netns exec "$NS" ip link set lo up
    # Replies from Redis leave the namespace through NS_IF: shape them there.
    ip netns exec "$NS" tc qdisc add dev "$NS_IF" root tbf rate "$rate" burst "$burst" latency 100ms

    # The password goes in through a config file on stdin, never on a command line (ps shows those).
    {
        echo "bind $NS_IP"
        echo "port $PORT"
        echo "save \"\""
        echo "appendonly no"
        echo "dir $DIR"
        echo "daemonize yes"
        echo "pidfile $DIR/redis.pid"
        echo "logfile $DIR/redis.log"
        echo "requirepass $(cat "$DIR/password")"
    } | ip netns exec "$NS" redis-server - >&2
    for _ in $(seq 100); do
        if [[ -s "$DIR/redis.pid" ]] && (exec 3<>"/dev/tcp/$NS_IP/$PORT") 2>/dev/null; then
            trap - ERR
            echo "shaped-redis: redis-server in namespace $NS behind a $rate link (burst $burst)" >&2
            url
            return 0
        fi
        sleep 0.1
    done
    cat "$DIR/redis.log" >&2 2>/dev/null || true
    trap - ERR
    down
    die "redis-server did not start"
}

case "${1:-}" in
up) up "${2:-}" "${3:-}" ;;
down) down ;;
url) url ;;
*)
    echo "usage: $0 up [RATE [BURST]] | url | down" >&2
    exit 2
    ;;
esac
