#!/usr/bin/env bash
# A three-agent cluster on one machine, started piece by piece as on a real LAN:
# its own mosquitto, three `homering agent`s, a `homering controller`, then `homering chat`.
# Needs mosquitto (make test installs it) and `make install`.
#
#   BROKER  the broker this script starts and the pieces use, mqtt://HOST:PORT with HOST an
#           address of this machine (e.g. mqtt://127.0.0.1:1883). When its port is taken
#           (Debian's mosquitto service holds 1883) the script stops with one line instead
#           of using that other broker. Unset: mosquitto on a free loopback port.
#   HR      the homering command [default: .venv/bin/homering].
#   CHAT    set to 0 for no chat: run until Ctrl-C or SIGTERM (e.g. for the API or a test).
#
# On exit (/quit, Ctrl-D, Ctrl-C, SIGTERM) the controller stops first, then the agents,
# then the broker, so nothing reports a lost agent or a lost broker on the way out.
# Exit code: the chat's (0 after /quit or Ctrl-D), 130 after Ctrl-C, 0 after SIGTERM,
# 1 when the broker cannot start.
set -euo pipefail
HR=${HR:-.venv/bin/homering}
me=$(basename "$0")

logs=$(mktemp -d "${TMPDIR:-/tmp}/homering-three-agents.XXXXXX")
mosquitto_pid="" controller_pid="" agent_pids=()

stop() {  # SIGTERM, then wait (SIGKILL after 10 s)
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
cleanup() {
    trap '' INT TERM
    if [[ -n $controller_pid ]]; then stop "$controller_pid"; fi
    if (( ${#agent_pids[@]} )); then stop "${agent_pids[@]}"; fi
    if [[ -n $mosquitto_pid ]]; then stop "$mosquitto_pid"; fi
    rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 0' TERM  # a requested stop

# start_broker HOST PORT: mosquitto listening there; false (its error in $broker_error) if it cannot
start_broker() {
    printf 'listener %s %s\nallow_anonymous true\npersistence false\nlog_dest stderr\n' "$2" "$1" \
        >"$logs/mosquitto.conf"
    : >"$logs/mosquitto.log"
    # its own session: Ctrl-C reaches bash and the chat, not mosquitto (which, unlike the
    # background homering processes, does not ignore SIGINT); cleanup stops it last
    $setsid mosquitto -c "$logs/mosquitto.conf" >"$logs/mosquitto.log" 2>&1 &
    mosquitto_pid=$!
    for _ in $(seq 100); do  # mosquitto says "running" once its listener is bound, or exits
        if grep -q " running" "$logs/mosquitto.log"; then return 0; fi
        if ! kill -0 "$mosquitto_pid" 2>/dev/null; then
            wait "$mosquitto_pid" 2>/dev/null || true
            mosquitto_pid=""
            broker_error=$(grep -m1 "Error" "$logs/mosquitto.log" | sed 's/^[0-9]*: Error: //') || true
            broker_error=${broker_error:-mosquitto exited}
            return 1
        fi
        sleep 0.1
    done
    stop "$mosquitto_pid"
    mosquitto_pid=""
    broker_error="mosquitto did not start within 10 s"
    return 1
}

setsid=$(command -v setsid || true)
command -v mosquitto >/dev/null || { echo "$me: mosquitto is not installed (apt install mosquitto)" >&2; exit 1; }
if [[ -n ${BROKER:-} ]]; then
    if [[ ! $BROKER =~ ^mqtt://([^:/]+):([0-9]+)/?$ ]]; then
        echo "$me: BROKER must be mqtt://HOST:PORT, e.g. mqtt://127.0.0.1:1883 (got '$BROKER')" >&2
        exit 1
    fi
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
    if ! start_broker "$host" "$port"; then
        echo "$me: cannot start mosquitto on $host:$port: $broker_error (another broker there? choose a free port in BROKER, or unset it for one)" >&2
        exit 1
    fi
else
    host=127.0.0.1
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        port=$(( 20000 + RANDOM % 30000 ))
        start_broker "$host" "$port" && break
        port=""
    done
    [[ -n $port ]] || { echo "$me: cannot start mosquitto on a free port: $broker_error" >&2; exit 1; }
    BROKER=mqtt://$host:$port
fi
echo "$me: broker $BROKER" >&2

for i in 0 1 2; do
    $HR agent --broker "$BROKER" --name "dev$i" &
    agent_pids+=($!)
done
$HR controller --broker "$BROKER" --model smollm2 --agents 3 &
controller_pid=$!
if [[ ${CHAT:-1} == 0 ]]; then
    wait "$controller_pid"  # until Ctrl-C / SIGTERM (the traps exit), or the controller ends
else
    $HR chat --broker "$BROKER"
fi
