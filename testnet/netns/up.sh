#!/usr/bin/env bash
# Brings a netns testnet up for hands-on use and keeps it until Ctrl-C (or SIGTERM), then
# tears it down. No BIDS processes are started: run them with `ip netns exec NS bids …`.
#   up.sh [--hosts 2,3] [--wan-mbit 10] [--delay-ms 30] [--lan-mbit 200] [--bin PATH]
# --hosts gives the hosts per IDC (IDC k = k-th number); WAN rate and delay apply to every
# IDC's link.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
HOSTS=2,3 WAN=10 DELAY=30 LAN=200 BIN=$HERE/../../target/release/bids
while (($#)); do
	case $1 in
	--hosts) HOSTS=$2 ;;
	--wan-mbit) WAN=$2 ;;
	--delay-ms) DELAY=$2 ;;
	--lan-mbit) LAN=$2 ;;
	--bin) BIN=$2 ;;
	*) bn_die "unknown option $1" ;;
	esac
	shift 2
done
((EUID == 0)) || bn_die "network namespaces need root"
[[ -x $BIN ]] || bn_die "no bids binary at $BIN (cargo build --release -p bids)"
bn_names $$
BN_WORK=$(mktemp -d "${TMPDIR:-/tmp}/bidsnet-up.XXXXXX")
BN_PIDS_FILE=$BN_WORK/pids
trap 'trap - EXIT; bn_down; rm -rf "$BN_WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bn_clean_leftovers
IFS=, read -r -a BN_HOSTS <<<"$HOSTS"
BN_WAN_MBIT=() BN_DELAY_MS=()
for _ in "${BN_HOSTS[@]}"; do
	BN_WAN_MBIT+=("$WAN")
	BN_DELAY_MS+=("$DELAY")
done
BN_BIN=$BIN BN_LAN_MBIT=$LAN
bn_up
echo "namespaces (GIS address $BN_GIS_IP):"
bn_list_ns "$BN_OWNER" | sed 's/^/  /'
echo "hosts: host j of IDC k is $(bn_host_ns K J) at 10.200.K.(10+J)"
echo "link emulator log: $BN_WORK/linkemu.log; Ctrl-C tears everything down"
while kill -0 "$BN_LINKEMU_PID" 2>/dev/null; do sleep 1; done
bn_die "the link emulator stopped: $(tail -3 "$BN_WORK/linkemu.log")"
