#!/usr/bin/env bash
# A local RabbitMQ cluster of 3 nodes, from the installed rabbitmq-server, to try fastfib's failover
# (docs/deploy.md, "Trying a cluster locally"; tests/test_cluster.py uses it).
#
#   scripts/cluster.sh up          start the nodes and join them into one cluster (prints their URLs)
#   scripts/cluster.sh down        stop every node (SIGTERM, then SIGKILL after 15 s) and delete the data
#   scripts/cluster.sh status      which nodes run, and the cluster as node 1 sees it
#   scripts/cluster.sh urls        the AMQP URLs of the nodes, space-separated (the form of FASTFIB_URL)
#   scripts/cluster.sh start I     start node I (1..3) again, e.g. after `kill I`; it rejoins the cluster
#   scripts/cluster.sh kill I      SIGKILL node I (a crash)
#   scripts/cluster.sh ctl I ARGS  rabbitmqctl -n <node I> ARGS (e.g. `ctl 2 stop_app`)
#
# Node I is ff-cI@localhost, AMQP on 127.0.0.1:568I (guest/guest), Erlang distribution on port 2568I.
# Everything (data, logs, pid files, an Erlang cookie of its own) lives in $FASTFIB_CLUSTER_DIR, by
# default ${TMPDIR:-/tmp}/fastfib-cluster. No plugin is enabled (the management and Prometheus plugins
# would clash on their ports), and the host's /etc/rabbitmq files are not read. The system broker, if
# any, is left alone: other names, other ports, another cookie.
set -euo pipefail

BASE=${FASTFIB_CLUSTER_DIR:-${TMPDIR:-/tmp}/fastfib-cluster}
NODES=3
PREFIX=${FASTFIB_CLUSTER_PREFIX:-ff-c}
AMQP_PORT0=${FASTFIB_CLUSTER_AMQP_PORT0:-5680}   # node I listens on AMQP_PORT0 + I
DIST_PORT0=${FASTFIB_CLUSTER_DIST_PORT0:-25680}  # and distributes on DIST_PORT0 + I
START_TIMEOUT=${FASTFIB_CLUSTER_START_TIMEOUT:-90}

# The real scripts: on Debian/Ubuntu the ones on PATH (/usr/sbin) switch to the rabbitmq user and
# its cookie, which would not let us run nodes of our own.
if [ -z "${RABBITMQ_BIN:-}" ]; then
    if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        RABBITMQ_BIN=/usr/lib/rabbitmq/bin
    elif command -v rabbitmq-server >/dev/null; then
        RABBITMQ_BIN=$(dirname "$(command -v rabbitmq-server)")
    else
        echo "cluster.sh: rabbitmq-server is not installed (set RABBITMQ_BIN to its directory)" >&2
        exit 1
    fi
fi

die() { echo "cluster.sh: $*" >&2; exit 1; }
node_name() { echo "${PREFIX}$1@localhost"; }
node_dir() { echo "$BASE/node$1"; }
node_pid() { cat "$(node_dir "$1")/rabbitmq.pid" 2>/dev/null || true; }
alive() { local pid; pid=$(node_pid "$1"); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
check_index() { [[ "${1:-}" =~ ^[1-3]$ ]] || die "node index must be 1, 2 or 3, got '${1:-}'"; }

# Runs a command with node I's environment.
with_node() {
    local i=$1; shift
    local dir; dir=$(node_dir "$i")
    env HOME="$BASE" \
        RABBITMQ_NODENAME="$(node_name "$i")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$((AMQP_PORT0 + i)) \
        RABBITMQ_DIST_PORT=$((DIST_PORT0 + i)) \
        RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_MNESIA_DIR="$dir/mnesia/$(node_name "$i")" \
        RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/rabbitmq.pid" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        "$@"
}

ctl() {
    local i=$1; shift
    with_node "$i" "$RABBITMQ_BIN/rabbitmqctl" -n "$(node_name "$i")" "$@"
}

prepare() {
    mkdir -p "$BASE"
    chmod 700 "$BASE"
    if [ ! -s "$BASE/.erlang.cookie" ]; then
        (umask 077; head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$BASE/.erlang.cookie")
        chmod 400 "$BASE/.erlang.cookie"
    fi
    : > "$BASE/rabbitmq-env.conf"
    echo "[]." > "$BASE/enabled_plugins"
    local i dir
    for i in $(seq 1 $NODES); do
        dir=$(node_dir "$i")
        mkdir -p "$dir/log" "$dir/mnesia"
        cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$((AMQP_PORT0 + i))
log.file.level = info
log.console = false
EOF
        echo "[]." > "$dir/advanced.config"
    done
}

start_node() {
    local i=$1 dir
    alive "$i" && return 0
    dir=$(node_dir "$i")
    rm -f "$dir/rabbitmq.pid"
    # setsid: the node must not die with the shell or pytest process group that started it.
    with_node "$i" setsid "$RABBITMQ_BIN/rabbitmq-server" >>"$dir/log/console.log" 2>&1 < /dev/null &
}

await_node() {
    local i=$1
    if ! ctl "$i" wait --timeout "$START_TIMEOUT" "$(node_dir "$i")/rabbitmq.pid" >/dev/null 2>&1; then
        tail -20 "$(node_dir "$i")/log/console.log" >&2 || true
        die "node $(node_name "$i") did not start within ${START_TIMEOUT} s (logs: $(node_dir "$i")/log)"
    fi
}

urls() {
    local i out=()
    for i in $(seq 1 $NODES); do out+=("amqp://guest:guest@127.0.0.1:$((AMQP_PORT0 + i))/%2F"); done
    echo "${out[*]}"
}

up() {
    local i running=0
    for i in $(seq 1 $NODES); do alive "$i" && running=$((running + 1)); done
    if [ "$running" -eq "$NODES" ]; then
        echo "cluster already up"; urls; return 0
    fi
    [ "$running" -eq 0 ] || die "some nodes already run; run '$0 down' first"
    rm -rf "$BASE"/node*
    prepare
    for i in $(seq 1 $NODES); do start_node "$i"; done
    for i in $(seq 1 $NODES); do await_node "$i"; done
    # (join_cluster logs harmless "tracked connection table" errors of the node it restarts.)
    for i in $(seq 2 $NODES); do
        ctl "$i" stop_app >>"$BASE/join.log" 2>&1
        ctl "$i" join_cluster "$(node_name 1)" >>"$BASE/join.log" 2>&1 || { cat "$BASE/join.log" >&2; die "join failed"; }
        ctl "$i" start_app >>"$BASE/join.log" 2>&1
    done
    urls
}

down() {
    local i pid pids=()
    [ -d "$BASE" ] || return 0
    for i in $(seq 1 $NODES); do
        pid=$(node_pid "$i")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    local waited=0
    while [ ${#pids[@]} -gt 0 ] && [ $waited -lt 150 ]; do
        local left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        pids=(${left[@]+"${left[@]}"})
        [ ${#pids[@]} -eq 0 ] && break
        sleep 0.1; waited=$((waited + 1))
    done
    for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$BASE"
}

status() {
    local i
    for i in $(seq 1 $NODES); do
        if alive "$i"; then
            echo "$(node_name "$i") pid $(node_pid "$i") amqp 127.0.0.1:$((AMQP_PORT0 + i))"
        else
            echo "$(node_name "$i") not running"
        fi
    done
    for i in $(seq 1 $NODES); do
        if alive "$i"; then
            ctl "$i" cluster_status 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' \
                | awk '/^Running Nodes/ {f = 1; print; next} f && /^[A-Z]/ {exit} f && NF {print}'
            break
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    urls) urls ;;
    start) check_index "${2:-}"; [ -d "$(node_dir "$2")" ] || die "no cluster in $BASE; run '$0 up'"
           start_node "$2"; await_node "$2" ;;
    kill) check_index "${2:-}"; pid=$(node_pid "$2"); [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true ;;
    ctl) check_index "${2:-}"; i=$2; shift 2; ctl "$i" "$@" ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
