//! The process nemesis shared by the workloads: at random times it kills
//! a node's process (SIGKILL) and restarts it the same way (its command
//! line, environment and directory read from /proc), or pauses it
//! (SIGSTOP) and resumes it, or (if asked) kills it and restarts it with
//! its wall clock off by up to a bound; and records what it did.
//!
//! It only signals and spawns the processes it was given; it never reads
//! or writes their data.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Faults injected into the nodes' processes.
#[derive(Clone, Debug)]
pub struct NemesisConfig {
    /// The processes to torment (their command lines are read from /proc, so
    /// a killed one is restarted the same way).
    pub pids: Vec<u32>,
    /// A fault every this long on average.
    pub interval: Duration,
    /// How long a fault lasts before the process is restarted or resumed.
    pub fault_duration: Duration,
    /// Also restart nodes with their wall clock up to this far off (the
    /// `TARDIGRADE_TESTING_CLOCK_SKEW_MS` knob), as a third kind of fault.
    pub clock_skew: Option<Duration>,
}

/// A small seeded xorshift generator (runs are reproducible by seed).
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A process the nemesis can stop and bring back.
struct Victim {
    pid: u32,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    /// Where its stderr went, if a file (the restarted process appends there).
    log: Option<PathBuf>,
}

fn read_victim(pid: u32) -> Option<Victim> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    // Its environment too, so a restarted node runs exactly as before.
    let env = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let log = std::fs::read_link(format!("/proc/{pid}/fd/2"))
        .ok()
        .filter(|p| p.is_file());
    (!argv.is_empty()).then_some(Victim {
        pid,
        argv,
        env,
        cwd,
        log,
    })
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain libc call on a pid the caller owns.
    unsafe { libc::kill(pid as i32, sig) };
}

fn respawn(v: &Victim) -> Option<u32> {
    let path = v
        .log
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("nemesis-restart-{}.log", v.pid)));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(path).ok()?;
    let child = std::process::Command::new(&v.argv[0])
        .args(&v.argv[1..])
        .env_clear()
        .envs(v.env.iter().cloned())
        .current_dir(&v.cwd)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .ok()?;
    Some(child.id())
}

pub async fn nemesis(cfg: NemesisConfig, seed: u64, deadline: Instant, faults: Arc<Mutex<Vec<String>>>) -> Vec<u32> {
    let mut victims: Vec<Victim> = cfg.pids.iter().filter_map(|&p| read_victim(p)).collect();
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut restarted = Vec::new();
    loop {
        let wait = cfg.interval / 2 + Duration::from_millis(rng.below(cfg.interval.as_millis() as u64));
        if Instant::now() + wait + cfg.fault_duration >= deadline {
            return restarted;
        }
        tokio::time::sleep(wait).await;
        if victims.is_empty() {
            return restarted;
        }
        let i = rng.below(victims.len() as u64) as usize;
        let pid = victims[i].pid;
        let at = start.elapsed().as_secs_f64();
        let kinds = if cfg.clock_skew.is_some() { 3 } else { 2 };
        let kind = rng.below(kinds);
        if kind == 2 {
            // Restart with the clock off by up to the bound, either way.
            let bound = cfg.clock_skew.map_or(0, |d| d.as_millis() as i64).max(1);
            let skew = rng.below(2 * bound as u64 + 1) as i64 - bound;
            signal(pid, libc::SIGKILL);
            tokio::time::sleep(cfg.fault_duration).await;
            let v = &mut victims[i];
            v.env.retain(|(k, _)| k != "TARDIGRADE_TESTING_CLOCK_SKEW_MS");
            v.env
                .push(("TARDIGRADE_TESTING_CLOCK_SKEW_MS".into(), skew.to_string()));
            let what = match respawn(v) {
                Some(new) => {
                    v.pid = new;
                    restarted.push(new);
                    format!("{at:.1}s: SIGKILL pid {pid}, restarted as {new} with its clock {skew} ms off")
                }
                None => format!("{at:.1}s: SIGKILL pid {pid}, restart with a skewed clock failed"),
            };
            faults.lock().unwrap_or_else(|e| e.into_inner()).push(what);
        } else if kind == 0 {
            signal(pid, libc::SIGKILL);
            tokio::time::sleep(cfg.fault_duration).await;
            match respawn(&victims[i]) {
                Some(new) => {
                    faults
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{at:.1}s: SIGKILL pid {pid}, restarted as {new}"));
                    victims[i].pid = new;
                    restarted.push(new);
                }
                None => faults
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{at:.1}s: SIGKILL pid {pid}, restart failed")),
            }
        } else {
            signal(pid, libc::SIGSTOP);
            tokio::time::sleep(cfg.fault_duration).await;
            signal(pid, libc::SIGCONT);
            faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{at:.1}s: SIGSTOP pid {pid} for {:?}", cfg.fault_duration));
        }
    }
}
