//! The nemesis shared by the workloads: at random times it hits one node
//! and records what it did. Nodes are either processes or containers.
//!
//! - Processes: kill (SIGKILL, then restarted the same way, its command
//!   line, environment and directory read from /proc), pause (SIGSTOP and
//!   SIGCONT), or (if asked) kill and restart with the wall clock off by up
//!   to a bound.
//! - Containers (the `docker` command): kill (`docker kill`, then `docker
//!   start`), pause (`docker pause`/`unpause`), and partition (`docker
//!   network disconnect` from the network between the nodes, then `connect`
//!   again with the same aliases), which cuts a node off from its peers
//!   while clients on the host still reach it through its published ports.
//!
//! Faults are dealt in rounds holding each enabled kind once, in a random
//! order, so even a short run sees every kind. It only signals, spawns and
//! reconnects what it was given; it never reads or writes their data.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the nemesis hits.
#[derive(Clone, Debug)]
pub enum Targets {
    /// The nodes' processes (their command lines are read from /proc, so a
    /// killed one is restarted the same way).
    Processes(Vec<u32>),
    /// The nodes' containers, by name; `network` is the one between the
    /// nodes (partitions disconnect a container from it; none: no
    /// partitions).
    Containers {
        names: Vec<String>,
        network: Option<String>,
    },
}

/// Faults injected into the nodes.
#[derive(Clone, Debug)]
pub struct NemesisConfig {
    pub targets: Targets,
    /// A fault every this long on average.
    pub interval: Duration,
    /// How long a fault lasts before the process is restarted or resumed.
    pub fault_duration: Duration,
    /// Also restart nodes with their wall clock up to this far off (the
    /// `TARDIGRADE_TESTING_CLOCK_SKEW_MS` knob), as a third kind of fault
    /// (processes only).
    pub clock_skew: Option<Duration>,
    /// The kinds of fault to deal (empty: every kind the targets allow).
    pub kinds: Vec<FaultKind>,
}

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Kill,
    Pause,
    /// Restart with a skewed wall clock (processes).
    ClockSkew,
    /// Cut off from the other nodes (containers on a named network).
    Partition,
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(FaultKind::Kill),
            "pause" => Ok(FaultKind::Pause),
            "clock-skew" | "skew" => Ok(FaultKind::ClockSkew),
            "partition" => Ok(FaultKind::Partition),
            _ => Err(format!("unknown fault {s:?} (kill, pause, clock-skew, partition)")),
        }
    }
}

impl NemesisConfig {
    /// The kinds this configuration deals: those asked for that the targets
    /// allow (clock skew needs processes and a bound, partitions need
    /// containers on a named network).
    pub fn effective_kinds(&self) -> Vec<FaultKind> {
        let asked = if self.kinds.is_empty() {
            vec![
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::ClockSkew,
                FaultKind::Partition,
            ]
        } else {
            self.kinds.clone()
        };
        asked
            .into_iter()
            .filter(|k| match (k, &self.targets) {
                (FaultKind::ClockSkew, Targets::Processes(_)) => self.clock_skew.is_some(),
                (FaultKind::ClockSkew, Targets::Containers { .. }) => false,
                (FaultKind::Partition, Targets::Processes(_)) => false,
                (FaultKind::Partition, Targets::Containers { network, .. }) => network.is_some(),
                _ => true,
            })
            .collect()
    }
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

/// The nodes as the nemesis holds them.
enum Nodes {
    Processes(Vec<Victim>),
    Containers {
        names: Vec<String>,
        network: Option<String>,
    },
}

impl Nodes {
    fn len(&self) -> usize {
        match self {
            Nodes::Processes(v) => v.len(),
            Nodes::Containers { names, .. } => names.len(),
        }
    }
}

/// Deals faults until `deadline` (none starts unless it ends before), and
/// returns the processes it restarted (the caller owns them now; empty for
/// containers, which Docker owns).
pub async fn nemesis(cfg: NemesisConfig, seed: u64, deadline: Instant, faults: Arc<Mutex<Vec<String>>>) -> Vec<u32> {
    let mut nodes = match &cfg.targets {
        Targets::Processes(pids) => Nodes::Processes(pids.iter().filter_map(|&p| read_victim(p)).collect()),
        Targets::Containers { names, network } => Nodes::Containers {
            names: names.clone(),
            network: network.clone(),
        },
    };
    let kinds = cfg.effective_kinds();
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut restarted = Vec::new();
    let mut round: Vec<FaultKind> = Vec::new();
    loop {
        let wait = cfg.interval / 2 + Duration::from_millis(rng.below(cfg.interval.as_millis() as u64));
        if Instant::now() + wait + cfg.fault_duration >= deadline {
            return restarted;
        }
        tokio::time::sleep(wait).await;
        if nodes.len() == 0 || kinds.is_empty() {
            return restarted;
        }
        if round.is_empty() {
            // A new round: every kind once, in a random order.
            round = kinds.clone();
            for j in (1..round.len()).rev() {
                round.swap(j, rng.below(j as u64 + 1) as usize);
            }
        }
        let Some(kind) = round.pop() else { continue };
        let i = rng.below(nodes.len() as u64) as usize;
        let at = start.elapsed().as_secs_f64();
        let what = match &mut nodes {
            Nodes::Processes(victims) => hit_process(&mut victims[i], kind, &cfg, &mut rng, &mut restarted).await,
            Nodes::Containers { names, network } => {
                hit_container(&names[i], kind, network.as_deref(), cfg.fault_duration).await
            }
        };
        faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{at:.1}s: {what}"));
    }
}

/// One fault on a process; says what it did.
async fn hit_process(
    v: &mut Victim,
    kind: FaultKind,
    cfg: &NemesisConfig,
    rng: &mut Rng,
    restarted: &mut Vec<u32>,
) -> String {
    let pid = v.pid;
    match kind {
        FaultKind::Pause | FaultKind::Partition => {
            signal(pid, libc::SIGSTOP);
            tokio::time::sleep(cfg.fault_duration).await;
            signal(pid, libc::SIGCONT);
            format!("SIGSTOP pid {pid} for {:?}", cfg.fault_duration)
        }
        FaultKind::Kill | FaultKind::ClockSkew => {
            // A clock fault restarts with the clock off by up to the bound,
            // either way.
            let skew = (kind == FaultKind::ClockSkew).then(|| {
                let bound = cfg.clock_skew.map_or(0, |d| d.as_millis() as i64).max(1);
                rng.below(2 * bound as u64 + 1) as i64 - bound
            });
            signal(pid, libc::SIGKILL);
            tokio::time::sleep(cfg.fault_duration).await;
            if let Some(skew) = skew {
                v.env.retain(|(k, _)| k != "TARDIGRADE_TESTING_CLOCK_SKEW_MS");
                v.env
                    .push(("TARDIGRADE_TESTING_CLOCK_SKEW_MS".into(), skew.to_string()));
            }
            match (respawn(v), skew) {
                (Some(new), skew) => {
                    v.pid = new;
                    restarted.push(new);
                    let clock = skew.map(|s| format!(" with its clock {s} ms off")).unwrap_or_default();
                    format!("SIGKILL pid {pid}, restarted as {new}{clock}")
                }
                (None, None) => format!("SIGKILL pid {pid}, restart failed"),
                (None, Some(_)) => format!("SIGKILL pid {pid}, restart with a skewed clock failed"),
            }
        }
    }
}

/// Runs `docker` with these arguments; its stdout, or why it failed.
pub async fn docker(args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Err(_) => Err(format!("docker {} took over 60 s", args.join(" "))),
        Ok(Err(e)) => Err(format!("cannot run docker: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(Ok(out)) => Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The aliases `container` answers to on `network` (to give them back when
/// it is connected again).
async fn aliases(container: &str, network: &str) -> Result<Vec<String>, String> {
    let out = docker(&["inspect", "--format", "{{json .NetworkSettings.Networks}}", container]).await?;
    let nets: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| format!("docker inspect: {e}"))?;
    let net = nets
        .get(network)
        .ok_or_else(|| format!("{container} is not on network {network}"))?;
    Ok(net
        .get("Aliases")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

/// What a partition's record starts with, after its time.
const PARTITION: &str = "cut ";

/// When each partition in a nemesis record began, from the start of the run
/// (the records are `"{secs}s: {what}"`).
pub fn partition_starts(faults: &[String]) -> Vec<Duration> {
    faults
        .iter()
        .filter_map(|f| {
            let (at, what) = f.split_once("s: ")?;
            what.starts_with(PARTITION)
                .then(|| at.parse::<f64>().ok())
                .flatten()
                .map(Duration::from_secs_f64)
        })
        .collect()
}

/// One fault on a container; says what it did (and what went wrong: a
/// failed step is reported, never fatal, and the undo is always tried).
async fn hit_container(name: &str, kind: FaultKind, network: Option<&str>, duration: Duration) -> String {
    let note = |r: Result<String, String>| r.err().map(|e| format!(" ({e})")).unwrap_or_default();
    match (kind, network) {
        (FaultKind::Partition, Some(net)) => {
            let names = match aliases(name, net).await {
                Ok(a) => a,
                Err(e) => return format!("partition of {name} not started: {e}"),
            };
            let cut = docker(&["network", "disconnect", "--force", net, name]).await;
            if let Err(e) = cut {
                return format!("partition of {name} not started: {e}");
            }
            tokio::time::sleep(duration).await;
            let mut args = vec!["network", "connect"];
            for a in &names {
                args.push("--alias");
                args.push(a);
            }
            args.push(net);
            args.push(name);
            let mut healed = docker(&args).await;
            // A container killed meanwhile (by the user) cannot be
            // connected; keep trying briefly so no partition outlives us.
            for _ in 0..5 {
                if healed.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                healed = docker(&args).await;
            }
            format!("{PARTITION}{name} off from {net} for {duration:?}{}", note(healed))
        }
        (FaultKind::Pause, _) => {
            let p = docker(&["pause", name]).await;
            tokio::time::sleep(duration).await;
            let u = docker(&["unpause", name]).await;
            format!("docker pause {name} for {duration:?}{}{}", note(p), note(u))
        }
        (FaultKind::Partition, None) | (FaultKind::ClockSkew, _) => {
            format!("{kind:?} of {name} skipped: containers take kill, pause and (with a network) partition")
        }
        (FaultKind::Kill, _) => {
            let k = docker(&["kill", name]).await;
            tokio::time::sleep(duration).await;
            let s = docker(&["start", name]).await;
            format!(
                "docker kill {name}, started again after {duration:?}{}{}",
                note(k),
                note(s)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_starts_are_read_back_from_the_records() {
        let faults = vec![
            "1.5s: docker kill a, started again after 2s".to_string(),
            format!("7.25s: {PARTITION}b off from net for 3s"),
            "9.0s: docker pause c for 3s".to_string(),
            format!("12.0s: {PARTITION}a off from net for 3s (docker network connect failed: x)"),
        ];
        assert_eq!(
            partition_starts(&faults),
            vec![Duration::from_millis(7250), Duration::from_secs(12)]
        );
    }

    #[test]
    fn every_round_deals_each_kind_the_targets_allow() {
        let cfg = NemesisConfig {
            targets: Targets::Containers {
                names: vec!["a".into()],
                network: None,
            },
            interval: Duration::from_secs(1),
            fault_duration: Duration::from_secs(1),
            clock_skew: Some(Duration::from_millis(5)),
            kinds: vec![],
        };
        // No network: no partitions; containers: no clock skew.
        assert_eq!(cfg.effective_kinds(), vec![FaultKind::Kill, FaultKind::Pause]);
        let procs = NemesisConfig {
            targets: Targets::Processes(vec![1]),
            kinds: vec![FaultKind::Partition, FaultKind::ClockSkew],
            ..cfg
        };
        assert_eq!(procs.effective_kinds(), vec![FaultKind::ClockSkew]);
    }
}
