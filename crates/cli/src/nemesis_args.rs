//! The nemesis flags every workload command shares (`register`, `bank`,
//! `append`): which nodes to hit (processes by PID, or containers by name)
//! and how often.

use std::time::Duration;

use anyhow::bail;
use workload::nemesis::{FaultKind, NemesisConfig, Targets};

#[derive(clap::Args, Clone)]
pub struct NemesisArgs {
    /// Inject faults into the nodes named by --pids or --containers.
    #[arg(long)]
    pub nemesis: bool,
    /// The processes the nemesis may hit (the nodes' PIDs), comma-separated:
    /// SIGKILL and restart, SIGSTOP and SIGCONT, and clock skew if asked.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// The containers the nemesis may hit, comma-separated: docker kill and
    /// start, pause and unpause, and with --network partitions.
    #[arg(long, value_delimiter = ',', conflicts_with = "pids")]
    pub containers: Vec<String>,
    /// The Docker network between the nodes (partitions disconnect a
    /// container from it for a while; the host still reaches it).
    #[arg(long, requires = "containers")]
    pub network: Option<String>,
    /// The kinds of fault, comma-separated, from kill, pause, clock-skew
    /// (processes, with --clock-skew-ms) and partition (containers, with
    /// --network); default: every kind the nodes allow.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Average seconds between faults.
    #[arg(long, default_value_t = 4.0)]
    pub fault_interval: f64,
    /// Seconds a fault lasts.
    #[arg(long, default_value_t = 2.0)]
    pub fault_duration: f64,
    /// Also restart nodes with their wall clock up to this many ms off,
    /// either way (keep it within half the nodes' --max-offset-ms: two
    /// nodes may be off in opposite directions); 0: no clock faults.
    #[arg(long, default_value_t = 0)]
    pub clock_skew_ms: u64,
}

impl NemesisArgs {
    /// The nemesis asked for, if any.
    pub fn config(&self) -> anyhow::Result<Option<NemesisConfig>> {
        if !self.nemesis {
            return Ok(None);
        }
        let targets = match (self.pids.is_empty(), self.containers.is_empty()) {
            (false, _) => Targets::Processes(self.pids.clone()),
            (true, false) => Targets::Containers {
                names: self.containers.clone(),
                network: self.network.clone(),
            },
            (true, true) => bail!("--nemesis needs the nodes' --pids or --containers"),
        };
        let cfg = NemesisConfig {
            targets,
            interval: Duration::from_secs_f64(self.fault_interval.max(0.1)),
            fault_duration: Duration::from_secs_f64(self.fault_duration.max(0.1)),
            clock_skew: (self.clock_skew_ms > 0).then(|| Duration::from_millis(self.clock_skew_ms)),
            kinds: self.faults.clone(),
        };
        if cfg.effective_kinds().is_empty() {
            bail!("none of the --faults asked for applies to these nodes (clock-skew needs --pids and --clock-skew-ms, partition needs --containers and --network)");
        }
        Ok(Some(cfg))
    }
}
