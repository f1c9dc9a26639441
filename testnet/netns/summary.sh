#!/usr/bin/env bash
# Markdown summary of an evaluation's runs.csv: every run, BIDS against Baseline per image
# size and bandwidth, and the goals checked (BIDS WAN bytes, last host against
# S/B_wan at the lowest bandwidth, delay 10 -> 50 ms). Reads columns by name.
#   summary.sh runs.csv > summary.md
set -euo pipefail
CSV=${1:?usage: summary.sh runs.csv}
[[ -s $CSV ]] || {
	echo "no runs in $CSV"
	exit 0
}
awk -F, '
NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
function v(name) { return (name in c) ? $(c[name]) : "" }
function mb(b) { return sprintf("%.1f", b / 1e6) }
function pct(x) { return sprintf("%+.1f%%", 100 * x) }
# The 95 % interval of the change between points a and b (sums and sums of squares of their
# runs), as " ± x %" of the base `base`; empty unless both points were run at least twice.
function ci(sum, sq, a, b, base,   va, vb) {
	if (dcnt[a] < 2 || dcnt[b] < 2) return ""
	va = (sq[a] - sum[a] * sum[a] / dcnt[a]) / (dcnt[a] - 1)
	vb = (sq[b] - sum[b] * sum[b] / dcnt[b]) / (dcnt[b] - 1)
	if (va < 0) va = 0
	if (vb < 0) vb = 0
	return sprintf(" ± %.1f%%", 100 * 1.96 * sqrt(va / dcnt[a] + vb / dcnt[b]) / base)
}
{
	n++
	mode[n] = v("mode"); size[n] = v("image_bytes"); bw[n] = v("wan_mbit"); dl[n] = v("delay_ms")
	sweep[n] = v("sweep"); mean[n] = v("provision_s_mean"); mx[n] = v("provision_s_max")
	kin[n] = v("wan_in_bytes_kernel"); nin[n] = v("wan_in_bytes_nodes"); hosts[n] = v("hosts")
	bound[n] = size[n] * 8 / (bw[n] * 1e6); drops[n] = v("emu_drops"); ok[n] = v("verified")
	# Kernel bytes less the non-image traffic measured before the fetch (rate x fetch time).
	kimg[n] = kin[n] - v("wan_in_idle_bytes_per_s") * v("wall_s")
	span[n] = v("makespan_s")
	nf[n] = v("faults"); lnh[n] = v("gis_listed_not_held"); done_[n] = v("last_done_s"); seed[n] = v("seed")
}
END {
	print "### Runs\n"
	print "| sweep | mode | image (MB) | WAN (Mbit/s) | delay (ms) | hosts | mean (s) | last host (s) | S/B_wan (s) | last / (S/B) | WAN in, kernel (x image) | kernel less idle traffic (x image) | WAN in, nodes (x image) | link drops | bit-exact |"
	print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
	for (i = 1; i <= n; i++)
		printf "| %s | %s | %s | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.3f | %.3f | %.3f | %s | %s |\n", sweep[i], mode[i], mb(size[i]), bw[i], dl[i], hosts[i], mean[i], mx[i], bound[i], mx[i] / bound[i], kin[i] / size[i], kimg[i] / size[i], nin[i] / size[i], drops[i], (ok[i] == 1 ? "yes" : "NO")

	# BIDS against Baseline (bandwidth sweep).
	m = 0
	for (i = 1; i <= n; i++) if (sweep[i] != "delay" && mode[i] == "bids")
		for (j = 1; j <= n; j++) if (sweep[j] != "delay" && mode[j] == "baseline" && size[j] == size[i] && bw[j] == bw[i] && dl[j] == dl[i]) {
			if (!m++) {
				print "\n### BIDS vs Baseline (Fig. 6, Fig. 7)\n"
				print "| image (MB) | WAN (Mbit/s) | BIDS mean / last (s) | Baseline mean / last (s) | speedup mean | speedup last host | WAN in BIDS, kernel / nodes (x image) | WAN in Baseline, kernel / nodes (x image) |"
				print "|---|---|---|---|---|---|---|---|"
			}
			printf "| %s | %s | %.2f / %.2f | %.2f / %.2f | %.2fx | %.2fx | %.3f / %.3f | %.3f / %.3f |\n", mb(size[i]), bw[i], mean[i], mx[i], mean[j], mx[j], mean[j] / mean[i], mx[j] / mx[i], kin[i] / size[i], nin[i] / size[i], kin[j] / size[j], nin[j] / size[j]
		}

	# Goals.
	print "\n### Goals (BIDS; runs with faults injected are left out here, see below)\n"
	kmax = 0; nmax = 0; any = 0
	for (i = 1; i <= n; i++) if (mode[i] == "bids" && nf[i] + 0 == 0) {
		any = 1
		if (kin[i] / size[i] > kmax) kmax = kin[i] / size[i]
		if (nin[i] / size[i] > nmax) nmax = nin[i] / size[i]
	}
	if (any) {
		printf "- WAN bytes into the requester IDC counted by the nodes: at most %.3f x image (goal <= 1.02): %s\n", nmax, (nmax <= 1.02 ? "met" : "NOT met")
		printf "- WAN bytes into the requester IDC counted by the kernel (IP packets on the WAN link): at most %.3f x image (goal <= 1.06): %s\n", kmax, (kmax <= 1.06 ? "met" : "NOT met")
	}
	# Last host at the lowest bandwidth, per image size.
	for (i = 1; i <= n; i++) if (mode[i] == "bids" && sweep[i] != "delay" && nf[i] + 0 == 0)
		if (!(size[i] in low) || bw[i] + 0 < bw[low[size[i]]] + 0) low[size[i]] = i
	for (s in low) {
		i = low[s]
		printf "- %s MB at %s Mbit/s: last host %.2f s = %.2f x S/B_wan (%.2f s) (goal <= 1.2): %s", mb(s), bw[i], mx[i], mx[i] / bound[i], bound[i], (mx[i] / bound[i] <= 1.2 ? "met" : "NOT met")
		if (span[i] != "")
			printf "; every host done %.2f s after the bridgehead started = %.2f x S/B_wan", span[i], span[i] / bound[i]
		printf "\n"
	}
	# Delay 10 -> 50 ms, per image size and mode; repeated runs are averaged.
	for (i = 1; i <= n; i++) if (sweep[i] == "delay") {
		key = mode[i] SUBSEP size[i]
		k3 = key SUBSEP dl[i]
		dsum[k3] += mean[i]; dmx[k3] += mx[i]; dcnt[k3]++; dbw[key] = bw[i]
		dsq[k3] += mean[i] * mean[i]; dmxsq[k3] += mx[i] * mx[i]
		if (!(key in dlo) || dl[i] + 0 < dlo[key] + 0) dlo[key] = dl[i]
		if (!(key in dhi) || dl[i] + 0 > dhi[key] + 0) dhi[key] = dl[i]
	}
	for (key in dlo) {
		if (dlo[key] == dhi[key]) continue
		split(key, kk, SUBSEP)
		a = key SUBSEP dlo[key]; b = key SUBSEP dhi[key]
		ma = dsum[a] / dcnt[a]; mb_ = dsum[b] / dcnt[b]; xa = dmx[a] / dcnt[a]; xb = dmx[b] / dcnt[b]
		chm = (mb_ - ma) / ma; chx = (xb - xa) / xa
		printf "- %s, %s MB at %s Mbit/s, delay %s -> %s ms (%d / %d runs): mean %.2f -> %.2f s (%s%s), last host %.2f -> %.2f s (%s%s) (goal < 10%%): %s\n", kk[1], mb(kk[2]), dbw[key], dlo[key], dhi[key], dcnt[a], dcnt[b], ma, mb_, pct(chm), ci(dsum, dsq, a, b, ma), xa, xb, pct(chx), ci(dmx, dmxsq, a, b, xa), ((chm < 0.1 && chm > -0.1 && chx < 0.1 && chx > -0.1) ? "met" : "NOT met")
	}
	# Fault-injection runs, each against the same seed without faults.
	fr = 0; fok = 0; flnh = 0; osum = 0; ocnt = 0
	for (i = 1; i <= n; i++) if (sweep[i] == "faults" && nf[i] + 0 > 0) {
		if (!fr++) {
			print "\n### Fault injection (run.sh --faults 1)\n"
			print "| seed | faults injected | every copy bit-exact, no process dead | listed by the GIS but not held | every host done, no faults (s) | with faults (s) | overhead | WAN in, nodes (x image) |"
			print "|---|---|---|---|---|---|---|---|"
		}
		ref = 0
		for (j = 1; j <= n; j++) if (sweep[j] == "faults" && nf[j] + 0 == 0 && seed[j] == seed[i] && size[j] == size[i]) ref = j
		if (ok[i] == 1) fok++
		flnh += lnh[i]
		if (ref && done_[ref] > 0) { o = done_[i] / done_[ref]; osum += o; ocnt++; os = sprintf("%.2fx", o); rs = sprintf("%.2f", done_[ref]) } else { os = "-"; rs = "-" }
		printf "| %s | %s | %s | %s | %s | %.2f | %s | %.3f |\n", seed[i], nf[i], (ok[i] == 1 ? "yes" : "NO"), lnh[i], rs, done_[i], os, nin[i] / size[i]
		if (nin[i] / size[i] > fnmax) fnmax = nin[i] / size[i]
	}
	if (fr) {
		printf "\n- fault runs with every copy bit-exact and no process dead: %d of %d\n", fok, fr
		printf "- copies listed complete by the GIS but not held whole (after 20 s to settle), over all runs: %d\n", flnh
		if (ocnt) printf "- provision-time overhead (every host done, with / without faults, same seed): mean %.2fx over %d pairs\n", osum / ocnt, ocnt
		printf "- WAN bytes into the requester IDC with faults, nodes: at most %.3f x image (rotten chunks from the corrupting peer, and chunks a killed bridgehead had not passed on, cross again)\n", fnmax
	}

	bad = 0
	for (i = 1; i <= n; i++) if (ok[i] != 1) bad++
	printf "- runs with every copy bit-exact and no process dead: %d of %d\n", n - bad, n
}' "$CSV"
