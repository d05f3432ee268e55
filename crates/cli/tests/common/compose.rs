//! A Compose project of `deploy/docker-compose.yml` for one test: its own
//! project name, its own image tag built from this build's binary
//! (`scripts/image.sh`), its ports chosen free on 127.0.0.1, and its
//! containers, networks and volumes removed when the guard drops.
//!
//! Without a Docker engine (or Compose) the test says it skipped, unless
//! `TARDIGRADE_REQUIRE_DOCKER=1` (set by `.ci/run`), which makes that a
//! failure: CI always has an engine and must never pass by skipping.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use proto::admin::admin_client::AdminClient;
use proto::admin::{NodesStatusRequest, RangesRequest};

/// The nodes of the file (node4 is behind the `scale` profile).
pub const NODES: [&str; 3] = ["node1", "node2", "node3"];

pub struct Compose {
    /// `docker compose` or `docker-compose`, whichever answers.
    cmd: Vec<String>,
    pub project: String,
    file: PathBuf,
    /// NODEx_ETCD_PORT, NODEx_HTTP_PORT, TARDIGRADE_IMAGE and any extra.
    pub env: Vec<(String, String)>,
    /// Per node: 127.0.0.1:port of its etcd API and of its HTTP endpoint.
    pub etcd: Vec<String>,
    pub http: Vec<String>,
}

fn ok(mut c: Command) -> Result<String, String> {
    match c.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "{:?} failed: {}{}",
            c,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("{c:?}: {e}")),
    }
}

/// `docker compose` (the plugin) or `docker-compose` (the standalone tool),
/// if an engine answers; otherwise why not.
fn compose_command() -> Result<Vec<String>, String> {
    let mut info = Command::new("docker");
    info.args(["info", "--format", "{{.ServerVersion}}"]);
    ok(info).map_err(|e| format!("no Docker engine answers ({e})"))?;
    let mut plugin = Command::new("docker");
    plugin.args(["compose", "version"]);
    if ok(plugin).is_ok() {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    let mut standalone = Command::new("docker-compose");
    standalone.arg("version");
    ok(standalone).map_err(|e| format!("neither `docker compose` nor `docker-compose` runs ({e})"))?;
    Ok(vec!["docker-compose".into()])
}

/// Docker and Compose, or `None` after saying the test skipped (a failure
/// when `TARDIGRADE_REQUIRE_DOCKER=1`).
pub fn docker_or_skip(test: &str) -> Option<Vec<String>> {
    match compose_command() {
        Ok(c) => Some(c),
        Err(why) => {
            assert!(
                std::env::var("TARDIGRADE_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "{test}: Docker is required here (TARDIGRADE_REQUIRE_DOCKER=1) but {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

pub fn docker(args: &[&str]) -> Result<String, String> {
    let mut c = Command::new("docker");
    c.args(args);
    ok(c)
}

impl Compose {
    /// A new project (nothing started yet), or `None` if the test skips.
    pub fn new_or_skip(test: &str, extra_env: &[(&str, &str)]) -> Option<Compose> {
        let cmd = docker_or_skip(test)?;
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        // Unique per test even when tests share a process (cargo test).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let project = format!("tdgtest{}x{n}", std::process::id());
        let image = format!("tardigrade:test-{}x{n}", std::process::id());
        let built = Command::new(root.join("scripts/image.sh"))
            .args([env!("CARGO_BIN_EXE_tardigrade"), &image])
            .output()
            .expect("run scripts/image.sh");
        assert!(
            built.status.success(),
            "scripts/image.sh failed: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&built.stdout).trim());
        let mut env = vec![("TARDIGRADE_IMAGE".to_string(), image)];
        let (mut etcd, mut http) = (Vec::new(), Vec::new());
        for i in 1..=4 {
            let (e, h) = (super::free_port(), super::free_port());
            env.push((format!("NODE{i}_ETCD_PORT"), e.to_string()));
            env.push((format!("NODE{i}_HTTP_PORT"), h.to_string()));
            etcd.push(format!("127.0.0.1:{e}"));
            http.push(format!("127.0.0.1:{h}"));
        }
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Some(Compose {
            cmd,
            project,
            file: root.join("deploy/docker-compose.yml"),
            env,
            etcd,
            http,
        })
    }

    /// Runs a compose subcommand of this project.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut c = Command::new(&self.cmd[0]);
        c.args(&self.cmd[1..])
            .arg("-f")
            .arg(&self.file)
            .args(["-p", &self.project])
            .args(args)
            .envs(self.env.iter().cloned());
        ok(c)
    }

    pub fn must(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets (or replaces) a variable the next compose commands see.
    pub fn set_env(&mut self, k: &str, v: &str) {
        self.env.retain(|(x, _)| x != k);
        self.env.push((k.to_string(), v.to_string()));
    }

    /// The network between the nodes, as Docker names it.
    pub fn peers_network(&self) -> String {
        format!("{}_peers", self.project)
    }

    /// The container of a service now (its name, which `docker` commands take).
    pub fn container(&self, service: &str) -> String {
        let id = self.must(&["ps", "-q", service]).trim().to_string();
        assert!(!id.is_empty(), "service {service} has no container");
        docker(&["inspect", "--format", "{{.Name}}", &id])
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .trim_start_matches('/')
            .to_string()
    }

    /// The image this project runs.
    pub fn image(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == "TARDIGRADE_IMAGE")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// A service's container's address on the peers network.
    pub fn peer_ip(&self, service: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.peers_network()
        );
        docker(&["inspect", "--format", &format, &self.container_id(service)])
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_string()
    }

    pub fn container_id(&self, service: &str) -> String {
        self.must(&["ps", "-q", service]).trim().to_string()
    }

    fn health(&self, service: &str) -> String {
        let id = self.container_id(service);
        if id.is_empty() {
            return "absent".into();
        }
        docker(&["inspect", "--format", "{{.State.Health.Status}}", &id])
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Waits until Docker reports every one of `services` healthy (their
    /// health check is `tardigrade node health`).
    pub fn wait_healthy(&self, services: &[&str], timeout: Duration) {
        let start = Instant::now();
        loop {
            let states: Vec<String> = services.iter().map(|s| self.health(s)).collect();
            if states.iter().all(|s| s == "healthy") {
                eprintln!("{services:?} healthy after {:.1}s", start.elapsed().as_secs_f64());
                return;
            }
            if start.elapsed() > timeout {
                let logs = self.run(&["logs", "--tail", "30"]).unwrap_or_else(|e| e);
                panic!("{services:?} not healthy after {timeout:?}: {states:?}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The etcd range (range 2) as node `i` (0-based) holds it, asked through
    /// its published port.
    pub async fn etcd_range(&self, i: usize) -> Option<proto::admin::RangeInfo> {
        let mut a = AdminClient::connect(format!("http://{}", self.etcd[i])).await.ok()?;
        a.ranges(RangesRequest {})
            .await
            .ok()?
            .into_inner()
            .ranges
            .into_iter()
            .find(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == 2))
    }

    /// Node `i`'s id and the members it knows.
    pub async fn node_id_and_members(&self, i: usize) -> Option<(u64, usize)> {
        let mut a = AdminClient::connect(format!("http://{}", self.etcd[i])).await.ok()?;
        let r = a.nodes(NodesStatusRequest {}).await.ok()?.into_inner();
        Some((r.node_id, r.nodes.len()))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::env::var("TARDIGRADE_KEEP_CONTAINERS").as_deref() == Ok("1") {
            eprintln!("kept project {} (TARDIGRADE_KEEP_CONTAINERS=1)", self.project);
            return;
        }
        let _ = self.run(&["--profile", "scale", "down", "-v", "--remove-orphans", "-t", "1"]);
        let _ = docker(&["rm", "-f", "-v", &format!("{}_squatter", self.project)]);
        let _ = docker(&["image", "rm", "-f", &self.image()]);
    }
}
