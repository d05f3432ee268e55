//! Patroni, for real: two Patroni nodes (Debian's `patroni`, PostgreSQL 15)
//! with `etcd3` pointing at a 3-node Tardigrade cluster, through etcd's
//! JSON gateway on the client port. A leader is elected, the other node
//! follows it by streaming replication, the leader key lives under a
//! lease, and when the leader's Patroni (and its PostgreSQL) is killed, its
//! key expires and the replica is promoted.
//!
//! Skips when Patroni or PostgreSQL 15 is missing, unless
//! `TARDIGRADE_REQUIRE_PATRONI=1` (as `.ci/run` sets): then it fails.

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::free_port;
use etcd_client::Client;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const SCOPE: &str = "tardi";

fn missing() -> Option<String> {
    for p in ["/usr/bin/patroni", &format!("{PG_BIN}/postgres"), "/usr/sbin/runuser"] {
        if !Path::new(p).exists() {
            return Some(format!(
                "{p} is not installed (`scripts/setup.sh test` installs patroni and postgresql-15)"
            ));
        }
    }
    None
}

/// One Patroni node, run as the `postgres` user in its own process group
/// (killing the group kills Patroni and its PostgreSQL, as losing the
/// machine would).
struct Patroni {
    name: String,
    api: String,
    child: Child,
    log: PathBuf,
}

impl Patroni {
    fn start(dir: &Path, name: &str, etcd_hosts: &[String]) -> Patroni {
        let api = format!("127.0.0.1:{}", free_port());
        let pg = format!("127.0.0.1:{}", free_port());
        let data = dir.join(name);
        let hosts = etcd_hosts
            .iter()
            .map(|h| format!("'{h}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let cfg = format!(
            "scope: {SCOPE}
namespace: /service/
name: {name}
restapi:
  listen: {api}
  connect_address: {api}
etcd3:
  hosts: [{hosts}]
  protocol: http
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 3
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: false
      use_slots: true
      parameters:
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 64MB
  initdb:
  - encoding: UTF8
postgresql:
  listen: {pg}
  connect_address: {pg}
  data_dir: {data}
  bin_dir: {PG_BIN}
  pgpass: {pgpass}
  authentication:
    superuser:
      username: postgres
      password: superpass
    replication:
      username: replicator
      password: replpass
  parameters:
    unix_socket_directories: '{sock}'
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 md5
  - host replication replicator 127.0.0.1/32 md5
",
            data = data.display(),
            pgpass = dir.join(format!("{name}.pgpass")).display(),
            sock = dir.display(),
        );
        let cfg_path = dir.join(format!("{name}.yml"));
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        chown_postgres(&cfg_path);
        chown_postgres(&log);
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", "patroni"])
            .arg(&cfg_path)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start patroni");
        Patroni {
            name: name.into(),
            api,
            child,
            log,
        }
    }

    /// `GET /patroni`: this node's view of itself.
    fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = common::http_get(&self.api, "/patroni")?;
        if code != 200 && code != 503 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    fn role(&self) -> String {
        self.status()
            .and_then(|s| s.get("role").and_then(|r| r.as_str()).map(String::from))
            .unwrap_or_default()
    }

    fn is_primary(&self) -> bool {
        let s = self.status();
        let role = s.as_ref().and_then(|s| s.get("role")).and_then(|r| r.as_str());
        let running = s.as_ref().and_then(|s| s.get("state")).and_then(|r| r.as_str()) == Some("running");
        running && matches!(role, Some("master") | Some("primary"))
    }

    fn kill(&mut self) {
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        // PostgreSQL's processes are children of Patroni's group; any left
        // over (re-parented) are stopped by their data directory's pid.
        let pid_file = self.log.with_file_name(&self.name).join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        self.kill();
    }
}

fn chown_postgres(p: &Path) {
    let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(p).status();
    assert!(st.is_ok_and(|s| s.success()), "chown postgres {}", p.display());
}

fn wait_for(what: &str, timeout: Duration, nodes: &[&Patroni], mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > timeout {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| format!("---- {} ----\n{}", n.name, n.tail()))
                .collect();
            panic!("timed out after {timeout:?} waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_elects_replicates_and_fails_over_on_tardigrade() {
    if let Some(why) = missing() {
        if std::env::var("TARDIGRADE_REQUIRE_PATRONI").is_ok_and(|v| v == "1") {
            panic!("{why}, and TARDIGRADE_REQUIRE_PATRONI=1");
        }
        println!("SKIPPED patroni_elects_replicates_and_fails_over_on_tardigrade: {why}");
        return;
    }
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let mut cl = Client::connect([hosts[0].as_str()], None).await.unwrap();
    common::cluster::wait("the cluster to serve", Duration::from_secs(20), || {
        let mut cl = cl.clone();
        async move { cl.put("ready", "1", None).await.is_ok() }
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    // The postgres user must reach its files under our temporary directory.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let work = dir.path().join("patroni");
    std::fs::create_dir(&work).unwrap();
    chown_postgres(&work);
    let mut p1 = Patroni::start(&work, "pg1", &hosts);
    // The second starts a moment later, so the first bootstraps the cluster.
    std::thread::sleep(Duration::from_secs(1));
    let mut p2 = Patroni::start(&work, "pg2", &hosts);

    let elected = wait_for("a leader", Duration::from_secs(60), &[&p1, &p2], || {
        p1.is_primary() || p2.is_primary()
    });
    let (leader, replica) = if p1.is_primary() {
        (&mut p1, &mut p2)
    } else {
        (&mut p2, &mut p1)
    };
    println!("{} elected after {elected:?}", leader.name);
    let following = wait_for(
        "the replica to stream from the leader",
        Duration::from_secs(60),
        &[&*leader, &*replica],
        || {
            replica.role() == "replica"
                && leader.status().is_some_and(|s| {
                    s.get("replication").and_then(|r| r.as_array()).is_some_and(|r| {
                        r.iter()
                            .any(|x| x.get("state").and_then(|s| s.as_str()) == Some("streaming"))
                    })
                })
        },
    );
    println!("{} streams from {} after {following:?}", replica.name, leader.name);

    // The leader key holds the leader's name under a live lease.
    let key = format!("/service/{SCOPE}/leader");
    let got = cl.get(key.as_str(), None).await.unwrap();
    let kv = got.kvs().first().expect("a leader key");
    assert_eq!(kv.value_str().unwrap(), leader.name);
    assert_ne!(kv.lease(), 0, "the leader key is not under a lease");
    let ttl = cl.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert!(
        ttl.ttl() > 0 && ttl.granted_ttl() > 0,
        "leader lease {} ttl {}",
        kv.lease(),
        ttl.ttl()
    );

    // Kill the leader's Patroni and PostgreSQL: the key expires with its
    // lease, and the replica takes over.
    let old = leader.name.clone();
    leader.kill();
    let killed = Instant::now();
    let promoted = wait_for("the replica's promotion", Duration::from_secs(60), &[&*replica], || {
        replica.is_primary()
    });
    let got = cl.get(key.as_str(), None).await.unwrap();
    let now_leader = got.kvs().first().map(|kv| kv.value_str().unwrap_or("").to_string());
    assert_eq!(
        now_leader.as_deref(),
        Some(replica.name.as_str()),
        "leader key after failover"
    );
    // What Patroni complained of (its DCS calls through our gateway).
    for n in [&*leader, &*replica] {
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        let complaints: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARNING") || l.contains("Exception"))
            .collect();
        println!(
            "{}: {} warnings or errors in its log{}",
            n.name,
            complaints.len(),
            complaints
                .iter()
                .take(10)
                .map(|l| format!("\n  {l}"))
                .collect::<String>()
        );
    }
    println!(
        "{old} killed; {} promoted after {promoted:?} ({:?} since the kill)",
        replica.name,
        killed.elapsed()
    );
}
