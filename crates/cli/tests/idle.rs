//! Idle cost, asserted: a three-node cluster of real processes with 1,000
//! idle ranges sends raft frames at the rate it does with its three
//! bootstrap ranges (within 10%), read from `/metrics` by `tardigrade
//! workload splits`. Idle ranges quiesce; store liveness, one message per
//! store pair every other tick, is what keeps their leases.

mod common;

use common::cluster::*;
use common::tardigrade;

/// Frames per second of every node together, from `workload splits`'s
/// "idle HOST: M raft messages/s in F frames/s, ..." lines.
fn frames(out: &str) -> f64 {
    out.lines()
        .filter(|l| l.starts_with("idle "))
        .filter_map(|l| {
            let (_, rest) = l.split_once(" in ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

fn messages(out: &str) -> f64 {
    out.lines()
        .filter(|l| l.starts_with("idle "))
        .filter_map(|l| l.split(": ").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_frames_do_not_grow_with_the_number_of_ranges() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let hosts: Vec<&str> = c.nodes.iter().map(|n| n.grpc.as_str()).collect();
    let http: Vec<&str> = c.nodes.iter().map(|n| n.http.as_str()).collect();
    let (hosts, http) = (hosts.join(","), http.join(","));
    let run = |ranges: &str| {
        let args = [
            "workload",
            "splits",
            "--hosts",
            &hosts,
            "--http-hosts",
            &http,
            "--ranges",
            ranges,
            "--writes",
            "0",
            "--idle-seconds",
            "6",
        ];
        let (code, out, err) = tardigrade(&args);
        assert_eq!(code, 0, "workload splits --ranges {ranges}: {out}{err}");
        println!("{ranges} ranges:\n{out}");
        out
    };
    let few = run("0");
    let many = run("1000");
    assert!(many.contains("listed per node: [1003, 1003, 1003]"), "{many}");
    let (f0, f1) = (frames(&few), frames(&many));
    let (m0, m1) = (messages(&few), messages(&many));
    println!("idle frames/s: {f0:.0} with 3 ranges, {f1:.0} with 1,003; messages/s: {m0:.0}, {m1:.0}");
    assert!(f0 > 0.0, "store liveness keeps frames flowing: {few}");
    assert!(
        f1 <= f0 * 1.1,
        "1,003 idle ranges send {f1:.0} frames/s, more than 110% of the {f0:.0} of 3 ranges"
    );
    assert!(
        m1 <= m0 * 1.1 + 3.0,
        "1,003 idle ranges send {m1:.0} messages/s against {m0:.0} with 3 ranges"
    );
}
