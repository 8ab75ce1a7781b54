//! Many agents in one process, as `max300 up` runs them. Ignored by default: it is a
//! measurement (run with `--ignored --nocapture` to see the figures).

use std::sync::Arc;
use std::time::Duration;

use max300_agent::AgentConfig;
use max300_protocol::clock::monotonic;
use max300_protocol::message::ReportStatus;
use max300_protocol::{Clock, DeviceId, Message, Mode, ScaledClock};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: 200 agents in one process"]
async fn two_hundred_agents_share_one_process() {
    const N: usize = 200;
    let port = start_broker();
    let dir = tempfile::tempdir().unwrap();
    let (cloud, mut inbox) = crate::helpers::cloud_client(port).await;
    let before = rss_kb();
    // 10:20 at 300×: the 10:30 boundary is 2 s of real time away, then one every 6 s.
    let clock: Arc<dyn Clock> =
        Arc::new(ScaledClock::starting_now(ts("2026-11-30T10:20:00Z"), 300.0));
    let shutdown = CancellationToken::new();
    let started = monotonic();
    let mut ids = Vec::new();
    for i in 0..N {
        let id = format!("max300-{i:04}");
        let file = format!(
            "device_id = \"{id}\"\nmqtt = \"mqtt://127.0.0.1:{port}\"\ndata_dir = {:?}\ndurable = false\n",
            dir.path().join(&id).display().to_string()
        );
        let config = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, Some(&file), &[]).unwrap();
        tokio::spawn(max300_agent::run(
            config,
            clock.clone(),
            shutdown.child_token(),
        ));
        ids.push(DeviceId::parse(id).unwrap());
    }
    // Send every agent a plan for today once it has synced.
    let mut synced = 0;
    while synced < N {
        let msg = tokio::time::timeout(WAIT, inbox.recv())
            .await
            .unwrap()
            .unwrap();
        if let Message::Sync(s) = msg {
            let p = plan(&s.device_id, "2026-11-30", 1, |_| {
                setpoint(Mode::Charge, 40.0)
            });
            let topic = max300_protocol::Topics::default()
                .topic(&s.device_id, max300_protocol::Channel::Schedule);
            cloud
                .publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    Message::Schedule(p).encode(),
                )
                .await
                .unwrap();
            synced += 1;
        }
    }
    let connected = started.elapsed();
    // Wait for one executed report from every agent.
    let mut executed = std::collections::HashSet::new();
    let (mut acks, mut first_executed, mut all_acked) = (0, None, None);
    while executed.len() < N {
        let msg = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        match msg {
            Message::Report(r) if r.status == ReportStatus::Executed => {
                if executed.is_empty() {
                    first_executed = Some(started.elapsed());
                }
                executed.insert(r.device_id);
            }
            Message::Ack(_) => {
                acks += 1;
                if acks == N {
                    all_acked = Some(started.elapsed());
                }
            }
            _ => {}
        }
    }
    let after = rss_kb();
    println!(
        "{N} agents: all synced in {connected:?}, all acked by {all_acked:?}, first executed at {first_executed:?}, all executed a period by {:?}; RSS {} MB before, {} MB after ({} KB per agent)",
        started.elapsed(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) / N as u64
    );
    shutdown.cancel();
}
