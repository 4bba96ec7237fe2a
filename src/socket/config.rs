//! Defaults from `/etc/rdma/rsocket/*`, read once, with librdmacm's file names and defaults.
//!
//! `RSOCKET_CONFIG_DIR` overrides the directory (tests use it).

use std::path::Path;
use std::sync::OnceLock;

/// Process-wide defaults for new rsockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Microseconds to busy-poll before sleeping on the completion channel.
    pub polling_time: u32,
    /// No `polling_time` file: blocking calls adapt their busy-poll between `polling_time` and
    /// [`crate::socket::spin::CAP_US`] to the waits they see (see [`crate::socket::spin`]); a
    /// `polling_time` file fixes it, as in librdmacm.
    pub adaptive_spin: bool,
    /// Milliseconds between wake-ups of internal services.
    pub wake_up_interval: u32,
    /// Default inline send size.
    pub inline_default: u32,
    /// Default send queue size.
    pub sqsize_default: u32,
    /// Default receive queue size.
    pub rqsize_default: u32,
    /// Default receive buffer bytes.
    pub mem_default: u32,
    /// Default send buffer bytes.
    pub wmem_default: u32,
    /// iomap entries offered to peers.
    pub iomap_size: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            polling_time: 10,
            adaptive_spin: true,
            wake_up_interval: 500,
            inline_default: 64,
            sqsize_default: 384,
            rqsize_default: 384,
            mem_default: 1 << 17,
            wmem_default: 1 << 17,
            iomap_size: 0,
        }
    }
}

impl Config {
    /// Reads the files present in `dir`; missing or unparsable files keep the default.
    pub fn load(dir: &Path) -> Config {
        Config::parse(|name| std::fs::read_to_string(dir.join(name)).ok())
    }

    /// The configuration from the files' contents, `file(name)` (None: no such file); what
    /// does not parse keeps the default. Any contents give a configuration (fuzzed).
    pub fn parse(file: impl Fn(&str) -> Option<String>) -> Config {
        let mut c = Config::default();
        let read = |name: &str, v: &mut u32| {
            if let Some(s) = file(name)
                && let Ok(n) = s.trim().parse::<u32>()
            {
                *v = n;
            }
        };
        read("polling_time", &mut c.polling_time);
        c.adaptive_spin = file("polling_time").is_none();
        read("wake_up_interval", &mut c.wake_up_interval);
        read("inline_default", &mut c.inline_default);
        read("sqsize_default", &mut c.sqsize_default);
        read("rqsize_default", &mut c.rqsize_default);
        read("mem_default", &mut c.mem_default);
        read("wmem_default", &mut c.wmem_default);
        read("iomap_size", &mut c.iomap_size);
        // librdmacm: the send buffer is at least 2048 bytes, else 4096.
        if c.wmem_default < 2048 {
            c.wmem_default = 4096;
        }
        if c.mem_default < 2048 {
            c.mem_default = 4096;
        }
        c
    }

    /// The process-wide configuration (loaded at first use).
    pub fn get() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| {
            let dir = std::env::var_os("RSOCKET_CONFIG_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/etc/rdma/rsocket".into());
            Config::load(&dir)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_override_defaults() {
        let dir = std::env::temp_dir().join(format!("rsocket-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("polling_time"), "25\n").unwrap();
        std::fs::write(dir.join("mem_default"), "1000").unwrap();
        std::fs::write(dir.join("sqsize_default"), "garbage").unwrap();
        let c = Config::load(&dir);
        assert_eq!(c.polling_time, 25);
        assert!(!c.adaptive_spin, "a polling_time file fixes the busy-poll");
        assert_eq!(c.mem_default, 4096, "below 2048 becomes 4096");
        assert_eq!(c.sqsize_default, 384, "unparsable keeps the default");
        assert_eq!(Config::load(Path::new("/nonexistent")), Config::default());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
