#!/usr/bin/env bash
# One experiment run on a fresh netns testnet: PROVIDERS IDCs hold the image, REQUESTERS
# IDCs (one by default) with HOSTS hosts each (plus their bridgehead) ask for it in random
# order with small random starts, under BIDS or Baseline. Appends one row to a CSV, writes details as JSON, checks
# every copy bit-exact, and tears everything down (trap) whatever happens.
#
#   run.sh --bin target/release/bids --image FILE --mode bids|baseline --csv runs.csv \
#          [--providers 4] [--provider-hosts 2] [--hosts 8] [--wan-mbit 10] [--delay-ms 15]
#          [--lan-mbit 200] [--chunk-bytes 258048|default] [--jitter-ms 2000] [--seed 1]
#          [--sweep bw|delay|lan|hosts] [--bridgehead-random 0|1] [--timeout-s 600]
#          [--faults 0|1] [--wan-window-ms MS] [--keep-logs DIR] [--requesters 1]
#          [--raw-tcp 1|0]
#
# --requesters N: N IDCs fetch the image at once (their bridgeheads trade chunks over the
# WAN). The CSV's WAN figures are then those of the IDC that took the most, its times
# those of all requesting hosts; the bridgehead-upload figures are the first requester's.
#
# --raw-tcp 1 (the default): before the fetches, the image's size is pulled by plain TCP
# (`bids testnet tcp-ref`) from the providers' first hosts into the requester's bridgehead
# host, split over them, all at once: the same WAN path and sources as the bridgehead's pull.
# Its time goes to the CSV (`raw_tcp_s`); a fetch's time over it is what BIDS costs on top
# of what TCP gets out of the link, which the bound S/B_wan leaves out.
#
# --bridgehead-random 1: the requester's bridgehead is one of the hosts started in random
# order with a random delay (by default it starts first, at once).
#
# --faults 1: ordinary faults at random times (seeded by --seed) while the hosts fetch: the
# GIS, one provider IDC's bridgehead and one requesting host are SIGKILLed and restarted a
# few seconds later (same keys, stores and addresses); one provider IDC's stored copies rot
# (one flipped byte in each of several chunks) at host 2, which re-hashes what it serves and
# scrubs, and at its bridgehead, a corrupting peer that serves them unchecked (the
# requester's bridgehead must ban it and fetch elsewhere); one requesting host's store sits on its own
# tmpfs, which fills up for a few seconds mid-download. A fetch that fails is started again
# until it succeeds or --timeout-s passes. Afterwards every copy listed complete by the GIS
# is checked against its store (`bids image verify`). The faults injected go to the CSV
# (`faults`, `gis_listed_not_held`) and the JSON details.
#
# Exit status: 0 when every host got a bit-exact copy and no process died, non-zero otherwise.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BIN="" IMAGE="" MODE="bids" CSV="" PROVIDERS=4 PROVIDER_HOSTS=2 HOSTS=8 WAN_MBIT=10
DELAY_MS=15 LAN_MBIT=200 CHUNK=258048 JITTER_MS=2000 SEED=1 SWEEP="" TIMEOUT_S=600
KEEP_LOGS="" BH_RANDOM=0 FAULTS=0 WAN_WINDOW_MS="" REQUESTERS=1 RAW_TCP=1
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
	--faults) FAULTS=$2 ;;
	--wan-window-ms) WAN_WINDOW_MS=$2 ;;
	--requesters) REQUESTERS=$2 ;;
	--raw-tcp) RAW_TCP=$2 ;;
	*) bn_die "unknown option $1" ;;
	esac
	shift 2
done
[[ -x $BIN ]] || bn_die "--bin must be the bids binary (got '$BIN')"
[[ -f $IMAGE ]] || bn_die "--image must be a file (got '$IMAGE')"
[[ -n $CSV ]] || bn_die "--csv is required"
mkdir -p "$(dirname "$CSV")"
[[ $MODE == bids || $MODE == baseline ]] || bn_die "--mode is bids or baseline"
[[ $REQUESTERS =~ ^[1-9][0-9]*$ ]] || bn_die "--requesters must be a positive number"
((FAULTS && REQUESTERS > 1)) && bn_die "--faults 1 runs with one requesting IDC (--requesters 1)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
IMAGE=$(cd "$(dirname "$IMAGE")" && pwd)/$(basename "$IMAGE")

bn_names $$
BN_WORK=$(mktemp -d "${TMPDIR:-/tmp}/bidsnet-run.XXXXXX")
BN_PIDS_FILE="$BN_WORK/pids"
DISK_MNT=""
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	bn_down
	[[ -n $DISK_MNT ]] && umount -l "$DISK_MNT" 2>/dev/null || true
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

# IDC k = 1..PROVIDERS hold the image; IDCs R = PROVIDERS+1 .. RL request it. Host 1 of
# every IDC is its certified bridgehead.
R=$((PROVIDERS + 1))
RL=$((PROVIDERS + REQUESTERS))
# DELAY_MS is the one-way delay between two IDCs (the paper's "WAN delay"); a path crosses
# two IDC links (the sender's and the receiver's), so each link carries half of it.
LINK_DELAY_MS=$(awk "BEGIN { print $DELAY_MS / 2 }")
BN_HOSTS=() BN_WAN_MBIT=() BN_DELAY_MS=()
for ((k = 1; k <= PROVIDERS; k++)); do
	BN_HOSTS+=("$PROVIDER_HOSTS")
	BN_WAN_MBIT+=("$WAN_MBIT")
	BN_DELAY_MS+=("$LINK_DELAY_MS")
done
for ((k = R; k <= RL; k++)); do
	BN_HOSTS+=($((HOSTS + 1)))
	BN_WAN_MBIT+=("$WAN_MBIT")
	BN_DELAY_MS+=("$LINK_DELAY_MS")
done
BN_BIN=$BIN
BN_LAN_MBIT=$LAN_MBIT
bn_up

# Identities and certificates.
K=$BN_WORK/keys
mkdir -p "$K"
ADMIN=$("$BIN" key gen --out "$K/admin.key")
"$BIN" key gen --out "$K/gis.key" >/dev/null
declare -A PEER_OF
for ((k = 1; k <= RL; k++)); do
	for ((j = 1; j <= BN_HOSTS[k - 1]; j++)); do
		peer=$("$BIN" key gen --out "$K/$k-$j.key")
		PEER_OF[$k-$j]=$peer
		if ((j == 1)); then
			"$BIN" cert issue --admin-key "$K/admin.key" --peer "$peer" --idc "idc$k" \
				--db-id "idc$k-db1" --days 30 --out "$K/$k-$j.cert" >>"$BN_WORK/certs.log" 2>&1 ||
				bn_die "cert issue failed: $(tail -3 "$BN_WORK/certs.log")"
		fi
	done
done

# The GIS.
GIS_PORT=7000
# spawn_gis NAME: the GIS (again, after a fault: same key, data and address).
spawn_gis() {
	bn_spawn "$BN_GIS_NS" "$1" "$BIN" gis --key "$K/gis.key" \
		--listen "/ip4/$BN_GIS_IP/tcp/$GIS_PORT" --data "$BN_WORK/gis-data" \
		--admin-peer "$ADMIN" --policy "$MODE"
}
spawn_gis gis
GIS_PID=$BN_LAST_PID
bn_wait_line "$BN_WORK/gis.out" '/p2p/' "$GIS_PID" 20 || bn_die "the GIS did not start: $(tail -3 "$BN_WORK/gis.log")"
GIS_ADDR=$(grep -m1 '/p2p/' "$BN_WORK/gis.out")
bn_check_reachability "$GIS_PORT"

# Provider stores hold the image before their nodes start (the nodes publish it).
NAME=evalimg
REF=$NAME:1
ADD_PIDS=()
# --chunk-bytes default: no --chunk-size, so `bids image add` cuts the image at its own default.
CHUNK_ARGS=(--chunk-size "$CHUNK")
[[ $CHUNK == default ]] && CHUNK_ARGS=()
for ((k = 1; k <= PROVIDERS; k++)); do
	for ((j = 1; j <= PROVIDER_HOSTS; j++)); do
		"$BIN" image add "$IMAGE" --name "$NAME" --version 1 --store "$BN_WORK/s$k-$j" \
			"${CHUNK_ARGS[@]}" >"$BN_WORK/add-$k-$j.log" 2>&1 &
		ADD_PIDS+=($!)
	done
done
for p in "${ADD_PIDS[@]}"; do
	wait "$p" || bn_die "importing the image failed: $(cat "$BN_WORK"/add-*.log | tail -3)"
done
if [[ $CHUNK == default ]]; then
	CHUNK=$("$BIN" image status "$REF" --store "$BN_WORK/s1-1" --json | json_num chunk_size)
	[[ $CHUNK =~ ^[0-9]+$ ]] || bn_die "could not read the image's chunk size"
fi

SIZE=$(stat -c %s "$IMAGE")
# With faults, one requesting host's store has a tmpfs of its own, with room for the image
# and its index and little more: the fault fills it mid-download.
DISK_HOST=0
if ((FAULTS)); then
	RANDOM=$((SEED + 7919))
	DISK_HOST=$((2 + RANDOM % HOSTS))
	DISK_MNT=$BN_WORK/s$R-$DISK_HOST
	mkdir -p "$DISK_MNT"
	mount -t tmpfs -o size=$((SIZE + (48 << 20))) bids-faults "$DISK_MNT" ||
		bn_die "cannot mount a tmpfs for the disk-full fault"
fi

# Nodes. spawn_node K J NAME: host J of IDC K (again, after a fault: same key, store and
# address).
NODE_EXTRA=()
[[ -n $WAN_WINDOW_MS ]] && NODE_EXTRA+=(--wan-window-ms "$WAN_WINDOW_MS")
# With faults, the bridgehead of provider IDC ROT_K is the corrupting peer: its copy rots
# like host 2's of that IDC, but it serves without re-hashing (--no-verify-reads) and
# scrubs slowly (2 MB/s), so rotten chunks reach the requester's bridgehead until its own
# scrub finds them.
ROT_K=$((SEED % PROVIDERS + 1))
spawn_node() {
	local k=$1 j=$2 cert=() extra=("${NODE_EXTRA[@]}")
	((j == 1)) && cert=(--cert "$K/$k-$j.cert")
	if ((FAULTS && k == ROT_K && j == 1)); then
		extra+=(--no-verify-reads --scrub-rate 2)
	elif ((FAULTS)); then
		extra+=(--scrub-rate 64)
	fi
	bn_spawn "$(bn_host_ns "$k" "$j")" "$3" "$BIN" node \
		--key "$K/$k-$j.key" "${cert[@]}" --idc "idc$k" --gis "$GIS_ADDR" \
		--store "$BN_WORK/s$k-$j" --admin-peer "$ADMIN" --policy "$MODE" \
		--listen "/ip4/$(bn_host_ip "$k" "$j")/tcp/4001" "${extra[@]}"
}
declare -A NODE_PID
for ((k = 1; k <= RL; k++)); do
	for ((j = 1; j <= BN_HOSTS[k - 1]; j++)); do
		spawn_node "$k" "$j" "node-$k-$j"
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

# The raw-TCP reference (--raw-tcp 1), before any counter of the fetch is read.
RAW_TCP_S=""
if ((RAW_TCP)); then
	srcs=() tcpref_pids=()
	for ((k = 1; k <= PROVIDERS; k++)); do
		bn_spawn "$(bn_host_ns "$k" 1)" "tcpref-$k" "$BIN" testnet tcp-ref \
			--serve "$(bn_host_ip "$k" 1):4109"
		tcpref_pids+=("$BN_LAST_PID")
		bn_wait_line "$BN_WORK/tcpref-$k.out" '^ready$' "$BN_LAST_PID" 10 ||
			bn_die "the raw-TCP reference server of idc$k did not start: $(tail -3 "$BN_WORK/tcpref-$k.log")"
		srcs+=(--fetch "$(bn_host_ip "$k" 1):4109")
	done
	ref=$(ip netns exec "$(bn_host_ns "$R" 1)" "$BIN" testnet tcp-ref "${srcs[@]}" --bytes "$SIZE") ||
		bn_die "the raw-TCP reference transfer failed"
	RAW_TCP_S=$(grep -oE '"secs":[0-9.]+' <<<"$ref" | cut -d: -f2)
	kill -TERM "${tcpref_pids[@]}" 2>/dev/null || true
	bn_log "raw TCP reference: $SIZE B from $PROVIDERS source(s) in $RAW_TCP_S s ($(calc "$RAW_TCP_S * $WAN_MBIT * 1000000 / ($SIZE * 8)") x S/B_wan)"
	sleep 1
fi
bn_log "$MODE: $HOSTS hosts of idc$R..idc$RL fetch $((SIZE >> 10)) KiB; WAN $WAN_MBIT Mbit/s, IDC-to-IDC delay $DELAY_MS ms"
# Per requesting IDC: bytes (and packets) into it, by its own side and by the router's.
declare -A K_IN0 K_OFF0 K_PK0
for ((k = R; k <= RL; k++)); do
	K_IN0[$k]=$(bn_counter "$(bn_idc_ns "$k")" wan rx_bytes)
	K_OFF0[$k]=$(bn_counter "$BN_ROUTER_NS" "wan$k" tx_bytes)
	K_PK0[$k]=$(bn_counter "$(bn_idc_ns "$k")" wan rx_packets)
done
# The requester's bridgehead's upload, counted on its own veth (its LAN upload, plus the small
# WAN-bound traffic of its pull: requests and TCP acknowledgements).
BH_NS=$(bn_host_ns "$R" 1)
bh_tx0=$(bn_counter "$BH_NS" eth0 tx_bytes)

# Each requester's bridgehead starts at once (it pulls the image into the IDC); the hosts in
# random order, each after a random delay of up to JITTER_MS.
# Every draw is made in this shell, not in a subshell (which bash reseeds), so a seed gives
# the same order and delays every time.
RANDOM=$SEED
first=$((BH_RANDOM ? 1 : 2))
declare -A ORDER
for ((k = R; k <= RL; k++)); do
	keys=()
	for ((j = first; j <= HOSTS + 1; j++)); do keys+=("$RANDOM $j"); done
	ORDER[$k]=$(printf '%s\n' "${keys[@]}" | sort -n | cut -d' ' -f2)
done
fetch() { # fetch K J START_DELAY_MS: host J of requesting IDC K
	local k=$1 j=$2 d=$3 t0 t1 rc=0 tries=1 end
	sleep "$(printf '%d.%03d' $((d / 1000)) $((d % 1000)))"
	t0=$(date +%s.%N)
	end=$((SECONDS + TIMEOUT_S))
	while :; do
		rc=0
		timeout "$((end - SECONDS))" "$BIN" image fetch "$REF" --store "$BN_WORK/s$k-$j" \
			--out "$BN_WORK/out-$k-$j.raw" >>"$BN_WORK/fetch-$k-$j.log" 2>&1 || rc=$?
		# With faults, a fetch that failed (its node was killed, its disk was full) is
		# started again, as an operator's script would, until the run's time is up.
		((rc == 0 || !FAULTS || SECONDS + 2 >= end)) && break
		echo "[attempt $tries failed with exit $rc; starting the fetch again]" >>"$BN_WORK/fetch-$k-$j.log"
		tries=$((tries + 1))
		sleep 1
	done
	t1=$(date +%s.%N)
	echo "$j $rc $t0 $t1 $d $tries" >"$BN_WORK/fetch-$k-$j.res"
}
# The fault injector (with --faults 1), a background job of its own: it logs each fault to
# faults.log ("<s since the fetches started> <fault>") and each process it started again to
# respawned ("<node key or gis> <pid>").
nap_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }
# rnd LO HI: a number in [LO, HI] into R_ (no subshell: bash reseeds $RANDOM in subshells,
# and every draw here comes from the run's seed).
rnd() { R_=$(($1 + RANDOM % ($2 - $1 + 1))); }
# rnd_in_chunk C: a random byte offset inside chunk C of the image into R_.
rnd_in_chunk() {
	rnd 0 $((($1 + 1) * CHUNK > SIZE ? SIZE - $1 * CHUNK - 1 : CHUNK - 1))
	R_=$(($1 * CHUNK + R_))
}
# flip FILE OFFSET…: inverts the byte at each offset of FILE in place; prints how many.
flip() {
	local img=$1 c b n=0
	shift
	for c; do
		b=$(od -An -tu1 -j "$c" -N1 "$img" | tr -d ' ')
		printf "\\x$(printf %02x $((255 - b)))" |
			dd of="$img" bs=1 seek="$c" conv=notrunc status=none && n=$((n + 1))
	done
	echo "$n"
}
inject_faults() {
	local b_ms lo hi k nch c f=0
	local t_gis d_gis t_bh d_bh k_bh t_host d_host j_host t_rot k_rot t_disk d_disk offs=() all=()
	RANDOM=$((SEED * 31 + 5))
	b_ms=$(awk "BEGIN { printf \"%d\", $SIZE * 8 / ($WAN_MBIT * 1000) }")
	# Each fault at its own random time within the first 60 % of the bound S/B_wan.
	lo=$((b_ms / 10)) hi=$((b_ms * 6 / 10))
	rnd "$lo" "$hi"; t_gis=$R_; rnd 2000 5000; d_gis=$R_
	rnd "$lo" "$hi"; t_bh=$R_; rnd 2000 5000; d_bh=$R_; rnd 1 "$PROVIDERS"; k_bh=$R_
	rnd "$lo" "$hi"; t_host=$R_; rnd 1000 3000; d_host=$R_; rnd 2 $((HOSTS + 1)); j_host=$R_
	((j_host == DISK_HOST)) && j_host=$((j_host == HOSTS + 1 ? 2 : j_host + 1))
	rnd 0 "$hi"; t_rot=$R_; k_rot=$ROT_K
	rnd "$lo" "$hi"; t_disk=$R_; rnd 3000 6000; d_disk=$R_
	# Bit rot: one byte in each of up to 8 chunks, spread over the image.
	nch=$(((SIZE + CHUNK - 1) / CHUNK))
	for ((c = 0; c < nch && ${#offs[@]} < 8; c += 1 + nch / 8)); do
		rnd_in_chunk "$c"
		offs+=("$R_")
	done
	# The corrupting peer's whole copy goes bad: one byte in every chunk.
	for ((c = 0; c < nch; c++)); do
		rnd_in_chunk "$c"
		all+=("$R_")
	done
	flog() { echo "$(calc "$(date +%s.%N) - $T0") $*" >>"$BN_WORK/faults.log"; }
	{
		nap_ms "$t_gis"
		flog "SIGKILL gis"
		kill -KILL "$GIS_PID" 2>/dev/null || true
		nap_ms "$d_gis"
		spawn_gis gis-2
		echo "gis $BN_LAST_PID" >>"$BN_WORK/respawned"
		flog "restarted gis"
	} &
	{
		nap_ms "$t_bh"
		flog "SIGKILL bridgehead of idc$k_bh"
		kill -KILL "${NODE_PID[$k_bh-1]}" 2>/dev/null || true
		nap_ms "$d_bh"
		spawn_node "$k_bh" 1 "node-$k_bh-1-2"
		echo "$k_bh-1 $BN_LAST_PID" >>"$BN_WORK/respawned"
		flog "restarted bridgehead of idc$k_bh"
	} &
	{
		nap_ms "$t_host"
		flog "SIGKILL host $j_host of idc$R"
		kill -KILL "${NODE_PID[$R-$j_host]}" 2>/dev/null || true
		nap_ms "$d_host"
		spawn_node "$R" "$j_host" "node-$R-$j_host-2"
		echo "$R-$j_host $BN_LAST_PID" >>"$BN_WORK/respawned"
		flog "restarted host $j_host of idc$R"
	} &
	{
		# Under the running nodes: host 2 of the IDC (the rot found by re-hashing reads and
		# the scrub), then its bridgehead (the corrupting peer).
		nap_ms "$t_rot"
		f=$(flip "$(find "$BN_WORK/s$k_rot-2/images" -name '*.img' | head -1)" "${offs[@]}")
		flog "bit rot: $f bytes flipped in $f chunks of host 2 of idc$k_rot"
		f=$(flip "$(find "$BN_WORK/s$k_rot-1/images" -name '*.img' | head -1)" "${all[@]}")
		flog "corrupting peer: $f chunks rotted at the bridgehead of idc$k_rot, which serves them unchecked"
	} &
	{
		# The disk of one requesting host fills for a few seconds: a file takes all but
		# 256 KiB of its tmpfs, then goes.
		# (The node writes meanwhile: a filler that no longer fits is tried smaller, and
		# nothing here may end this job before the filler is gone again.)
		local free=0 took=0 margin
		nap_ms "$t_disk"
		for margin in 262144 1048576 4194304 16777216; do
			free=$(df -B1 --output=avail "$DISK_MNT" | tail -1)
			((free > margin)) || break
			if fallocate -l $((free - margin)) "$DISK_MNT/filler" 2>/dev/null; then
				took=$((free - margin))
				break
			fi
		done
		flog "disk full: host $DISK_HOST of idc$R ($((took >> 10)) KiB taken, $(((free - took) >> 10)) KiB left)"
		nap_ms "$d_disk"
		rm -f "$DISK_MNT/filler"
		flog "disk freed: host $DISK_HOST of idc$R"
	} &
	wait
}
T0=$(date +%s.%N)
FETCH_PIDS=()
INJECTOR_PID=""
if ((FAULTS)); then
	: >"$BN_WORK/faults.log"
	: >"$BN_WORK/respawned"
	inject_faults &
	INJECTOR_PID=$!
fi
for ((k = R; k <= RL; k++)); do
	if ((!BH_RANDOM)); then
		fetch "$k" 1 0 &
		FETCH_PIDS+=($!)
	fi
	for j in ${ORDER[$k]}; do
		rnd 0 "$JITTER_MS"
		fetch "$k" "$j" "$R_" &
		FETCH_PIDS+=($!)
	done
done
for p in "${FETCH_PIDS[@]}"; do wait "$p" || true; done
T1=$(date +%s.%N)
if [[ -n $INJECTOR_PID ]]; then
	wait "$INJECTOR_PID" || true
	# Processes started again by the injector replace the killed ones.
	while read -r key pid; do
		if [[ $key == gis ]]; then GIS_PID=$pid; else NODE_PID[$key]=$pid; fi
	done <"$BN_WORK/respawned"
fi

# The IDC that took the most over the WAN stands for all (one requester: that one).
k_in=0 k_off=0 k_pk=0
for ((k = R; k <= RL; k++)); do
	v=$(($(bn_counter "$(bn_idc_ns "$k")" wan rx_bytes) - K_IN0[$k]))
	((v > k_in)) && k_in=$v
	v=$(($(bn_counter "$BN_ROUTER_NS" "wan$k" tx_bytes) - K_OFF0[$k]))
	((v > k_off)) && k_off=$v
	v=$(($(bn_counter "$(bn_idc_ns "$k")" wan rx_packets) - K_PK0[$k]))
	((v > k_pk)) && k_pk=$v
done
bh_tx=$(($(bn_counter "$BH_NS" eth0 tx_bytes) - bh_tx0))

# Results: a host's provision time is what its node reports for the fetch (request to
# complete and verified); every copy is compared with the source byte for byte.
fail=()
ptimes=()
first_bytes=()
av_rates=()
lan_rates=()
bh_sent=0
nodes_in=0
makespan=0
hosts_json=()
for ((k = R; k <= RL; k++)); do
	idc_in=0
	for ((j = 1; j <= HOSTS + 1; j++)); do
		read -r _ rc t0 t1 d tries <"$BN_WORK/fetch-$k-$j.res" || { rc=99 t0=0 t1=0 d=0 tries=0; }
		secs=$(sed -nE 's/.*complete and verified in ([0-9.]+) s.*/\1/p' "$BN_WORK/fetch-$k-$j.log" | tail -1)
		# Where its start-up went (ms from the fetch being asked): the node's own marks.
		su=$(sed -nE 's/.*start-up: lookup ([0-9-]+)( ms)?, first source ([0-9-]+)( ms)?, first request ([0-9-]+)( ms)?, first byte ([0-9-]+)( ms)?.*/\1 \3 \5 \7/p' "$BN_WORK/fetch-$k-$j.log" | tail -1)
		read -r su_lookup su_source su_request su_byte <<<"${su:-- - - -}"
		[[ $su_byte =~ ^[0-9]+$ ]] && first_bytes+=("$su_byte")
		# A fetch started again after a fault took from its first start to its last end.
		((tries > 1)) && [[ -n $secs ]] && secs=$(calc "$t1 - $t0")
		last_done=$(awk "BEGIN { e = $t1 - $T0; print (e > ${last_done:-0}) ? e : ${last_done:-0} }")
		if ((rc != 0)) || [[ -z $secs ]]; then
			fail+=("host $j of idc$k: fetch failed (exit $rc): $(tail -2 "$BN_WORK/fetch-$k-$j.log" | tr '\n' ' ')")
			secs=0
		elif ! cmp -s "$IMAGE" "$BN_WORK/out-$k-$j.raw"; then
			fail+=("host $j of idc$k: copy is not bit-exact")
		fi
		rm -f "$BN_WORK/out-$k-$j.raw"
		st=""
		if kill -0 "${NODE_PID[$k-$j]}" 2>/dev/null; then
			st=$("$BIN" image status "$REF" --store "$BN_WORK/s$k-$j" --json 2>/dev/null || true)
		fi
		w=$(json_num wan_recv_bytes <<<"$st")
		lan_in=$(json_num lan_recv_bytes <<<"$st")
		((k == R && j == 1)) && bh_sent=$(json_num lan_sent_bytes <<<"$st")
		# The host's mean LAN download rate over its provision time (Mbit/s), and over the time
		# its IDC held chunks it lacked (the node's own measure).
		lan_rate=$(awk "BEGIN { print ($secs > 0) ? ${lan_in:-0} * 8 / $secs / 1e6 : 0 }")
		av_ms=$(json_num lan_available_ms <<<"$st")
		av_b=$(json_num lan_available_recv_bytes <<<"$st")
		av_rate=$(awk "BEGIN { print (${av_ms:-0} > 0) ? ${av_b:-0} * 8 / ${av_ms:-0} / 1e3 : -1 }")
		idc_in=$((idc_in + ${w:-0}))
		((j > 1)) && ptimes+=("$secs")
		# Completion since the bridgehead's start: the host's start delay plus its provision time.
		makespan=$(awk "BEGIN { e = $d / 1000 + $secs; print (e > $makespan) ? e : $makespan }")
		hosts_json+=("{\"idc\":\"idc$k\",\"host\":$j,\"bridgehead\":$([[ $j == 1 ]] && echo true || echo false),\"start_delay_ms\":$d,\"provision_s\":$secs,\"wall_s\":$(calc "$t1 - $t0"),\"fetch_attempts\":${tries:-0},\"startup_ms\":{\"lookup\":\"$su_lookup\",\"first_source\":\"$su_source\",\"first_request\":\"$su_request\",\"first_byte\":\"$su_byte\"},\"wan_recv_bytes\":${w:-0},\"lan_recv_bytes\":${lan_in:-0},\"lan_recv_mbit_per_s\":$(printf '%.1f' "$lan_rate"),\"lan_available_s\":$(calc "${av_ms:-0} / 1000"),\"lan_mbit_while_available\":$(printf '%.1f' "$av_rate")}")
		if ((j > 1)); then
			lan_rates+=("$lan_rate")
			[[ $av_rate != -1 ]] && av_rates+=("$av_rate")
		fi
	done
	((idc_in > nodes_in)) && nodes_in=$idc_in
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

# With faults: nothing the GIS lists as a complete copy may be anything less. Every peer it
# lists complete, in any IDC, has its store checked chunk by chunk (`bids image verify`,
# through the running node). The GIS learns of a loss by the node's next report, so the
# check is repeated for up to 20 s until it holds; what still fails then is counted.
listed_not_held=0
faults_json=""
if ((FAULTS)); then
	declare -A KEY_OF
	for key in "${!PEER_OF[@]}"; do KEY_OF[${PEER_OF[$key]}]=$key; done
	deadline=$((SECONDS + 20))
	while :; do
		bad=()
		for ((k = 1; k <= RL; k++)); do
			listed=$({ ip netns exec "$BN_GIS_NS" "$BIN" lookup "$REF" --gis "$GIS_ADDR" --idc "idc$k" 2>/dev/null || true; } |
				tr -d ' \n' | tr '{}' '\n\n' | awk -v idc="\"idc\":\"idc$k\"" '/"complete":true/ && index($0, idc) && match($0, /"peer":"[^"]*"/) {
					print substr($0, RSTART + 8, RLENGTH - 9) }' | sort -u)
			for peer in $listed; do
				key=${KEY_OF[$peer]:-}
				[[ -n $key ]] || continue
				"$BIN" image verify "$REF" --store "$BN_WORK/s$key" >"$BN_WORK/verify-$key.log" 2>&1 ||
					bad+=("$key: $(tail -1 "$BN_WORK/verify-$key.log")")
			done
		done
		((${#bad[@]} == 0 || SECONDS > deadline)) && break
		sleep 2
	done
	listed_not_held=${#bad[@]}
	for b in "${bad[@]}"; do fail+=("listed complete by the GIS but not held whole: host $b"); done
	# What the corrupting peer achieved: corrupt chunks that reached the requester's
	# bridgehead (each checked, penalised and fetched again elsewhere).
	bc=$("$BIN" image status "$REF" --store "$BN_WORK/s$R-1" --json 2>/dev/null | json_num bad_chunks || echo 0)
	bans=$(grep -c "banned node-wide" "$BN_WORK/node-$R-1.log" 2>/dev/null || true)
	echo "$(calc "$(date +%s.%N) - $T0") effect: the bridgehead of idc$R received ${bc:-0} corrupt chunks and banned ${bans:-0} peer(s) node-wide" >>"$BN_WORK/faults.log"
	mapfile -t flines <"$BN_WORK/faults.log"
	faults_json=$(json_strings "${flines[@]}")
	bn_log "faults injected: $(printf '%s; ' "${flines[@]}")"
fi

stats=$(printf '%s\n' "${ptimes[@]}" | awk '{s+=$1; if($1>m)m=$1; if(n==0||$1<mn)mn=$1; n++} END {printf "%.3f %.3f %.3f", s/n, m, mn}')
read -r mean max min <<<"$stats"
# The hosts' first byte of chunk data after their fetch was asked (ms): mean and max.
read -r fb_mean fb_max <<<"$(printf '%s\n' "${first_bytes[@]}" | awk 'NF { s += $1; if ($1 > m) m = $1; n++ } END { if (n) printf "%.0f %d", s / n, m; else print "- -" }')"
# The hosts' LAN download rate while their IDC held chunks they lacked: min and mean.
read -r av_min av_mean <<<"$(printf '%s\n' "${av_rates[@]}" | awk 'NF { s += $1; if (n == 0 || $1 < m) m = $1; n++ } END { if (n) printf "%.1f %.1f", m, s / n; else print "- -" }')"
read -r lan_min lan_mean <<<"$(printf '%s\n' "${lan_rates[@]}" | awk '{s+=$1; if(n==0||$1<m)m=$1; n++} END {printf "%.1f %.1f", m, s/n}')"
bound=$(calc "$SIZE * 8 / ($WAN_MBIT * 1000000)")
wall=$(calc "$T1 - $T0")
verified=$([[ ${#fail[@]} == 0 ]] && echo 1 || echo 0)

# Stop the emulator now to read its own counters (drops) before teardown.
kill -TERM "$BN_LINKEMU_PID" 2>/dev/null || true
for _ in $(seq 30); do kill -0 "$BN_LINKEMU_PID" 2>/dev/null || break; sleep 0.1; done
drops=$(grep -oE '"(up|down)_dropped":[0-9]+' "$BN_WORK/linkemu.out" | awk -F: '{ s += $2 } END { print s + 0 }')

HEADER="mode,image_bytes,wan_mbit,delay_ms,hosts,provision_s_mean,provision_s_max,wan_in_bytes_kernel,wan_in_bytes_nodes,sweep,chunk_bytes,provision_s_min,bound_s,wan_offered_bytes_kernel,wan_in_packets_kernel,emu_drops,wall_s,providers,verified,wan_in_idle_bytes_per_s,provider_wan_sent_bytes_nodes,makespan_s,lan_mbit,bridgehead_random,bridgehead_up_bytes_kernel,bridgehead_lan_sent_bytes_nodes,bridgehead_up_x_image_kernel,bridgehead_lan_sent_x_image_nodes,host_lan_mbit_min,host_lan_mbit_mean,faults,gis_listed_not_held,last_done_s,seed,first_byte_ms_mean,first_byte_ms_max,host_lan_mbit_available_min,host_lan_mbit_available_mean,requesters,raw_tcp_s"
[[ -s $CSV ]] || echo "$HEADER" >"$CSV"
printf '%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%.3f,%s,%s,%s,%.3f,%s,%s,%s,%s,%.3f,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%.3f,%s,%s,%s,%s,%s,%s,%s\n' "$MODE" "$SIZE" \
	"$WAN_MBIT" "$DELAY_MS" "$HOSTS" "$mean" "$max" "$k_in" "$nodes_in" "$SWEEP" "$CHUNK" "$min" \
	"$bound" "$k_off" "$k_pk" "$drops" "$wall" "$PROVIDERS" "$verified" "$idle_bps" "$prov_out" \
	"$makespan" "$LAN_MBIT" "$BH_RANDOM" "$bh_tx" "${bh_sent:-0}" "$(calc "$bh_tx / $SIZE")" \
	"$(calc "${bh_sent:-0} / $SIZE")" "$lan_min" "$lan_mean" \
	"$(((FAULTS)) && grep -cE 'SIGKILL|bit rot|corrupting peer|disk full' "$BN_WORK/faults.log" || echo 0)" \
	"$listed_not_held" "${last_done:-0}" "$SEED" "$fb_mean" "$fb_max" "$av_min" "$av_mean" "$REQUESTERS" "$RAW_TCP_S" >>"$CSV"
{
	printf '{"mode":"%s","image_bytes":%s,"wan_mbit":%s,"delay_ms":%s,"hosts":%s,"providers":%s,"requesters":%s,' \
		"$MODE" "$SIZE" "$WAN_MBIT" "$DELAY_MS" "$HOSTS" "$PROVIDERS" "$REQUESTERS"
	printf '"wan_in_bytes_kernel":%s,"wan_offered_bytes_kernel":%s,"wan_in_bytes_nodes":%s,' "$k_in" "$k_off" "$nodes_in"
	printf '"raw_tcp_s":%s,' "${RAW_TCP_S:-null}"
	printf '"faults":[%s],"failures":[%s],"hosts_detail":[%s]}\n' "$faults_json" "$(json_strings "${fail[@]}")" \
		"$(
			IFS=,
			echo "${hosts_json[*]}"
		)"
} >>"${CSV%.csv}.jsonl"

bn_log "$MODE done: mean $mean s, last $max s (S/B $(printf '%.2f' "$bound") s); WAN in: kernel $k_in B, nodes $nodes_in B (image $SIZE B); drops $drops; bridgehead upload: kernel $(calc "$bh_tx / $SIZE") x image, node $(calc "${bh_sent:-0} / $SIZE") x image; hosts' LAN download $lan_min-$lan_mean Mbit/s (min-mean), $av_min-$av_mean Mbit/s while their IDC held chunks they lacked${RAW_TCP_S:+; last host $(calc "$max / $RAW_TCP_S") x the raw-TCP reference}"
if ((${#fail[@]})); then
	for f in "${fail[@]}"; do bn_log "FAIL: $f"; done
	exit 1
fi
