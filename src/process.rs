//! The router process's own usage, read from /proc for the standard `process_*` metrics.

/// CPU, memory and descriptors of this process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: usize,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

impl Usage {
    /// Read it now; `None` where /proc is not there.
    pub fn read() -> Option<Usage> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Numbered as in proc(5): field 3 (state) is fields[0].
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
            )
        };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            0
        };
        Some(Usage {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            resident_bytes: field(24)? * page,
            open_fds: crate::net::open_descriptors().unwrap_or(0),
            max_fds,
            start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_plausible() {
        let usage = Usage::read().expect("/proc is there on Linux");
        assert!(usage.resident_bytes > 1 << 20);
        assert!(usage.open_fds >= 3);
        assert!(usage.max_fds >= usage.open_fds as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            usage.start_time_seconds <= now + 1.0
                && usage.start_time_seconds > now - 86_400.0 * 365.0
        );
    }
}
