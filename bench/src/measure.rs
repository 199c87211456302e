//! Measurements from real system files, each readable from a chosen root so tests use temp
//! dirs and fixture text: interface byte counters (`/sys/class/net/DEV/statistics`), host CPU
//! time (`/proc/stat`), per-process CPU time (`/proc/PID/stat`), cgroup CPU time
//! (`cpu.stat`), and a [`Sampler`] that records any of them over time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{io_err, Error, Result};

/// The unit of `/proc/stat` and `/proc/PID/stat` times: `USER_HZ`, which Linux exports as
/// 100 on every architecture the lab runs on (x86-64, arm64), independent of the kernel's HZ.
pub const USER_HZ: u64 = 100;

/// Byte counters of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

impl NetCounters {
    /// `self - earlier` per direction (saturating: a counter reset reads as 0).
    pub fn since(self, earlier: NetCounters) -> NetCounters {
        NetCounters {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
        }
    }
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.trim().parse().map_err(|e| Error::Parse {
        what: path.display().to_string(),
        detail: format!("{e}: {:?}", text.trim()),
    })
}

/// Reads `SYSFS/class/net/DEV/statistics/{rx,tx}_bytes`; `sysfs` is `/sys` on a real machine.
///
/// sysfs shows the interfaces of the network namespace of the process that mounted it: for a
/// lab interface inside a namespace, read the host-side peer (veth on the hub) or pass a
/// closure to [`Sampler`] that enters the namespace.
pub fn read_net_counters(sysfs: &Path, dev: &str) -> Result<NetCounters> {
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(Error::Data(format!("bad interface name {dev:?}")));
    }
    let stats = sysfs.join("class/net").join(dev).join("statistics");
    Ok(NetCounters {
        rx_bytes: read_u64(&stats.join("rx_bytes"))?,
        tx_bytes: read_u64(&stats.join("tx_bytes"))?,
    })
}

/// Parses `/proc/PID/net/dev` (the interfaces of PID's network namespace) for `dev`.
pub fn parse_proc_net_dev(text: &str, dev: &str) -> Result<NetCounters> {
    let line = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim() == dev)
        .ok_or_else(|| Error::Parse {
            what: "net/dev".into(),
            detail: format!("no interface {dev}"),
        })?;
    let f: Vec<u64> = line
        .1
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    if f.len() < 9 {
        return Err(Error::Parse {
            what: "net/dev".into(),
            detail: format!("short line for {dev}"),
        });
    }
    Ok(NetCounters {
        rx_bytes: f[0],
        tx_bytes: f[8],
    })
}

/// Reads `PROC/PID/net/dev` for `dev`: the counters of an interface inside the network
/// namespace of process `pid`, without entering the namespace (cheap enough to sample).
pub fn read_netns_counters(proc: &Path, pid: u32, dev: &str) -> Result<NetCounters> {
    let p = proc.join(pid.to_string()).join("net/dev");
    let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    parse_proc_net_dev(&text, dev)
}

/// Host CPU time from the first (`cpu `) line of `/proc/stat`, in [`USER_HZ`] ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCpu {
    /// user
    pub user: u64,
    /// nice
    pub nice: u64,
    /// system
    pub system: u64,
    /// idle
    pub idle: u64,
    /// iowait
    pub iowait: u64,
    /// irq
    pub irq: u64,
    /// softirq
    pub softirq: u64,
    /// steal
    pub steal: u64,
}

impl HostCpu {
    /// Ticks spent doing work (everything but idle and iowait; guest time is already in user).
    pub fn busy_ticks(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    /// All ticks.
    pub fn total_ticks(&self) -> u64 {
        self.busy_ticks() + self.idle + self.iowait
    }

    /// Busy CPU seconds between `earlier` and `self`.
    pub fn busy_seconds_since(&self, earlier: &HostCpu) -> f64 {
        self.busy_ticks().saturating_sub(earlier.busy_ticks()) as f64 / USER_HZ as f64
    }

    /// Share of the whole host busy between `earlier` and `self`, 0.0..=1.0 (0 if no time passed).
    pub fn utilisation_since(&self, earlier: &HostCpu) -> f64 {
        let total = self.total_ticks().saturating_sub(earlier.total_ticks());
        if total == 0 {
            return 0.0;
        }
        self.busy_ticks().saturating_sub(earlier.busy_ticks()) as f64 / total as f64
    }
}

/// Parses the text of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Result<HostCpu> {
    let bad = |d: &str| Error::Parse {
        what: "/proc/stat".into(),
        detail: d.into(),
    };
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| bad("no aggregate `cpu ` line"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>().map_err(|e| bad(&format!("{e}: {f:?}"))))
        .collect::<Result<_>>()?;
    if v.len() < 4 {
        return Err(bad("fewer than 4 fields"));
    }
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(HostCpu {
        user: g(0),
        nice: g(1),
        system: g(2),
        idle: g(3),
        iowait: g(4),
        irq: g(5),
        softirq: g(6),
        steal: g(7),
    })
}

/// Reads `PROC/stat`; `proc` is `/proc` on a real machine.
pub fn read_host_cpu(proc: &Path) -> Result<HostCpu> {
    let p = proc.join("stat");
    parse_proc_stat(&std::fs::read_to_string(&p).map_err(io_err(&p))?)
}

/// CPU time of one process from `/proc/PID/stat`, in [`USER_HZ`] ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcCpu {
    /// utime (field 14)
    pub utime: u64,
    /// stime (field 15)
    pub stime: u64,
}

impl ProcCpu {
    /// utime + stime, seconds.
    pub fn seconds(&self) -> f64 {
        (self.utime + self.stime) as f64 / USER_HZ as f64
    }
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after the last `)`.
pub fn parse_pid_stat(text: &str) -> Result<ProcCpu> {
    let bad = |d: &str| Error::Parse {
        what: "/proc/PID/stat".into(),
        detail: d.into(),
    };
    let rest = &text[text.rfind(')').ok_or_else(|| bad("no `)`"))? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); utime is field 14 -> f[11], stime field 15 -> f[12].
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .ok_or_else(|| bad("too few fields"))?
            .parse()
            .map_err(|e| bad(&format!("{e}")))
    };
    Ok(ProcCpu {
        utime: get(11)?,
        stime: get(12)?,
    })
}

/// Reads `PROC/PID/stat`.
pub fn read_pid_cpu(proc: &Path, pid: u32) -> Result<ProcCpu> {
    let p = proc.join(pid.to_string()).join("stat");
    parse_pid_stat(&std::fs::read_to_string(&p).map_err(io_err(&p))?)
}

/// Sums the CPU time of `pids`; processes that are gone are skipped and returned apart.
///
/// A process that exits (the source QEMU at the end of a migration) takes its time with it:
/// sample it before it goes, or prefer host totals ([`read_host_cpu`]) or a cgroup's
/// [`read_cgroup_cpu_usec`].
pub fn read_pids_cpu(proc: &Path, pids: &[u32]) -> Result<(ProcCpu, Vec<u32>)> {
    let mut sum = ProcCpu::default();
    let mut gone = Vec::new();
    for &pid in pids {
        match read_pid_cpu(proc, pid) {
            Ok(c) => {
                sum.utime += c.utime;
                sum.stime += c.stime;
            }
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) || source.raw_os_error() == Some(3) =>
            {
                gone.push(pid)
            }
            Err(e) => return Err(e),
        }
    }
    Ok((sum, gone))
}

/// Parses `usage_usec` from a cgroup v2 `cpu.stat`.
pub fn parse_cgroup_cpu_stat(text: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Parse {
            what: "cpu.stat".into(),
            detail: "no usage_usec".into(),
        })
}

/// Reads `CGROUP_DIR/cpu.stat`'s `usage_usec` (CPU time of everything in the cgroup, exited
/// processes included).
pub fn read_cgroup_cpu_usec(cgroup_dir: &Path) -> Result<u64> {
    let p = cgroup_dir.join("cpu.stat");
    parse_cgroup_cpu_stat(&std::fs::read_to_string(&p).map_err(io_err(&p))?)
}

/// One sample: seconds since the sampler started and the value read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<T> {
    /// Seconds since the start of sampling.
    pub t_s: f64,
    /// The value.
    pub value: T,
}

/// Records a reading at a fixed interval on a thread of its own, until stopped.
///
/// The first sample is taken at once (t = 0), the last one when [`Sampler::stop`] is called,
/// so the series spans the whole measured interval.
pub struct Sampler<T> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Vec<Sample<T>>>>>,
}

impl<T: Send + 'static> Sampler<T> {
    /// Starts sampling `read` every `interval`.
    pub fn start<F>(interval: Duration, mut read: F) -> Sampler<T>
    where
        F: FnMut() -> Result<T> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            let mut next = t0;
            loop {
                let stopping = flag.load(Ordering::Acquire);
                out.push(Sample {
                    t_s: t0.elapsed().as_secs_f64(),
                    value: read()?,
                });
                if stopping {
                    return Ok(out);
                }
                next += interval;
                // Sleep in short steps so stop() answers quickly.
                while !flag.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= next {
                        break;
                    }
                    std::thread::sleep((next - now).min(Duration::from_millis(10)));
                }
            }
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Takes a last sample, stops and returns the series (or the first read error).
    pub fn stop(mut self) -> Result<Vec<Sample<T>>> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Data("sampler thread panicked".into())),
            None => Ok(Vec::new()),
        }
    }
}

impl<T> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Rate per second between consecutive samples of a counter, at the end of each interval:
/// `(t_i, (v_i - v_{i-1}) / (t_i - t_{i-1}))`. Byte counters give bytes/s.
pub fn rates(samples: &[Sample<u64>]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter(|w| w[1].t_s > w[0].t_s)
        .map(|w| {
            let dv = w[1].value.saturating_sub(w[0].value) as f64;
            (w[1].t_s, dv / (w[1].t_s - w[0].t_s))
        })
        .collect()
}

/// Host CPU utilisation (percent of the whole host, 0..=100) per interval.
pub fn utilisation_percent(samples: &[Sample<HostCpu>]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .map(|w| (w[1].t_s, 100.0 * w[1].value.utilisation_since(&w[0].value)))
        .collect()
}

/// Increase of a counter over the series (last - first).
pub fn total_increase(samples: &[Sample<u64>]) -> u64 {
    match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => b.value.saturating_sub(a.value),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_dev_is_parsed_per_interface() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  eth0: 1234567    890    0    0    0     0          0         0  7654321    4321    0    0    0     0       0          0
";
        let c = parse_proc_net_dev(text, "eth0").unwrap();
        assert_eq!((c.rx_bytes, c.tx_bytes), (1_234_567, 7_654_321));
        assert!(parse_proc_net_dev(text, "eth1").is_err());
        // Our own namespace always has a loopback interface.
        read_netns_counters(Path::new("/proc"), std::process::id(), "lo")
            .expect("lo in this process's namespace");
    }
    use std::sync::atomic::AtomicU64;

    const PROC_STAT: &str = "cpu  10132153 290696 3084719 46828483 16683 0 25195 0 0 0\n\
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 0 0\n\
intr 199292311 57 0 0 1 1 0 0 0 1 0\nctxt 274\nbtime 1700000000\n";

    #[test]
    fn proc_stat_fixture() {
        let c = parse_proc_stat(PROC_STAT).unwrap();
        assert_eq!(c.user, 10132153);
        assert_eq!(c.idle, 46828483);
        assert_eq!(c.softirq, 25195);
        assert_eq!(c.busy_ticks(), 10132153 + 290696 + 3084719 + 25195);
        let mut later = c;
        later.user += 150;
        later.idle += 50;
        assert!((later.busy_seconds_since(&c) - 1.5).abs() < 1e-9);
        assert!((later.utilisation_since(&c) - 0.75).abs() < 1e-9);
        assert_eq!(c.utilisation_since(&c), 0.0);
        // Old kernels have only 4 fields.
        assert_eq!(parse_proc_stat("cpu 1 2 3 4\n").unwrap().idle, 4);
        assert!(parse_proc_stat("cpu0 1 2 3 4\n").is_err());
        assert!(parse_proc_stat("cpu 1 x 3 4\n").is_err());
    }

    #[test]
    fn pid_stat_fixture_with_odd_command_name() {
        let text = "4242 (qemu (sys) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    777 333 5 6 20 0 3 0 100 1000000 200 18446744073709551615\n";
        let c = parse_pid_stat(text).unwrap();
        assert_eq!(
            c,
            ProcCpu {
                utime: 777,
                stime: 333
            }
        );
        assert!((c.seconds() - 11.1).abs() < 1e-9);
        assert!(parse_pid_stat("1 (x) S 1 2").is_err());
        assert!(parse_pid_stat("garbage").is_err());
    }

    #[test]
    fn pids_sum_skips_the_gone() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, u, s) in [(10, 100, 50), (11, 1, 2)] {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir(&d).unwrap();
            std::fs::write(
                d.join("stat"),
                format!("{pid} (qemu-system-x86) S 1 1 1 0 -1 0 0 0 0 0 {u} {s} 0 0 20 0 1 0"),
            )
            .unwrap();
        }
        let (sum, gone) = read_pids_cpu(dir.path(), &[10, 11, 12]).unwrap();
        assert_eq!(
            sum,
            ProcCpu {
                utime: 101,
                stime: 52
            }
        );
        assert_eq!(gone, vec![12]);
    }

    #[test]
    fn real_proc_is_readable() {
        let c = read_host_cpu(Path::new("/proc")).unwrap();
        assert!(c.total_ticks() > 0);
        let me = read_pid_cpu(Path::new("/proc"), std::process::id()).unwrap();
        assert!(me.seconds() >= 0.0);
    }

    #[test]
    fn cgroup_cpu_stat() {
        assert_eq!(
            parse_cgroup_cpu_stat("usage_usec 123456\nuser_usec 1\nsystem_usec 2\n").unwrap(),
            123456
        );
        assert!(parse_cgroup_cpu_stat("user_usec 1\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 9\n").unwrap();
        assert_eq!(read_cgroup_cpu_usec(dir.path()).unwrap(), 9);
    }

    fn fake_sysfs(root: &Path, dev: &str, rx: u64, tx: u64) {
        let s = root.join("class/net").join(dev).join("statistics");
        std::fs::create_dir_all(&s).unwrap();
        // Write-then-rename: a concurrent reader sees the old or the new value, never "".
        for (name, v) in [("rx_bytes", rx), ("tx_bytes", tx)] {
            let tmp = s.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, format!("{v}\n")).unwrap();
            std::fs::rename(&tmp, s.join(name)).unwrap();
        }
    }

    #[test]
    fn net_counters_from_a_root() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), "veth-cvm1", 100, 5000);
        let a = read_net_counters(dir.path(), "veth-cvm1").unwrap();
        assert_eq!(
            a,
            NetCounters {
                rx_bytes: 100,
                tx_bytes: 5000
            }
        );
        fake_sysfs(dir.path(), "veth-cvm1", 150, 9000);
        let b = read_net_counters(dir.path(), "veth-cvm1").unwrap();
        assert_eq!(
            b.since(a),
            NetCounters {
                rx_bytes: 50,
                tx_bytes: 4000
            }
        );
        assert!(read_net_counters(dir.path(), "nope").is_err());
        assert!(read_net_counters(dir.path(), "../x").is_err());
        let s = dir.path().join("class/net/bad/statistics");
        std::fs::create_dir_all(&s).unwrap();
        std::fs::write(s.join("rx_bytes"), "x").unwrap();
        assert!(matches!(
            read_net_counters(dir.path(), "bad"),
            Err(Error::Parse { .. })
        ));
    }

    #[test]
    fn real_loopback_counters() {
        let c = read_net_counters(Path::new("/sys"), "lo").unwrap();
        let _ = c.rx_bytes + c.tx_bytes;
    }

    #[test]
    fn sampler_records_a_growing_counter_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        fake_sysfs(&root, "eth0", 0, 0);
        let r2 = root.clone();
        let sampler = Sampler::start(Duration::from_millis(5), move || {
            Ok(read_net_counters(&r2, "eth0")?.tx_bytes)
        });
        for i in 1..=10u64 {
            std::thread::sleep(Duration::from_millis(4));
            fake_sysfs(&root, "eth0", 0, i * 1000);
        }
        let s = sampler.stop().unwrap();
        assert!(s.len() >= 3, "{s:?}");
        assert_eq!(s[0].t_s.min(1.0), s[0].t_s);
        assert!(s
            .windows(2)
            .all(|w| w[1].t_s >= w[0].t_s && w[1].value >= w[0].value));
        assert_eq!(s.last().unwrap().value, 10_000);
        assert_eq!(total_increase(&s), 10_000 - s[0].value);
        assert!(rates(&s).iter().all(|&(_, r)| r >= 0.0));
    }

    #[test]
    fn sampler_returns_the_read_error() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let sampler = Sampler::start(Duration::from_millis(1), move || {
            if n2.fetch_add(1, Ordering::SeqCst) >= 2 {
                Err(Error::Data("gone".into()))
            } else {
                Ok(1u64)
            }
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(sampler.stop().is_err());
    }

    #[test]
    fn rates_and_utilisation_are_exact_on_synthetic_samples() {
        let s = vec![
            Sample {
                t_s: 0.0,
                value: 0u64,
            },
            Sample {
                t_s: 0.5,
                value: 500,
            },
            Sample {
                t_s: 1.5,
                value: 2500,
            },
        ];
        assert_eq!(rates(&s), vec![(0.5, 1000.0), (1.5, 2000.0)]);
        let c0 = HostCpu::default();
        let c1 = HostCpu {
            user: 50,
            idle: 150,
            ..c0
        };
        let u = utilisation_percent(&[
            Sample {
                t_s: 0.0,
                value: c0,
            },
            Sample {
                t_s: 1.0,
                value: c1,
            },
        ]);
        assert_eq!(u, vec![(1.0, 25.0)]);
        assert_eq!(total_increase(&[]), 0);
    }
}
