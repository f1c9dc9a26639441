#!/usr/bin/env bash
# Builds real VM disk images of one OS in versions and compares delta tools on them.
#
#   v1: raw ext4 image (sparse, $SIZE) holding a `debootstrap --variant=minbase` Debian
#   v2: copy of v1 with $PKGS_V2 installed in place (loop mount + chroot apt-get)
#   v3: copy of v2 with $PKGS_V3 installed in place
#
# Then, for v1->v2, v2->v3 and v1->v3: `bids delta build/apply` (or the crate's example
# binary when the CLI has no `delta` subcommand) against `xdelta3 -9 -e -s` (default
# 64 MiB source window, and with the window set to the image size) and
# `zstd --patch-from --long=31 -19`: delta size, build and apply time, peak RSS, every
# output verified with cmp. Prints a Markdown table and writes delta/bench/RESULTS.md.
#
# Needs root (loop devices, mount, chroot) and apt (installs debootstrap, xdelta3, zstd,
# e2fsprogs, time if missing). The Debian mirror is the one apt uses on this machine.
#
# Environment: SIZE (1G), SUITE (this machine's Debian codename), WORK (scratch dir,
# default ${TMPDIR:-/var/tmp}/bids-delta-bench), BIDS (target/release/bids), PKGS_V2,
# PKGS_V3, REUSE=1 (keep images already built in WORK), ZSTD_LEVEL (19), SKIP_ZSTD=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE=${SIZE:-1G}
WORK=${WORK:-${TMPDIR:-/var/tmp}/bids-delta-bench}
BIDS=${BIDS:-$ROOT/target/release/bids}
PKGS_V2=${PKGS_V2:-"less nano file"}
PKGS_V3=${PKGS_V3:-"python3-minimal"}
ZSTD_LEVEL=${ZSTD_LEVEL:-19}
REUSE=${REUSE:-0}
RECOMMENDS=${RECOMMENDS:-1}
IMAGES_ONLY=${IMAGES_ONLY:-0}
SKIP_ZSTD=${SKIP_ZSTD:-0}
RESULTS=$HERE/RESULTS.md

log() { printf '[real-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (loop devices, mount, chroot)"

# ---------------------------------------------------------------- tools
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v xdelta3 >/dev/null || need_pkgs+=(xdelta3)
command -v zstd >/dev/null || need_pkgs+=(zstd)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
[ -x /usr/bin/time ] || need_pkgs+=(time)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# ---------------------------------------------------------------- mirror and suite
SUITE=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}
[ -n "$SUITE" ] || die "cannot tell the Debian suite; set SUITE"

# The first `deb` source of apt's configuration that serves $SUITE itself (not
# -updates or -security): one-line .list files and deb822 .sources files.
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uri != "")
                    { print uri; found = 1; exit }
                types = ""; suites = ""; uri = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^Types:/  { sub(/^Types:[ \t]*/, ""); types = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^URIs:/   { sub(/^URIs:[ \t]*/, ""); split($0, u, /[ \t]+/); uri = u[1] }
            END { if (!found) flush() }' "$f"
    done
}
MIRROR=$(find_mirror | head -n1)
[ -n "$MIRROR" ] || die "no deb source for suite $SUITE in /etc/apt/sources.list{,.d/}"
log "suite $SUITE, mirror $MIRROR"

# ---------------------------------------------------------------- delta tool
# The example binary is always built: it also runs the extra high-level row.
EX=$ROOT/target/release/examples/bids-delta
(cd "$ROOT" && cargo build --release -q -p bids-delta --example bids-delta)
if [ -x "$BIDS" ] && "$BIDS" delta --help >/dev/null 2>&1; then
    DELTA=("$BIDS" delta)
    DELTA_NAME="bids delta"
else
    log "$BIDS has no delta subcommand: using the crate's example binary"
    DELTA=("$EX")
    DELTA_NAME="bids-delta (example)"
fi

# ---------------------------------------------------------------- cleanup
mkdir -p "$WORK"
MNT=$WORK/mnt
mkdir -p "$MNT"
LOOPS=()
cleanup() {
    set +e
    for m in "$MNT/dev/pts" "$MNT/dev" "$MNT/proc" "$MNT/sys" "$MNT"; do
        mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    LOOPS=()
}
trap cleanup EXIT INT TERM

attach_mount() { # image
    local dev
    dev=$(losetup --find --show "$1")
    LOOPS+=("$dev")
    mount "$dev" "$MNT"
}
chroot_mounts() {
    mount -t proc proc "$MNT/proc"
    mount -t sysfs sys "$MNT/sys"
    mount --bind /dev "$MNT/dev"
    mount --bind /dev/pts "$MNT/dev/pts"
    cp /etc/resolv.conf "$MNT/etc/resolv.conf" 2>/dev/null || true
}
# Frees the apt cache and gives freed blocks back to the sparse file (what an image
# pipeline does before publishing), then unmounts and detaches.
finish_image() {
    chroot "$MNT" apt-get clean >/dev/null 2>&1 || true
    rm -rf "$MNT/var/lib/apt/lists/"* 2>/dev/null || true
    sync
    fstrim "$MNT" >/dev/null 2>&1 || log "fstrim not supported here; image keeps freed blocks"
    cleanup
}

install_pkgs() { # image pkgs...
    local img=$1; shift
    attach_mount "$img"
    chroot_mounts
    chroot "$MNT" apt-get update -qq
    local rec=(--no-install-recommends)
    [ "$RECOMMENDS" = 1 ] && rec=()
    DEBIAN_FRONTEND=noninteractive chroot "$MNT" apt-get install -y -qq "${rec[@]}" "$@" >/dev/null
    finish_image
}

# ---------------------------------------------------------------- images
V1=$WORK/v1.img V2=$WORK/v2.img V3=$WORK/v3.img
if [ "$REUSE" = 1 ] && [ -f "$V3" ] && [ -f "$WORK/images.done" ]; then
    log "reusing images in $WORK"
else
    rm -f "$V1" "$V2" "$V3" "$WORK/images.done"
    log "v1: $SIZE ext4 + debootstrap --variant=minbase $SUITE (a few minutes)"
    truncate -s "$SIZE" "$V1"
    mkfs.ext4 -q -F -L rootfs "$V1"
    attach_mount "$V1"
    debootstrap --variant=minbase "$SUITE" "$MNT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    finish_image
    log "v2: v1 + $PKGS_V2"
    cp --sparse=always "$V1" "$V2"
    # shellcheck disable=SC2086
    install_pkgs "$V2" $PKGS_V2
    log "v3: v2 + $PKGS_V3"
    cp --sparse=always "$V2" "$V3"
    # shellcheck disable=SC2086
    install_pkgs "$V3" $PKGS_V3
    touch "$WORK/images.done"
fi
[ "$IMAGES_ONLY" = 1 ] && { log "images ready in $WORK"; exit 0; }

# ---------------------------------------------------------------- measurements
# run NAME CMD...: runs CMD under /usr/bin/time -v; sets T_SEC and T_RSS_MB.
run() {
    local name=$1; shift
    local tf=$WORK/time.$name
    if ! /usr/bin/time -v -o "$tf" "$@" >"$WORK/out.$name" 2>&1; then
        cat "$WORK/out.$name" >&2
        die "$name failed: $*"
    fi
    T_SEC=$(awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$tf")
    T_RSS_MB=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$tf")
}

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
bytes_of() { stat -c %s "$1"; }
alloc_of() { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }

XD_WINDOW=$(bytes_of "$V1")
[ "$XD_WINDOW" -le 2147483648 ] || XD_WINDOW=2147483648
ROWS=()
add_row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 | $8 |"); }

compare() { # label from to
    local label=$1 from=$2 to=$3 d=$WORK/delta out=$WORK/out.img
    local bsec brss asec arss size
    log "$label: zstd -3 of the target (reference)"
    run zstd3 zstd -3 -q -f -T1 "$to" -o "$d.zst3"
    add_row "$label" "zstd -3 of target (no delta)" "$(mib "$(bytes_of "$d.zst3")")" "$T_SEC" "$T_RSS_MB" "-" "-" "-"

    log "$label: $DELTA_NAME"
    run bids_build "${DELTA[@]}" build "$from" "$to" "$d.bids"
    bsec=$T_SEC brss=$T_RSS_MB size=$(bytes_of "$d.bids")
    rm -f "$out"
    run bids_apply "${DELTA[@]}" apply "$from" "$d.bids" "$out"
    asec=$T_SEC arss=$T_RSS_MB
    cmp -s "$out" "$to" || die "$DELTA_NAME output differs from $to"
    add_row "$label" "$DELTA_NAME" "$(mib "$size")" "$bsec" "$brss" "$asec" "$arss" "yes (output $(mib "$(alloc_of "$out")") MiB allocated)"
    BIDS_SIZE=$size BIDS_BUILD=$bsec

    # Same algorithm, literals at zstd level 19: what a slower build buys.
    log "$label: bids-delta --level 19"
    run bids19_build "$EX" build --level 19 "$from" "$to" "$d.bids19"
    bsec=$T_SEC brss=$T_RSS_MB size=$(bytes_of "$d.bids19")
    rm -f "$out"
    run bids19_apply "$EX" apply "$from" "$d.bids19" "$out"
    asec=$T_SEC arss=$T_RSS_MB
    cmp -s "$out" "$to" || die "bids-delta --level 19 output differs from $to"
    add_row "$label" "bids-delta --level 19" "$(mib "$size")" "$bsec" "$brss" "$asec" "$arss" "yes"

    for win in default "$XD_WINDOW"; do
        local wopt=() wname="xdelta3 -9 -e -s"
        if [ "$win" != default ]; then wopt=(-B "$win"); wname="xdelta3 -9 -e -B $win -s"; fi
        log "$label: $wname"
        run xd_build xdelta3 -9 -e -f "${wopt[@]}" -s "$from" "$to" "$d.xd"
        bsec=$T_SEC brss=$T_RSS_MB size=$(bytes_of "$d.xd")
        rm -f "$out"
        run xd_apply xdelta3 -d -f "${wopt[@]}" -s "$from" "$d.xd" "$out"
        asec=$T_SEC arss=$T_RSS_MB
        cmp -s "$out" "$to" || die "xdelta3 output differs from $to"
        add_row "$label" "$wname" "$(mib "$size")" "$bsec" "$brss" "$asec" "$arss" "yes"
        if [ "$win" = default ]; then XD_SIZE=$size XD_BUILD=$bsec; fi
    done

    if [ "$SKIP_ZSTD" != 1 ]; then
        log "$label: zstd --patch-from -$ZSTD_LEVEL --long=31"
        run zp_build zstd -q -f -T1 "-$ZSTD_LEVEL" --long=31 --patch-from="$from" "$to" -o "$d.zp"
        bsec=$T_SEC brss=$T_RSS_MB size=$(bytes_of "$d.zp")
        rm -f "$out"
        run zp_apply zstd -q -d -f --long=31 --patch-from="$from" "$d.zp" -o "$out"
        asec=$T_SEC arss=$T_RSS_MB
        cmp -s "$out" "$to" || die "zstd output differs from $to"
        add_row "$label" "zstd --patch-from -$ZSTD_LEVEL --long=31" "$(mib "$size")" "$bsec" "$brss" "$asec" "$arss" "yes"
    fi
    RATIOS+=("$label: size $(awk -v a="$BIDS_SIZE" -v b="$XD_SIZE" 'BEGIN{printf "%.2f", a/b}') x xdelta3 -9, build time $(awk -v a="$BIDS_BUILD" -v b="$XD_BUILD" 'BEGIN{printf "%.2f", (b > 0 ? a/b : 0)}') x xdelta3 -9")
    rm -f "$out" "$d".*
}

RATIOS=()
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
compare "v1→v2" "$V1" "$V2"
compare "v2→v3" "$V2" "$V3"
compare "v1→v3" "$V1" "$V3"

# ---------------------------------------------------------------- report
TABLE=$(
    echo "| pair | tool | delta MiB | build s | build peak RSS MiB | apply s | apply peak RSS MiB | verified |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    printf '%s\n' "${ROWS[@]}"
)
echo "$TABLE"
printf '%s\n' "${RATIOS[@]}"

img_line() { echo "- \`$(basename "$1")\` ($2): $(mib "$(bytes_of "$1")") MiB apparent, $(mib "$(alloc_of "$1")") MiB allocated"; }
{
    echo "# Delta tools on real VM images"
    echo
    echo "Generated by \`delta/bench/real-images.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo
    echo "Command: \`SIZE=$SIZE PKGS_V2=\"$PKGS_V2\" PKGS_V3=\"$PKGS_V3\" ZSTD_LEVEL=$ZSTD_LEVEL delta/bench/real-images.sh\`"
    echo
    echo "## Machine"
    echo "- CPU: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(nproc) cores available"
    echo "- memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -r); OS: $(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "- tools: $(xdelta3 -V 2>&1 | head -n1 | cut -d, -f1), $(zstd -V | head -n1 | tr -d '*' | sed 's/^ *//; s/ *$//'), delta tool: $DELTA_NAME"
    echo "- load average when the measurements started: $LOAD_AT_START (the 2 cores are shared with other jobs: times are wall clock and noisy)"
    echo "- all files in the page cache (warm), no other tuning; peak RSS from \`/usr/bin/time -v\`"
    echo
    echo "## Images"
    echo "Raw ext4, $SIZE sparse, Debian $SUITE \`debootstrap --variant=minbase\`; after each"
    echo "install \`apt-get clean\`, apt lists removed and \`fstrim\` (freed blocks become holes)."
    img_line "$V1" "minbase"
    img_line "$V2" "v1 + $PKGS_V2"
    img_line "$V3" "v2 + $PKGS_V3"
    echo
    echo "## Results"
    echo
    echo "$TABLE"
    echo
    echo "Notes: \"zstd -3 of target\" is the cost of shipping the new version whole (the"
    echo "reference for what a delta saves). bids-delta apply verifies the base and the output"
    echo "SHA-256 and fsyncs the output before renaming it into place; xdelta3 and zstd do"
    echo "neither. xdelta3 is shown with its default 64 MiB source window (the command the"
    echo "brief names) and with the window widened to the whole image."
    echo
    echo "Ratios (bids-delta against \`xdelta3 -9 -e -s\` with its default window):"
    echo
    printf -- '- %s\n' "${RATIOS[@]}"
} >"$RESULTS"
log "wrote $RESULTS"
