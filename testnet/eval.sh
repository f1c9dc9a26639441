#!/usr/bin/env bash
# The paper's §4 evaluation on real processes in Linux network namespaces (needs root):
#   testnet/eval.sh --smoke | --quick | --full | --delay | --pairs | --lan | --hosts
#                   | --faults [--smoke] | --ab | --ab-idcs --bin-b PATH [--seeds N]
#                   [--out DIR] [--bin PATH]
# Each run builds a fresh netns testnet (testnet/netns/run.sh): 4 provider IDCs hold the
# image, a requester IDC of 8 hosts and one bridgehead asks for it; BIDS and Baseline. Writes
# DIR/runs.csv (one row per run), DIR/runs.jsonl (per-host details), DIR/summary.md (tables
# and the issue's goals checked) and the PNGs of Fig. 6/7/8. Default DIR:
# testnet/results/<timestamp>/. Exits non-zero when a run fails (a copy not bit-exact, a
# process died, a timeout).
#
#   --smoke  2 IDCs, 3 requesting hosts, a 4 MiB image, both modes        (~1 min)
#   --quick  the paper's setup, 16 MB image (1.6 GB / 100), bandwidth and delay sweeps
#                                                                           (~7-8 min)
#   --full   the paper's three images / 100 (4.5 MB, 16 MB, 40 MB), both sweeps, the delay
#            sweep three times                                          (~33-37 min)
#   --delay  only the full profile's delay sweep (Fig. 8): BIDS, three images, 10/30/50 ms
#            at 10 Mbit/s, three times                                     (~13 min)
#   --pairs  the delay goal where it is hardest: the 4.5 MB image, BIDS at 10 Mbit/s, 10 and
#            50 ms as pairs with the same seed (start order and delays), 16 seeds  (~6 min)
#   --lan    LAN swarming against the LAN rate: a 32 MiB image, 8 hosts, 200 Mbit/s host
#            links at WAN 10, 34 and 100 Mbit/s, and LAN = WAN = 100 Mbit/s; BIDS, the
#            bridgehead first and started among the hosts in random order      (~5 min)
#   --hosts  LAN swarming against the number of hosts: 8, 16, 32 and 64 hosts, 200 Mbit/s
#            LAN, 34 Mbit/s WAN, a 32 MiB image; BIDS and Baseline             (~15 min)
#   --faults ordinary faults (run.sh --faults 1): during each BIDS distribution (16 MB,
#            20 Mbit/s WAN, 6 hosts) the GIS, a provider's bridgehead and a host are
#            SIGKILLed and restarted, a provider host's copy rots, a provider's bridgehead
#            serves rotten chunks unchecked (a corrupting peer) and a host's disk fills;
#            20 seeds, each also run without faults for the overhead       (~25 min)
#            With --smoke: one pair on a small testnet                          (~1 min)
#   --ab     two binaries (--bin, default the release build, and --bin-b) on --lan's
#            setup at 100 Mbit/s WAN, LAN 200 and 100 Mbit/s: per seed (default 6) one run
#            of each, back to back, the first alternating, so both meet the same machine
#            state; prints each pair and the mean of each (20 s a run: ~4 min for 6 seeds)
#   --ab-idcs the same pairing on several requesting IDCs at once: one origin host, 3 IDCs
#            of a bridgehead and 3 hosts fetching a 32 MiB image (WAN 34 Mbit/s, LAN 200),
#            so the bridgeheads trade chunks over the WAN                (~30 s a run)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NETNS=$ROOT/testnet/netns
# shellcheck source=netns/lib.sh
. "$NETNS/lib.sh"

PROFILE="" OUT="" BIN="" BIN_B="" SEEDS=6 SMOKE=0
while (($#)); do
	case $1 in
	--smoke)
		SMOKE=1
		[[ $PROFILE == faults ]] || PROFILE=smoke
		;;
	--faults) PROFILE=faults ;;
	--quick | --full | --delay | --pairs | --lan | --hosts | --ab | --ab-idcs) PROFILE=${1#--} ;;
	--bin-b)
		BIN_B=$2
		shift
		;;
	--seeds)
		SEEDS=$2
		shift
		;;
	--out)
		OUT=$2
		shift
		;;
	--bin)
		BIN=$2
		shift
		;;
	-h | --help)
		sed -n '2,39p' "$0"
		exit 0
		;;
	*) bn_die "unknown option $1 (use --smoke, --quick, --full, --delay, --pairs, --lan, --hosts, --faults or --ab, and --out DIR)" ;;
	esac
	shift
done
[[ -n $PROFILE ]] || bn_die "choose --smoke, --quick, --full, --delay, --pairs, --lan, --hosts, --faults or --ab"
[[ $PROFILE != ab* || -x $BIN_B ]] || bn_die "--$PROFILE needs --bin-b PATH, the second bids binary"
[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || bn_die "--seeds takes a positive number"
((EUID == 0)) || bn_die "network namespaces need root"
command -v ip >/dev/null && command -v tc >/dev/null || bn_die "iproute2 (ip, tc) is needed"

# The release build of the test step; built here only when missing.
if [[ -z $BIN ]]; then
	BIN=$ROOT/target/release/bids
	if [[ ! -x $BIN ]]; then
		bn_log "building the bids binary (cargo build --release -p bids)"
		(cd "$ROOT" && cargo build --release -p bids)
	fi
fi
[[ -x $BIN ]] || bn_die "no bids binary at $BIN"
OUT=${OUT:-$ROOT/testnet/results/$(date -u +%Y%m%dT%H%M%SZ)-$PROFILE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CSV=$OUT/runs.csv
rm -f "$CSV" "$OUT/runs.jsonl"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bidsnet-eval.XXXXXX")
RUN_PID=""
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	# A run being interrupted tears its own network down (its trap); wait for it.
	if [[ -n $RUN_PID ]] && kill -0 "$RUN_PID" 2>/dev/null; then
		kill -TERM "$RUN_PID" 2>/dev/null || true
		wait "$RUN_PID" 2>/dev/null || true
	fi
	rm -rf "$WORK"
	bn_clean_leftovers
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bn_clean_leftovers

# Images are random bytes (incompressible, so the nodes' zstd cannot shrink them and WAN
# bytes compare directly with the image size). Sizes are the paper's divided by 100.
make_image() { # make_image BYTES FILE
	head -c "$1" /dev/urandom >"$2"
}

FAILED=0
# The issue's LAN-swarming setup (--lan, --hosts, --ab): the image cut at the chunk size
# `bids image add` picks by default (with --ab, each binary's own), all fetches started
# within 3 s.
LAN_SETUP=(--chunk-bytes default --jitter-ms 3000)
# run MODE SIZE WAN DELAY SWEEP [extra run.sh options]
run() {
	local mode=$1 size=$2 wan=$3 delay=$4 sweep=$5 img
	shift 5
	img=$WORK/image-$size.raw
	[[ -f $img ]] || make_image "$size" "$img"
	"$NETNS/run.sh" --bin "${RUN_BIN:-$BIN}" --image "$img" --mode "$mode" --csv "$CSV" \
		--wan-mbit "$wan" --delay-ms "$delay" --sweep "$sweep" --chunk-bytes 258048 \
		--keep-logs "" "$@" &
	RUN_PID=$!
	if ! wait "$RUN_PID"; then
		FAILED=$((FAILED + 1))
		bn_log "run failed: $mode $size B, $wan Mbit/s, $delay ms"
	fi
	RUN_PID=""
}

START=$SECONDS
case $PROFILE in
smoke)
	# 2 IDCs: one provider (bridgehead + 1 host), the requester (bridgehead + 3 hosts).
	for mode in bids baseline; do
		run "$mode" $((4 << 20)) 20 10 bw --providers 1 --provider-hosts 2 --hosts 3 \
			--jitter-ms 500 --timeout-s 90
	done
	;;
quick)
	for wan in 10 16 34 100; do
		for mode in bids baseline; do
			run "$mode" 16000000 "$wan" 15 bw
		done
	done
	for delay in 10 30 50; do
		run bids 16000000 10 "$delay" delay
	done
	;;
pairs)
	# A host's provision time varies from run to run by about as much as the effect looked
	# for; a pair shares the seed, so the hosts' start order and start delays are the same
	# at both delays.
	for seed in $(seq 1 16); do
		for delay in 10 50; do
			run bids 4500000 10 "$delay" delay --seed "$seed"
		done
	done
	;;
lan)
	for bh in 0 1; do
		for wan in 10 34 100; do
			run bids $((32 << 20)) "$wan" 15 lan "${LAN_SETUP[@]}" --bridgehead-random "$bh"
		done
		run bids $((32 << 20)) 100 15 lan "${LAN_SETUP[@]}" --bridgehead-random "$bh" \
			--lan-mbit 100
	done
	;;
faults)
	# Each seed twice: without faults (the reference for the overhead), then with them.
	if ((SMOKE)); then
		seeds=1 args=(--providers 2 --provider-hosts 2 --hosts 3)
		size=$((4 << 20)) wan=10
	else
		seeds=20 args=(--providers 4 --provider-hosts 2 --hosts 6)
		size=16000000 wan=20
	fi
	for seed in $(seq 1 "$seeds"); do
		for f in 0 1; do
			run bids "$size" "$wan" 10 faults "${args[@]}" --jitter-ms 1000 --seed "$seed" \
				--faults "$f" --timeout-s 120
		done
	done
	;;
hosts)
	for hosts in 8 16 32 64; do
		for mode in bids baseline; do
			run "$mode" $((32 << 20)) 34 15 hosts "${LAN_SETUP[@]}" --hosts "$hosts" \
				--timeout-s 300
		done
	done
	;;
ab)
	# Label A's rows "ab-a" and B's "ab-b" (the sweep column); the first of each pair alternates.
	for seed in $(seq 1 "$SEEDS"); do
		for lan in 200 100; do
			if ((seed % 2)); then pair=(a b); else pair=(b a); fi
			for w in "${pair[@]}"; do
				if [[ $w == a ]]; then RUN_BIN=$BIN; else RUN_BIN=$BIN_B; fi
				run bids $((32 << 20)) 100 15 "ab-$w" "${LAN_SETUP[@]}" --lan-mbit "$lan" \
					--seed "$seed"
			done
		done
	done
	RUN_BIN=""
	;;
ab-idcs)
	for seed in $(seq 1 "$SEEDS"); do
		if ((seed % 2)); then pair=(a b); else pair=(b a); fi
		for w in "${pair[@]}"; do
			if [[ $w == a ]]; then RUN_BIN=$BIN; else RUN_BIN=$BIN_B; fi
			run bids $((32 << 20)) 34 15 "ab-$w" --providers 1 --provider-hosts 1 \
				--requesters 3 --hosts 3 --lan-mbit 200 --seed "$seed" --timeout-s 300
		done
	done
	RUN_BIN=""
	;;
full | delay)
	for size in 4500000 16000000 40000000; do
		if [[ $PROFILE == full ]]; then
			for wan in 10 16 34 100; do
				for mode in bids baseline; do
					run "$mode" "$size" "$wan" 15 bw
				done
			done
		fi
		# Three repetitions per delay: the effect looked for (< 10%) is near the run-to-run
		# spread on a shared 2-core machine; plots and summary use the mean.
		for rep in 1 2 3; do
			for delay in 10 30 50; do
				run bids "$size" 10 "$delay" delay --seed "$rep"
			done
		done
	done
	;;
esac
bn_log "$PROFILE: $(($(wc -l <"$CSV") - 1)) runs in $((SECONDS - START)) s, $FAILED failed"

# Plots. The font comes from Debian's fonts-dejavu-core; install it when missing.
if [[ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] && command -v apt-get >/dev/null; then
	bn_log "installing fonts-dejavu-core for the plots' text"
	apt-get install -y -q fonts-dejavu-core >/dev/null 2>&1 || bn_log "could not install fonts-dejavu-core"
fi
if ! "$BIN" testnet eval-plot --csv "$CSV" --out "$OUT" >/dev/null 2>"$WORK/plot.err"; then
	bn_log "plots failed: $(cat "$WORK/plot.err")"
	[[ $PROFILE == smoke || $PROFILE == delay || $PROFILE == pairs || $PROFILE == faults || $PROFILE == ab-idcs ]] || FAILED=$((FAILED + 1))
fi

# Summary: the tables and the issue's goals, from runs.csv.
if [[ $PROFILE == ab ]]; then
	"$NETNS/ab-summary.sh" "$CSV" "$BIN" "$BIN_B" >"$OUT/summary.md"
elif [[ $PROFILE == ab-idcs ]]; then
	"$NETNS/ab-summary.sh" "$CSV" "$BIN" "$BIN_B" \
		"3 requesting IDCs of 4 hosts, one origin host, 32 MiB, WAN 34 Mbit/s" >"$OUT/summary.md"
else
	"$NETNS/summary.sh" "$CSV" >"$OUT/summary.md"
fi
cat "$OUT/summary.md"
bn_log "results in $OUT"
((FAILED == 0)) || bn_die "$FAILED run(s) failed"
