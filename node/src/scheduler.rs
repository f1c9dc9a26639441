//! Download scheduler (sans-IO): which chunk from which peer, retries, penalties.
