# shellcheck shell=bash
# The netns testnet's building blocks, sourced by up.sh, down.sh, run.sh and eval.sh: one
# multi-IDC network of Linux network namespaces (per IDC a bridge and host namespaces, a WAN
# router joined to each IDC through the userspace link emulator, a GIS namespace), and its
# teardown. Starting BIDS processes and measuring is left to run.sh.
#
# Names: every namespace is "bidsnet-<owner pid>-<role>", so a namespace whose owner is gone
# is a leftover of a crashed run and is removed by bn_clean_leftovers; parallel runs never
# touch each other's namespaces.
#
# Addresses (private, only inside these namespaces; nothing routes to the host's network):
#   GIS            10.200.0.2/24  (router side 10.200.0.1)
#   IDC k (1..)    10.200.k.0/24: gateway/bridge 10.200.k.1, host j (1..) 10.200.k.(10+j)
# Links: host <-> IDC bridge by veth, tbf at LAN rate on both ends; IDC gateway <-> router by
# two TUN devices and `bids testnet linkemu` (rate + one-way delay each way, in the router).

BN_NS_PREFIX=bidsnet

bn_log() { printf '[netns %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bn_die() {
	bn_log "error: $*"
	exit 1
}

# bn_names OWNER: sets the namespace names of the network owned by process OWNER.
bn_names() {
	BN_OWNER=$1
	BN_P="${BN_NS_PREFIX}-${BN_OWNER}"
	BN_GIS_NS="${BN_P}-gis"
	BN_ROUTER_NS="${BN_P}-wan"
}
bn_idc_ns() { printf '%s-i%s' "$BN_P" "$1"; }
bn_host_ns() { printf '%s-i%sh%s' "$BN_P" "$1" "$2"; }
bn_host_ip() { printf '10.200.%s.%s' "$1" "$((10 + $2))"; }
BN_GIS_IP=10.200.0.2

# Every namespace of owner OWNER (all owners when OWNER is empty).
bn_list_ns() {
	local pat="^${BN_NS_PREFIX}-${1:-[0-9]+}-"
	ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$pat" || true
}

# Kills what runs inside a namespace (TERM, then KILL after 3 s) and deletes it.
bn_ns_destroy() {
	local ns=$1 pids i
	pids=$(ip netns pids "$ns" 2>/dev/null || true)
	if [[ -n $pids ]]; then
		# shellcheck disable=SC2086
		kill -TERM $pids 2>/dev/null || true
		for i in $(seq 30); do
			pids=$(ip netns pids "$ns" 2>/dev/null || true)
			[[ -z $pids ]] && break
			sleep 0.1
		done
		# shellcheck disable=SC2086
		[[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
	fi
	ip netns del "$ns" 2>/dev/null || true
}

# Removes the namespaces of owners that no longer run (a crashed or killed earlier run).
bn_clean_leftovers() {
	local ns owner
	for ns in $(bn_list_ns ""); do
		owner=${ns#"${BN_NS_PREFIX}-"}
		owner=${owner%%-*}
		if ! kill -0 "$owner" 2>/dev/null; then
			bn_log "removing leftover namespace $ns (owner $owner is gone)"
			bn_ns_destroy "$ns"
		fi
	done
}

# Tears down everything of the current owner: recorded processes first (so nodes stop
# before their links vanish), then every namespace. Safe to call twice.
bn_down() {
	local pid ns
	if [[ -n ${BN_PIDS_FILE:-} && -f $BN_PIDS_FILE ]]; then
		while read -r pid; do
			[[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null || true
		done <"$BN_PIDS_FILE"
		for _ in $(seq 30); do
			local alive=0
			while read -r pid; do
				[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1
			done <"$BN_PIDS_FILE"
			[[ $alive == 0 ]] && break
			sleep 0.1
		done
		while read -r pid; do
			[[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
		done <"$BN_PIDS_FILE"
		: >"$BN_PIDS_FILE"
	fi
	for ns in $(bn_list_ns "$BN_OWNER"); do
		bn_ns_destroy "$ns"
	done
}

bn_ns_new() {
	local ns=$1
	ip netns add "$ns" || bn_die "cannot create namespace $ns"
	ip -n "$ns" link set lo up
	# Forwarding for gateways and the router; no reverse-path filter, whose asymmetric-route
	# heuristics would drop packets that arrive over TUN devices.
	ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
		net.ipv4.conf.default.rp_filter=0 >/dev/null
}

# tbf at RATE Mbit/s on DEV in NS. Burst: at least one 10 ms slice of the rate (tbf needs
# burst >= rate/HZ) and never below 32 KiB.
bn_tbf() {
	local ns=$1 dev=$2 mbit=$3 burst
	burst=$((mbit * 1000000 / 8 / 100))
	((burst < 32768)) && burst=32768
	ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "${mbit}mbit" \
		burst "$burst" latency 50ms
}

# Runs a command in the background inside a namespace and records its pid; its stdout goes
# to BN_WORK/NAME.out, its stderr (logs) to BN_WORK/NAME.log.
#   bn_spawn NS NAME CMD...   (sets BN_LAST_PID)
bn_spawn() {
	local ns=$1 name=$2
	shift 2
	# `ip netns exec` execs the command, so $! is the command's own pid.
	ip netns exec "$ns" "$@" >"$BN_WORK/$name.out" 2>"$BN_WORK/$name.log" &
	BN_LAST_PID=$!
	echo "$BN_LAST_PID" >>"$BN_PIDS_FILE"
}

# Waits until FILE has a line matching REGEX (or PID died, or TIMEOUT s passed).
bn_wait_line() {
	local file=$1 regex=$2 pid=$3 timeout=$4 t=0
	while ! grep -qE "$regex" "$file" 2>/dev/null; do
		kill -0 "$pid" 2>/dev/null || return 1
		sleep 0.1
		t=$((t + 1))
		((t > timeout * 10)) && return 1
	done
	return 0
}

# The kernel's ARP table is one for all network namespaces, and its hard limit
# (net.ipv4.neigh.default.gc_thresh3, 1024 by default) is reached by an IDC of about 32
# hosts that all talk to each other: each host holds an entry per peer. Past it, new ARP
# resolutions fail in every namespace ("neighbor table overflow" in the kernel log), and the
# whole testnet, GIS and other IDCs included, goes silent. Raise the limits to what this
# testnet needs (never lowered again: another testnet may run beside this one).
bn_neigh_room() {
	local need=256 h cur
	for h in "${BN_HOSTS[@]}"; do
		need=$((need + (h + 1) * (h + 2)))
	done
	cur=$(cat /proc/sys/net/ipv4/neigh/default/gc_thresh3)
	if ((cur < 2 * need)); then
		bn_log "raising the kernel's ARP table limits to $need / $((2 * need)) entries (was gc_thresh3 $cur)"
		{ echo "$((2 * need))" >/proc/sys/net/ipv4/neigh/default/gc_thresh3 &&
			echo "$need" >/proc/sys/net/ipv4/neigh/default/gc_thresh2; } 2>/dev/null ||
			bn_log "could not raise the ARP table limits; more than ~30 hosts per IDC may stall"
	fi
}

# bn_up: builds the network. Inputs (variables):
#   BN_BIN          the bids binary
#   BN_WORK         a directory for logs
#   BN_HOSTS=(…)    hosts per IDC, IDC k = index k-1
#   BN_WAN_MBIT=(…) WAN rate per IDC link;  BN_DELAY_MS=(…) one-way delay per IDC link
#   BN_LAN_MBIT     LAN rate per host link (default 200)
bn_up() {
	local nidc=${#BN_HOSTS[@]} k j ns hns links=()
	local lan=${BN_LAN_MBIT:-200}
	[[ -n ${BN_OWNER:-} ]] || bn_die "bn_names was not called"
	BN_PIDS_FILE="$BN_WORK/pids"
	: >"$BN_PIDS_FILE"
	bn_log "building $nidc IDCs (hosts: ${BN_HOSTS[*]}; WAN Mbit/s: ${BN_WAN_MBIT[*]}; delay ms: ${BN_DELAY_MS[*]}; LAN ${lan} Mbit/s)"
	bn_neigh_room
	bn_ns_new "$BN_ROUTER_NS"
	bn_ns_new "$BN_GIS_NS"
	# The GIS hangs off the router by a plain veth: its traffic crosses the WAN link of the
	# IDC it talks to, like a remote index server's.
	ip -n "$BN_ROUTER_NS" link add vgis type veth peer name eth0 netns "$BN_GIS_NS"
	ip -n "$BN_ROUTER_NS" addr add 10.200.0.1/24 dev vgis
	ip -n "$BN_ROUTER_NS" link set vgis up
	ip -n "$BN_GIS_NS" addr add "$BN_GIS_IP/24" dev eth0
	ip -n "$BN_GIS_NS" link set eth0 up
	ip -n "$BN_GIS_NS" route add 10.200.0.0/16 via 10.200.0.1
	for ((k = 1; k <= nidc; k++)); do
		ns=$(bn_idc_ns "$k")
		bn_ns_new "$ns"
		ip -n "$ns" link add br0 type bridge
		ip -n "$ns" addr add "10.200.$k.1/24" dev br0
		ip -n "$ns" link set br0 up
		for ((j = 1; j <= BN_HOSTS[k - 1]; j++)); do
			hns=$(bn_host_ns "$k" "$j")
			bn_ns_new "$hns"
			ip -n "$ns" link add "h$j" type veth peer name eth0 netns "$hns"
			ip -n "$ns" link set "h$j" master br0 up
			ip -n "$hns" addr add "$(bn_host_ip "$k" "$j")/24" dev eth0
			ip -n "$hns" link set eth0 up
			ip -n "$hns" route add 10.200.0.0/16 via "10.200.$k.1"
			# Both directions of the host's LAN link: its upload and its download.
			bn_tbf "$hns" eth0 "$lan"
			bn_tbf "$ns" "h$j" "$lan"
		done
		links+=(--link "ns=$ns,dev=wan,peer=wan$k,mbit=${BN_WAN_MBIT[k - 1]},delay_ms=${BN_DELAY_MS[k - 1]}")
	done
	bn_spawn "$BN_ROUTER_NS" linkemu "$BN_BIN" testnet linkemu "${links[@]}"
	BN_LINKEMU_PID=$BN_LAST_PID
	bn_wait_line "$BN_WORK/linkemu.out" '^ready$' "$BN_LINKEMU_PID" 20 ||
		bn_die "the link emulator did not start: $(tail -5 "$BN_WORK/linkemu.log")"
	for ((k = 1; k <= nidc; k++)); do
		ns=$(bn_idc_ns "$k")
		ip -n "$ns" link set wan up
		ip -n "$ns" route add 10.200.0.0/16 dev wan
		ip -n "$BN_ROUTER_NS" link set "wan$k" up
		ip -n "$BN_ROUTER_NS" route add "10.200.$k.0/24" dev "wan$k"
	done
}

# Kernel byte counter of DEV in NS (rx_bytes or tx_bytes).
bn_counter() {
	ip netns exec "$1" cat "/sys/class/net/$2/statistics/$3"
}

# Checks that every host reaches TCP port PORT of the GIS (through its IDC's bridge, gateway,
# WAN link emulator and the router): no ping here, bash's /dev/tcp is enough.
bn_check_reachability() {
	local port=$1 nidc=${#BN_HOSTS[@]} k j
	for ((k = 1; k <= nidc; k++)); do
		for ((j = 1; j <= BN_HOSTS[k - 1]; j++)); do
			ip netns exec "$(bn_host_ns "$k" "$j")" timeout 5 bash -c \
				"exec 3<>/dev/tcp/$BN_GIS_IP/$port" 2>/dev/null ||
				bn_die "host $j of IDC $k cannot reach the GIS at $BN_GIS_IP:$port"
		done
	done
}
