#!/usr/bin/env bash
# One experiment run on a fresh netns testnet: PROVIDERS IDCs hold the image, one requester
# IDC with HOSTS hosts (plus its bridgehead) asks for it in random order with small random
# starts, under BIDS or Baseline. Appends one row to a CSV, writes details as JSON, checks
# every copy bit-exact, and tears everything down (trap) whatever happens.
#
#   run.sh --bin target/release/bids --image FILE --mode bids|baseline --csv runs.csv \
#          [--providers 4] [--provider-hosts 2] [--hosts 8] [--wan-mbit 10] [--delay-ms 15]
#          [--lan-mbit 200] [--chunk-bytes 258048] [--jitter-ms 2000] [--seed 1]
#          [--sweep bw|delay|lan|hosts] [--bridgehead-random 0|1] [--timeout-s 600]
#          [--keep-logs DIR]
#
# --bridgehead-random 1: the requester's bridgehead is one of the hosts started in random
# order with a random delay (by default it starts first, at once).
#
# Exit status: 0 when every host got a bit-exact copy and no process died, non-zero otherwise.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BIN="" IMAGE="" MODE="bids" CSV="" PROVIDERS=4 PROVIDER_HOSTS=2 HOSTS=8 WAN_MBIT=10
DELAY_MS=15 LAN_MBIT=200 CHUNK=258048 JITTER_MS=2000 SEED=1 SWEEP="" TIMEOUT_S=600
KEEP_LOGS="" BH_RANDOM=0
while (($#)); do
	case $1 in
	--bin) BIN=$2 ;;
	--image) IMAGE=$2 ;;
	--mode) MODE=$2 ;;
	--csv) CSV=$2 ;;
	--providers) PROVIDERS=$2 ;;
	--provider-hosts) PROVIDER_HOSTS=$2 ;;
	--hosts) HOSTS=$2 ;;
	--wan-mbit) WAN_MBIT=$2 ;;
	--delay-ms) DELAY_MS=$2 ;;
	--lan-mbit) LAN_MBIT=$2 ;;
	--chunk-bytes) CHUNK=$2 ;;
	--jitter-ms) JITTER_MS=$2 ;;
	--seed) SEED=$2 ;;
	--sweep) SWEEP=$2 ;;
	--timeout-s) TIMEOUT_S=$2 ;;
	--keep-logs) KEEP_LOGS=$2 ;;
	--bridgehead-random) BH_RANDOM=$2 ;;
	*) bn_die "unknown option $1" ;;
	esac
	shift 2
done
[[ -x $BIN ]] || bn_die "--bin must be the bids binary (got '$BIN')"
[[ -f $IMAGE ]] || bn_die "--image must be a file (got '$IMAGE')"
[[ -n $CSV ]] || bn_die "--csv is required"
mkdir -p "$(dirname "$CSV")"
[[ $MODE == bids || $MODE == baseline ]] || bn_die "--mode is bids or baseline"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
IMAGE=$(cd "$(dirname "$IMAGE")" && pwd)/$(basename "$IMAGE")

bn_names $$
BN_WORK=$(mktemp -d "${TMPDIR:-/tmp}/bidsnet-run.XXXXXX")
BN_PIDS_FILE="$BN_WORK/pids"
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	bn_down
	# A failed run keeps its logs beside the CSV unless told where.
	if ((rc != 0)) && [[ -z $KEEP_LOGS && -n $CSV ]]; then
		KEEP_LOGS=$(dirname "$CSV")/failed-logs-$$
		bn_log "logs kept in $KEEP_LOGS"
	fi
	if [[ -n $KEEP_LOGS ]]; then
		mkdir -p "$KEEP_LOGS"
		cp "$BN_WORK"/*.log "$BN_WORK"/*.out "$KEEP_LOGS"/ 2>/dev/null || true
	fi
	rm -rf "$BN_WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bn_clean_leftovers
export NO_COLOR=1
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
# Small JSON readers, so no jq is needed: the CLI's JSON is flat enough for text tools.
# Distinct peers of IDC $1 listed with a complete copy in a `bids lookup` answer.
# (awk, not grep: a grep that finds nothing fails the pipeline under pipefail, and the
# caller's fallback then appended a second "0" to wc's.)
complete_copies() {
	tr -d ' \n' | tr '{}' '\n\n' |
		awk -v idc="\"idc\":\"$1\"" '/"complete":true/ && index($0, idc) && match($0, /"peer":"[^"]*"/) {
			print substr($0, RSTART, RLENGTH)
		}' | sort -u | wc -l
}
# The first number named $1.
# (awk reads to the end: `head -1` could close the pipe on a writing grep, whose SIGPIPE
# status under pipefail made callers append a fallback "0" to the number.)
json_num() { tr -d ' \n' | grep -oE "\"$1\":[0-9]+" | awk -F: 'NR == 1 { print $2 }'; }
# Its arguments as a comma-separated list of JSON strings.
json_strings() {
	local first=1 a
	for a in "$@"; do
		((first)) || printf ','
		first=0
		printf '"%s"' "$(printf '%s' "$a" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
	done
}

# IDC k = 1..PROVIDERS hold the image; IDC R = PROVIDERS+1 requests it. Host 1 of every
# IDC is its certified bridgehead.
R=$((PROVIDERS + 1))
# DELAY_MS is the one-way delay between two IDCs (the paper's "WAN delay"); a path crosses
# two IDC links (the sender's and the receiver's), so each link carries half of it.
LINK_DELAY_MS=$(awk "BEGIN { print $DELAY_MS / 2 }")
BN_HOSTS=() BN_WAN_MBIT=() BN_DELAY_MS=()
for ((k = 1; k <= PROVIDERS; k++)); do
	BN_HOSTS+=("$PROVIDER_HOSTS")
	BN_WAN_MBIT+=("$WAN_MBIT")
	BN_DELAY_MS+=("$LINK_DELAY_MS")
done
BN_HOSTS+=($((HOSTS + 1)))
BN_WAN_MBIT+=("$WAN_MBIT")
BN_DELAY_MS+=("$LINK_DELAY_MS")
BN_BIN=$BIN
BN_LAN_MBIT=$LAN_MBIT
bn_up

# Identities and certificates.
K=$BN_WORK/keys
mkdir -p "$K"
ADMIN=$("$BIN" key gen --out "$K/admin.key")
"$BIN" key gen --out "$K/gis.key" >/dev/null
for ((k = 1; k <= R; k++)); do
	for ((j = 1; j <= BN_HOSTS[k - 1]; j++)); do
		peer=$("$BIN" key gen --out "$K/$k-$j.key")
		if ((j == 1)); then
			"$BIN" cert issue --admin-key "$K/admin.key" --peer "$peer" --idc "idc$k" \
				--db-id "idc$k-db1" --days 30 --out "$K/$k-$j.cert" >>"$BN_WORK/certs.log" 2>&1 ||
				bn_die "cert issue failed: $(tail -3 "$BN_WORK/certs.log")"
		fi
	done
done

# The GIS.
GIS_PORT=7000
bn_spawn "$BN_GIS_NS" gis "$BIN" gis --key "$K/gis.key" \
	--listen "/ip4/$BN_GIS_IP/tcp/$GIS_PORT" --data "$BN_WORK/gis-data" \
	--admin-peer "$ADMIN" --policy "$MODE"
GIS_PID=$BN_LAST_PID
bn_wait_line "$BN_WORK/gis.out" '/p2p/' "$GIS_PID" 20 || bn_die "the GIS did not start: $(tail -3 "$BN_WORK/gis.log")"
GIS_ADDR=$(grep -m1 '/p2p/' "$BN_WORK/gis.out")
bn_check_reachability "$GIS_PORT"

# Provider stores hold the image before their nodes start (the nodes publish it).
NAME=evalimg
REF=$NAME:1
ADD_PIDS=()
for ((k = 1; k <= PROVIDERS; k++)); do
	for ((j = 1; j <= PROVIDER_HOSTS; j++)); do
		"$BIN" image add "$IMAGE" --name "$NAME" --version 1 --store "$BN_WORK/s$k-$j" \
			--chunk-size "$CHUNK" >"$BN_WORK/add-$k-$j.log" 2>&1 &
		ADD_PIDS+=($!)
	done
done
for p in "${ADD_PIDS[@]}"; do
	wait "$p" || bn_die "importing the image failed: $(cat "$BN_WORK"/add-*.log | tail -3)"
done

# Nodes.
declare -A NODE_PID
for ((k = 1; k <= R; k++)); do
	for ((j = 1; j <= BN_HOSTS[k - 1]; j++)); do
		cert=()
		((j == 1)) && cert=(--cert "$K/$k-$j.cert")
		bn_spawn "$(bn_host_ns "$k" "$j")" "node-$k-$j" "$BIN" node \
			--key "$K/$k-$j.key" "${cert[@]}" --idc "idc$k" --gis "$GIS_ADDR" \
			--store "$BN_WORK/s$k-$j" --admin-peer "$ADMIN" --policy "$MODE" \
			--listen "/ip4/$(bn_host_ip "$k" "$j")/tcp/4001"
		NODE_PID[$k-$j]=$BN_LAST_PID
	done
done
for key in "${!NODE_PID[@]}"; do
	bn_wait_line "$BN_WORK/node-$key.out" '^/ip4/' "${NODE_PID[$key]}" 30 ||
		bn_die "node $key did not start: $(tail -3 "$BN_WORK/node-$key.log")"
done

# Wait until the GIS lists every provider copy as complete.
deadline=$((SECONDS + 60))
for ((k = 1; k <= PROVIDERS; k++)); do
	while :; do
		# A lookup that fails (the image is not listed yet) reads as no copies: wc still
		# prints its one number, so no fallback may add a second line.
		n=$({ ip netns exec "$BN_GIS_NS" "$BIN" lookup "$REF" --gis "$GIS_ADDR" --idc "idc$k" 2>/dev/null || true; } |
			complete_copies "idc$k")
		((n >= PROVIDER_HOSTS)) && break
		((SECONDS > deadline)) && bn_die "the GIS does not list the copies of IDC $k"
		sleep 0.3
	done
done
# An idle window (no fetch yet): the requester's nodes register and heartbeat, and the WAN
# traffic that is not image data (GIS, gossip, keep-alives) is measured as a rate.
RNS=$(bn_idc_ns "$R")
idle0=$(bn_counter "$RNS" wan rx_bytes)
sleep 3
idle_bps=$((($(bn_counter "$RNS" wan rx_bytes) - idle0) / 3))

SIZE=$(stat -c %s "$IMAGE")
bn_log "$MODE: $HOSTS hosts of idc$R fetch $((SIZE >> 10)) KiB; WAN $WAN_MBIT Mbit/s, IDC-to-IDC delay $DELAY_MS ms"
k_in0=$(bn_counter "$RNS" wan rx_bytes)
k_off0=$(bn_counter "$BN_ROUTER_NS" "wan$R" tx_bytes)
k_pk0=$(bn_counter "$RNS" wan rx_packets)
# The requester's bridgehead's upload, counted on its own veth (its LAN upload, plus the small
# WAN-bound traffic of its pull: requests and TCP acknowledgements).
BH_NS=$(bn_host_ns "$R" 1)
bh_tx0=$(bn_counter "$BH_NS" eth0 tx_bytes)

# The requester's bridgehead starts at once (it pulls the image into the IDC); the hosts in
# random order, each after a random delay of up to JITTER_MS.
RANDOM=$SEED
first=$((BH_RANDOM ? 1 : 2))
order=$(for ((j = first; j <= HOSTS + 1; j++)); do echo "$RANDOM $j"; done | sort -n | cut -d' ' -f2)
fetch() { # fetch J START_DELAY_MS
	local j=$1 d=$2 t0 t1 rc=0
	sleep "$(printf '%d.%03d' $((d / 1000)) $((d % 1000)))"
	t0=$(date +%s.%N)
	timeout "$TIMEOUT_S" "$BIN" image fetch "$REF" --store "$BN_WORK/s$R-$j" \
		--out "$BN_WORK/out-$j.raw" >"$BN_WORK/fetch-$j.log" 2>&1 || rc=$?
	t1=$(date +%s.%N)
	echo "$j $rc $t0 $t1 $d" >"$BN_WORK/fetch-$j.res"
}
T0=$(date +%s.%N)
FETCH_PIDS=()
if ((!BH_RANDOM)); then
	fetch 1 0 &
	FETCH_PIDS+=($!)
fi
for j in $order; do
	fetch "$j" $((RANDOM % (JITTER_MS + 1))) &
	FETCH_PIDS+=($!)
done
for p in "${FETCH_PIDS[@]}"; do wait "$p" || true; done
T1=$(date +%s.%N)

k_in=$(($(bn_counter "$RNS" wan rx_bytes) - k_in0))
k_off=$(($(bn_counter "$BN_ROUTER_NS" "wan$R" tx_bytes) - k_off0))
k_pk=$(($(bn_counter "$RNS" wan rx_packets) - k_pk0))
bh_tx=$(($(bn_counter "$BH_NS" eth0 tx_bytes) - bh_tx0))

# Results: a host's provision time is what its node reports for the fetch (request to
# complete and verified); every copy is compared with the source byte for byte.
fail=()
ptimes=()
lan_rates=()
bh_sent=0
nodes_in=0
makespan=0
hosts_json=()
for ((j = 1; j <= HOSTS + 1; j++)); do
	read -r _ rc t0 t1 d <"$BN_WORK/fetch-$j.res" || { rc=99 t0=0 t1=0 d=0; }
	secs=$(sed -nE 's/.*complete and verified in ([0-9.]+) s.*/\1/p' "$BN_WORK/fetch-$j.log" | tail -1)
	if ((rc != 0)) || [[ -z $secs ]]; then
		fail+=("host $j of idc$R: fetch failed (exit $rc): $(tail -2 "$BN_WORK/fetch-$j.log" | tr '\n' ' ')")
		secs=0
	elif ! cmp -s "$IMAGE" "$BN_WORK/out-$j.raw"; then
		fail+=("host $j of idc$R: copy is not bit-exact")
	fi
	rm -f "$BN_WORK/out-$j.raw"
	st=""
	if kill -0 "${NODE_PID[$R-$j]}" 2>/dev/null; then
		st=$("$BIN" image status "$REF" --store "$BN_WORK/s$R-$j" --json 2>/dev/null || true)
	fi
	w=$(json_num wan_recv_bytes <<<"$st")
	lan_in=$(json_num lan_recv_bytes <<<"$st")
	((j == 1)) && bh_sent=$(json_num lan_sent_bytes <<<"$st")
	# The host's mean LAN download rate over its provision time (Mbit/s).
	lan_rate=$(awk "BEGIN { print ($secs > 0) ? ${lan_in:-0} * 8 / $secs / 1e6 : 0 }")
	nodes_in=$((nodes_in + ${w:-0}))
	((j > 1)) && ptimes+=("$secs")
	# Completion since the bridgehead's start: the host's start delay plus its provision time.
	makespan=$(awk "BEGIN { e = $d / 1000 + $secs; print (e > $makespan) ? e : $makespan }")
	hosts_json+=("{\"host\":$j,\"bridgehead\":$([[ $j == 1 ]] && echo true || echo false),\"start_delay_ms\":$d,\"provision_s\":$secs,\"wall_s\":$(calc "$t1 - $t0"),\"wan_recv_bytes\":${w:-0},\"lan_recv_bytes\":${lan_in:-0},\"lan_recv_mbit_per_s\":$(printf '%.1f' "$lan_rate")}")
	if ((j > 1)); then
		lan_rates+=("$lan_rate")
	fi
done
# What the provider IDCs' nodes say they sent over the WAN.
prov_out=0
for ((k = 1; k <= PROVIDERS; k++)); do
	for ((j = 1; j <= PROVIDER_HOSTS; j++)); do
		w=$("$BIN" image status "$REF" --store "$BN_WORK/s$k-$j" --json 2>/dev/null |
			json_num wan_sent_bytes || echo 0)
		prov_out=$((prov_out + ${w:-0}))
	done
done
for key in "${!NODE_PID[@]}"; do
	kill -0 "${NODE_PID[$key]}" 2>/dev/null || fail+=("node $key died: $(tail -3 "$BN_WORK/node-$key.log" | tr '\n' ' ')")
done
kill -0 "$BN_LINKEMU_PID" 2>/dev/null || fail+=("the link emulator died")
kill -0 "$GIS_PID" 2>/dev/null || fail+=("the GIS died")

stats=$(printf '%s\n' "${ptimes[@]}" | awk '{s+=$1; if($1>m)m=$1; if(n==0||$1<mn)mn=$1; n++} END {printf "%.3f %.3f %.3f", s/n, m, mn}')
read -r mean max min <<<"$stats"
read -r lan_min lan_mean <<<"$(printf '%s\n' "${lan_rates[@]}" | awk '{s+=$1; if(n==0||$1<m)m=$1; n++} END {printf "%.1f %.1f", m, s/n}')"
bound=$(calc "$SIZE * 8 / ($WAN_MBIT * 1000000)")
wall=$(calc "$T1 - $T0")
verified=$([[ ${#fail[@]} == 0 ]] && echo 1 || echo 0)

# Stop the emulator now to read its own counters (drops) before teardown.
kill -TERM "$BN_LINKEMU_PID" 2>/dev/null || true
for _ in $(seq 30); do kill -0 "$BN_LINKEMU_PID" 2>/dev/null || break; sleep 0.1; done
drops=$(grep -oE '"(up|down)_dropped":[0-9]+' "$BN_WORK/linkemu.out" | awk -F: '{ s += $2 } END { print s + 0 }')

HEADER="mode,image_bytes,wan_mbit,delay_ms,hosts,provision_s_mean,provision_s_max,wan_in_bytes_kernel,wan_in_bytes_nodes,sweep,chunk_bytes,provision_s_min,bound_s,wan_offered_bytes_kernel,wan_in_packets_kernel,emu_drops,wall_s,providers,verified,wan_in_idle_bytes_per_s,provider_wan_sent_bytes_nodes,makespan_s,lan_mbit,bridgehead_random,bridgehead_up_bytes_kernel,bridgehead_lan_sent_bytes_nodes,bridgehead_up_x_image_kernel,bridgehead_lan_sent_x_image_nodes,host_lan_mbit_min,host_lan_mbit_mean"
[[ -s $CSV ]] || echo "$HEADER" >"$CSV"
printf '%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%.3f,%s,%s,%s,%.3f,%s,%s,%s,%s,%.3f,%s,%s,%s,%s,%s,%s,%s,%s\n' "$MODE" "$SIZE" \
	"$WAN_MBIT" "$DELAY_MS" "$HOSTS" "$mean" "$max" "$k_in" "$nodes_in" "$SWEEP" "$CHUNK" "$min" \
	"$bound" "$k_off" "$k_pk" "$drops" "$wall" "$PROVIDERS" "$verified" "$idle_bps" "$prov_out" \
	"$makespan" "$LAN_MBIT" "$BH_RANDOM" "$bh_tx" "${bh_sent:-0}" "$(calc "$bh_tx / $SIZE")" \
	"$(calc "${bh_sent:-0} / $SIZE")" "$lan_min" "$lan_mean" >>"$CSV"
{
	printf '{"mode":"%s","image_bytes":%s,"wan_mbit":%s,"delay_ms":%s,"hosts":%s,"providers":%s,' \
		"$MODE" "$SIZE" "$WAN_MBIT" "$DELAY_MS" "$HOSTS" "$PROVIDERS"
	printf '"wan_in_bytes_kernel":%s,"wan_offered_bytes_kernel":%s,"wan_in_bytes_nodes":%s,' "$k_in" "$k_off" "$nodes_in"
	printf '"failures":[%s],"hosts_detail":[%s]}\n' "$(json_strings "${fail[@]}")" \
		"$(
			IFS=,
			echo "${hosts_json[*]}"
		)"
} >>"${CSV%.csv}.jsonl"

bn_log "$MODE done: mean $mean s, last $max s (S/B $(printf '%.2f' "$bound") s); WAN in: kernel $k_in B, nodes $nodes_in B (image $SIZE B); drops $drops; bridgehead upload: kernel $(calc "$bh_tx / $SIZE") x image, node $(calc "${bh_sent:-0} / $SIZE") x image; hosts' LAN download $lan_min-$lan_mean Mbit/s (min-mean)"
if ((${#fail[@]})); then
	for f in "${fail[@]}"; do bn_log "FAIL: $f"; done
	exit 1
fi
