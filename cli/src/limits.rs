//! Process limits the daemons need: every connection is a file descriptor, and the default
//! soft limit of many hosts (1024) would cap a GIS far below the hosts it must serve.

use tracing::{info, warn};

/// Descriptors kept for what is not a connection: the store's or the GIS's database and
/// image files, the listeners, the control socket, logs.
const RESERVED_FDS: u64 = 64;

/// Raises the soft limit of open files to the hard limit (what the host allows without
/// privileges) and says once, at INFO, how many connections that admits: for the GIS one
/// per live host, for a node one per peer it talks to. `who` names them in that line.
pub fn raise_open_files(who: &str) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            warn!(error = %std::io::Error::last_os_error(), soft = before, hard = lim.rlim_max, "cannot raise the open-file limit");
        }
    }
    let limit = lim.rlim_cur;
    let admits = limit.saturating_sub(RESERVED_FDS);
    if limit > before {
        info!(
            "open-file limit {limit} (raised from {before}, the host's hard limit): admits about {admits} {who}"
        );
    } else {
        info!("open-file limit {limit} (the host's hard limit): admits about {admits} {who}");
    }
}
