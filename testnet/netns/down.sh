#!/usr/bin/env bash
# Removes netns testnets: by default the leftovers of runs whose owner process is gone;
# with --owner PID the network of that (live) owner; with --all every bidsnet namespace.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
((EUID == 0)) || bn_die "network namespaces need root"
case ${1:-} in
"") bn_clean_leftovers ;;
--owner)
	for ns in $(bn_list_ns "${2:?--owner needs a pid}"); do bn_ns_destroy "$ns"; done
	;;
--all)
	for ns in $(bn_list_ns ""); do bn_ns_destroy "$ns"; done
	;;
*) bn_die "usage: down.sh [--owner PID | --all]" ;;
esac
left=$(bn_list_ns "")
[[ -z $left ]] || bn_log "still present (live owners): $(echo "$left" | tr '\n' ' ')"
