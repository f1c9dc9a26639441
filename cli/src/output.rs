//! Results on stdout. A reader that stops early (`bids image status … | head -1`) closes the
//! pipe; `println!` would then panic. Like other command-line tools (ripgrep among them),
//! `bids` ends quietly instead, with exit status 0: the reader got what it asked for.

use std::io::Write;

/// Writes to stdout; on a closed pipe the process ends quietly, on another error with a
/// message.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    done_or_exit(out.write_fmt(args));
}

pub fn write_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    done_or_exit(out.write_all(bytes).and_then(|_| out.flush()));
}

/// For daemons announcing their addresses: a closed stdout must not stop a daemon.
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

fn done_or_exit(r: std::io::Result<()>) {
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}
