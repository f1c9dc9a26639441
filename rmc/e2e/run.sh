#!/usr/bin/env bash
# Browser test of the console (see console.test.mjs): installs what it needs — Debian's
# chromium (apt) and playwright-core (npm ci, pinned by package-lock.json) — then runs it
# against target/release/bids (build it first: cargo build --release -p bids).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v chromium >/dev/null 2>&1; then
	if [[ $EUID -ne 0 ]]; then
		echo "rmc/e2e: chromium is missing and installing it needs root (apt-get install chromium)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
export BIDS_BIN="${BIDS_BIN:-$(cd ../.. && pwd)/target/release/bids}"
export CHROMIUM="${CHROMIUM:-$(command -v chromium)}"
npm test
echo "screenshots: rmc/e2e/out/"
