# shellcheck shell=bash
# Sourced by ai-demo/transparent.sh and gateway/benches/capture.sh (root): an "app host"
# and an "LLM host" as network namespaces joined by a veth pair (10.77.0.1 <-> 10.77.0.2),
# and cgroups for the app and the gateway. `hosts_up ID` creates them and sets $app,
# $llm, $cg; `in_ns NS CGROUP|- CMD...` runs a command there. On exit (Ctrl-C included)
# the processes listed in $pids are stopped, and the hosts and $work removed
# (scripts/common.sh's start_work and cleanup).

# shellcheck source=scripts/common.sh
. scripts/common.sh
start_work
at_exit hosts_stop

# Everything started in the namespaces or cgroups, whatever its parent: a background
# `in_ns` is a subshell, so the server it started is a grandchild of this script.
hosts_stop() {
    if [ -n "${llm:-}" ]; then
        for ns in "$llm" "$app"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null; done
        for d in "$cg"/*/; do [ -f "$d/cgroup.kill" ] && echo 1 >"$d/cgroup.kill"; done
    fi
    hosts_down
}

hosts_up() {
    local id=$1
    llm=$id-llm app=$id-app
    local cgroot
    cgroot=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
    [ -n "$cgroot" ] || { echo "no cgroup v2 hierarchy mounted" >&2; return 1; }
    cg=$cgroot/$id
    ip netns add "$llm"
    ip netns add "$app"
    ip link add "${id}a" netns "$app" type veth peer "${id}l" netns "$llm"
    ip -n "$app" addr add 10.77.0.1/24 dev "${id}a"
    ip -n "$llm" addr add 10.77.0.2/24 dev "${id}l"
    ip -n "$app" link set lo up
    ip -n "$llm" link set lo up
    ip -n "$app" link set "${id}a" up
    ip -n "$llm" link set "${id}l" up
    mkdir -p "$cg/app" "$cg/gateway" "$cg/outside"
}

hosts_down() {
    [ -n "${llm:-}" ] || return 0
    ip netns del "$llm" 2>/dev/null
    ip netns del "$app" 2>/dev/null
    # A cgroup can be removed once its last process is gone, which takes a moment.
    for d in "$cg/app" "$cg/gateway" "$cg/outside" "$cg"; do
        for _ in $(seq 50); do rmdir "$d" 2>/dev/null && break; [ -d "$d" ] || break; sleep 0.1; done
    done
    return 0
}

# Runs "$@" in network namespace $1 and, unless $2 is "-", cgroup $2. nsenter keeps /sys,
# so cgroup paths stay visible (ip netns exec would remount it).
in_ns() {
    local ns=$1 cgroup=$2
    shift 2
    if [ "$cgroup" = - ]; then
        nsenter --net="/run/netns/$ns" "$@"
    else
        bash -c 'echo $$ > "$0/cgroup.procs"; exec nsenter --net="/run/netns/$1" "${@:2}"' "$cgroup" "$ns" "$@"
    fi
}

# Waits until a log file says the gateway is ready (or shows it and fails).
wait_ready() {
    for _ in $(seq 200); do grep -q "gateway ready" "$1" 2>/dev/null && return 0; sleep 0.1; done
    cat "$1" >&2
    return 1
}
