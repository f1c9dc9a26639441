#!/usr/bin/env bash
# Markdown summary of `eval.sh --ab` and `--ab-idcs`: each seed's pair (A then B) per LAN
# rate, and per LAN rate the mean of each binary and of the paired differences B - A, with
# how many seeds B was better. Reads columns by name; A's rows have sweep "ab-a", B's "ab-b".
#   ab-summary.sh runs.csv A-LABEL B-LABEL [SETUP] > summary.md
set -euo pipefail
CSV=${1:?usage: ab-summary.sh runs.csv A-LABEL B-LABEL}
A=${2:-A} B=${3:-B}
SETUP=${4:-32 MiB, 8 hosts, WAN 100 Mbit/s}
A=${A##*/} B=${B##*/}
[[ -s $CSV ]] || {
	echo "no runs in $CSV"
	exit 0
}
awk -F, -v A="$A" -v B="$B" -v SETUP="$SETUP" '
NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
function v(name) { return (name in c) ? $(c[name]) : "" }
{
	w = v("sweep"); lan = v("lan_mbit"); s = v("seed"); b = v("bound_s")
	if (w != "ab-a" && w != "ab-b" || b <= 0) next
	k = lan SUBSEP s SUBSEP w
	last[k] = v("provision_s_max") / b; mean[k] = v("provision_s_mean") / b
	up[k] = v("bridgehead_up_x_image_kernel"); ok[k] = v("verified"); cb[w] = v("chunk_bytes")
	win[k] = v("wan_in_bytes_kernel") / v("image_bytes")
	t = v("raw_tcp_s"); tcp[k] = (t > 0) ? sprintf("%.2f", v("provision_s_max") / t) : "-"
	lans[lan] = 1; seeds[s] = 1
}
END {
	sorter = "sort -t\"|\" -k2,2nr -k3,3n"
	print "# A/B (" SETUP ")"
	print ""
	print "A: `" A "`, chunks of " cb["ab-a"] " bytes  "
	print "B: `" B "`, chunks of " cb["ab-b"] " bytes"
	print ""
	print "Last host and host mean / (S/B_wan); last host / the raw-TCP reference of the same run (the image pulled by plain TCP over the same WAN path, `run.sh --raw-tcp`; a dash when not measured); bridgehead upload / S and WAN bytes into the IDC / S (kernel counters; with several requesting IDCs, the bridgehead of the first and the IDC that took the most); every copy verified (1)."
	print ""
	print "| LAN Mbit/s | seed | A last | B last | B - A | A last / TCP | B last / TCP | A mean | B mean | A upload | B upload | A WAN in | B WAN in | verified A/B |"
	print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
	for (lan in lans) for (s in seeds) {
		ka = lan SUBSEP s SUBSEP "ab-a"; kb = lan SUBSEP s SUBSEP "ab-b"
		if (!(ka in last) || !(kb in last)) continue
		d = last[kb] - last[ka]
		printf "| %s | %s | %.2f | %.2f | %+.2f | %s | %s | %.2f | %.2f | %s | %s | %.3f | %.3f | %s/%s |\n", lan, s, last[ka], last[kb], d, tcp[ka], tcp[kb], mean[ka], mean[kb], up[ka], up[kb], win[ka], win[kb], ok[ka], ok[kb] | sorter
		n[lan]++; sa[lan] += last[ka]; sb[lan] += last[kb]; sd[lan] += d; sdd[lan] += d * d
		ma[lan] += mean[ka]; mb[lan] += mean[kb]
		if (d < 0) better[lan]++
	}
	close(sorter)
	print ""
	print "| LAN Mbit/s | pairs | A last, mean | B last, mean | B - A, mean (sd) | B better in | A host mean | B host mean |"
	print "|---|---|---|---|---|---|---|---|"
	for (lan in lans) {
		if (!n[lan]) continue
		m = sd[lan] / n[lan]
		var = n[lan] > 1 ? (sdd[lan] - n[lan] * m * m) / (n[lan] - 1) : 0
		if (var < 0) var = 0
		printf "| %s | %d | %.2f | %.2f | %+.3f (%.3f) | %d of %d | %.2f | %.2f |\n", lan, n[lan], sa[lan] / n[lan], sb[lan] / n[lan], m, sqrt(var), better[lan], n[lan], ma[lan] / n[lan], mb[lan] / n[lan] | sorter
	}
	close(sorter)
}' "$CSV"
