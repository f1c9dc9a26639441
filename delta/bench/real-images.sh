#!/usr/bin/env bash
# Builds real VM disk images of one OS in versions and compares delta tools on them.
#
#   v1: raw ext4 image (sparse, $SIZE) holding a `debootstrap --variant=minbase` Debian
#   v2: copy of v1 with $PKGS_V2 installed in place (loop mount + chroot apt-get)
#   v3: copy of v2 with $PKGS_V3 installed in place
#
# Then, for v1->v2, v2->v3 and v1->v3: `bids delta build/apply` at its default level
# against the three anchors of issue 22, all measured in the same run: `xdelta3 -9 -e -s`
# (default 64 MiB source window), `zstd -3 --long=31 --patch-from` and
# `zstd -19 --long=31 --patch-from`; optionally a previous delta encoder (OLD_DELTA, a
# `bids-delta` example binary built from an older commit: its apply time is the
# reference "today's apply") and extra `--level` rows. Delta size, build and apply time,
# peak RSS, every output verified with cmp. Prints a Markdown table and ratios and writes
# delta/bench/RESULTS.md.
#
# Needs root (loop devices, mount, chroot) and apt (installs debootstrap, xdelta3, zstd,
# e2fsprogs, time if missing). The Debian mirror is the one apt uses on this machine.
#
# Environment: SIZE (1G), SUITE (this machine's Debian codename), WORK (scratch dir,
# default ${TMPDIR:-/var/tmp}/bids-delta-bench), BIDS (target/release/bids), PKGS_V2
# ("openssh-server curl python3-minimal"), PKGS_V3 ("nginx-light git"), RECOMMENDS (1:
# apt installs recommended packages too), REUSE=1 (keep images already built in WORK),
# IMAGES_ONLY=1 (stop once the images are built), OLD_DELTA, OLD_LABEL (its row's name,
# "previous encoder"), EXTRA_LEVELS ("": e.g.
# "9 22"), PAIRS ("v1:v2 v2:v3 v1:v3").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE=${SIZE:-1G}
WORK=${WORK:-${TMPDIR:-/var/tmp}/bids-delta-bench}
BIDS=${BIDS:-$ROOT/target/release/bids}
PKGS_V2=${PKGS_V2:-"openssh-server curl python3-minimal"}
PKGS_V3=${PKGS_V3:-"nginx-light git"}
OLD_DELTA=${OLD_DELTA:-}
OLD_LABEL=${OLD_LABEL:-previous encoder}
EXTRA_LEVELS=${EXTRA_LEVELS:-}
PAIRS=${PAIRS:-"v1:v2 v2:v3 v1:v3"}
REUSE=${REUSE:-0}
RECOMMENDS=${RECOMMENDS:-1}
IMAGES_ONLY=${IMAGES_ONLY:-0}
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
(cd "$ROOT" && cargo build --release -q -p bids)
[ -x "$BIDS" ] || die "no bids binary at $BIDS"
DELTA_NAME="bids delta (default level)"

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

ROWS=()
add_row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 | $8 |"); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }

# measure LABEL NAME BUILD-CMD... -- APPLY-CMD...: runs both (the delta at $d, the output
# at $out), checks the output, adds a row; sets M_SIZE M_BUILD M_BRSS M_APPLY M_ARSS.
measure() {
    local label=$1 name=$2; shift 2
    local build=() apply=()
    while [ "$1" != -- ]; do build+=("$1"); shift; done
    shift
    apply=("$@")
    log "$label: $name"
    rm -f "$d" "$out"
    run build "${build[@]}"
    M_BUILD=$T_SEC M_BRSS=$T_RSS_MB M_SIZE=$(bytes_of "$d")
    run apply "${apply[@]}"
    M_APPLY=$T_SEC M_ARSS=$T_RSS_MB
    cmp -s "$out" "$to" || die "$name: output differs from $to"
    add_row "$label" "$name" "$(mib "$M_SIZE")" "$M_BUILD" "$M_BRSS" "$M_APPLY" "$M_ARSS" "yes"
    rm -f "$d" "$out"
}

compare() { # label from to
    local label=$1 from=$2
    to=$3 d=$WORK/delta out=$WORK/out.img
    local lvl
    log "$label: zstd -3 of the target (reference)"
    run zstd3 zstd -3 -q -f -T1 "$to" -o "$d.zst3"
    add_row "$label" "zstd -3 of target (no delta)" "$(mib "$(bytes_of "$d.zst3")")" "$T_SEC" "$T_RSS_MB" "-" "-" "-"
    rm -f "$d.zst3"

    measure "$label" "$DELTA_NAME" \
        "$BIDS" delta build --from "$from" --to "$to" --out "$d" -- \
        "$BIDS" delta apply --base "$from" --delta "$d" --out "$out"
    local b_size=$M_SIZE b_build=$M_BUILD b_brss=$M_BRSS b_apply=$M_APPLY
    for lvl in $EXTRA_LEVELS; do
        measure "$label" "bids delta --level $lvl" \
            "$BIDS" delta build --level "$lvl" --from "$from" --to "$to" --out "$d" -- \
            "$BIDS" delta apply --base "$from" --delta "$d" --out "$out"
    done
    local o_apply=""
    if [ -n "$OLD_DELTA" ]; then
        measure "$label" "$OLD_LABEL" \
            "$OLD_DELTA" build "$from" "$to" "$d" -- "$OLD_DELTA" apply "$from" "$d" "$out"
        o_apply=$M_APPLY
    fi
    measure "$label" "xdelta3 -9 -e -s" \
        xdelta3 -9 -e -f -s "$from" "$to" "$d" -- xdelta3 -d -f -s "$from" "$d" "$out"
    local x_build=$M_BUILD
    measure "$label" "zstd -3 --long=31 --patch-from" \
        zstd -q -f -T1 -3 --long=31 --patch-from="$from" "$to" -o "$d" -- \
        zstd -q -d -f --long=31 --patch-from="$from" "$d" -o "$out"
    measure "$label" "zstd -19 --long=31 --patch-from" \
        zstd -q -f -T1 -19 --long=31 --patch-from="$from" "$to" -o "$d" -- \
        zstd -q -d -f --long=31 --patch-from="$from" "$d" -o "$out"
    local z_size=$M_SIZE
    local line="$label: size $(ratio "$b_size" "$z_size") x zstd -19 ($( [ "$b_size" -le "$z_size" ] && echo met || echo MISSED)); build time $(ratio "$b_build" "$x_build") x xdelta3 -9 ($(awk -v a="$b_build" -v b="$x_build" 'BEGIN { print (a <= 0.5 * b) ? "met" : "MISSED" }')); build peak RSS $b_brss MiB ($( [ "$b_brss" -le 256 ] && echo met || echo MISSED))"
    if [ -n "$o_apply" ]; then
        line="$line; apply time $(ratio "$b_apply" "$o_apply") x the previous encoder's ($(awk -v a="$b_apply" -v b="$o_apply" 'BEGIN { print (a <= 2 * b) ? "met" : "MISSED" }'))"
    fi
    RATIOS+=("$line")
}

RATIOS=()
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
# ---------------------------------------------------------------- report
# Prints the table so far and (re)writes RESULTS.md: called after every pair, so a long
# run that is stopped keeps what it measured.
report() {
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
    echo "Command: \`SIZE=$SIZE PKGS_V2=\"$PKGS_V2\" PKGS_V3=\"$PKGS_V3\" RECOMMENDS=$RECOMMENDS EXTRA_LEVELS=\"$EXTRA_LEVELS\" OLD_DELTA=${OLD_DELTA:+<bids-delta of an older commit>} OLD_LABEL=\"$OLD_LABEL\" delta/bench/real-images.sh\`"
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
    echo "Raw ext4, $SIZE sparse, Debian $SUITE \`debootstrap --variant=minbase\`; packages"
    echo "installed in place through a loop mount (recommended packages: $( [ "$RECOMMENDS" = 1 ] && echo yes || echo no));"
    echo "after each install \`apt-get clean\`, apt lists removed and \`fstrim\` (freed blocks become holes)."
    img_line "$V1" "minbase"
    img_line "$V2" "v1 + $PKGS_V2"
    img_line "$V3" "v2 + $PKGS_V3"
    echo
    echo "## Results"
    echo
    echo "$TABLE"
    echo
    echo "Notes: \"zstd -3 of target\" is the cost of shipping the new version whole (the"
    echo "reference for what a delta saves). bids apply verifies the base and the output"
    echo "SHA-256 and fsyncs the output before renaming it into place; xdelta3 and zstd do"
    echo "neither. Times are wall clock on a shared machine: compare ratios within this run."
    echo
    echo "Goals of issue 22 (size ≤ zstd -19's; build time ≤ 0.5 × xdelta3 -9's; build peak"
    echo "RSS ≤ 256 MiB; apply time ≤ 2 × the previous encoder's), as measured:"
    echo
    printf -- '- %s\n' "${RATIOS[@]}"
} >"$RESULTS"
log "wrote $RESULTS"
}

for pair in $PAIRS; do
    f=${pair%%:*} t=${pair##*:}
    compare "$f→$t" "$WORK/$f.img" "$WORK/$t.img"
    report
done

