//! The MQTT session against a real broker process (`max300 broker`) that is killed and
//! started again on the same port, while a consumer (the cloud's side) still holds messages of
//! the dead connection it has not handled yet.
//!
//! ```text
//!  device ──publish──▶ broker ──▶ consumer: 4 in hand (unacked), 8 queued, 8 dropped
//!                        ✗ SIGKILL, restart on the same port
//!  consumer: reconnects, resubscribes (connected again only once the SUBACK is in), acks
//!            its backlog late (packet ids of the dead connection: must not reach the new
//!            one), then receives every message published after the restart
//! ```

use std::path::Path;
use std::time::Duration;

use max300_mqtt::{Event, Inbound, Qos, Session, SessionConfig};
use max300_protocol::{Channel, DeviceId, Topics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Proc, free_port};

/// How long any one step may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

fn start_broker(port: u16, dir: &Path) -> Proc {
    let args = vec![
        "broker".to_owned(),
        "--mqtt".to_owned(),
        format!("mqtt://127.0.0.1:{port}"),
    ];
    let mut broker = Proc::start("broker", &args, dir);
    broker.expect_line("listening on");
    broker
}

async fn next_event(events: &mut mpsc::Receiver<Event>, who: &str) -> Event {
    tokio::time::timeout(PATIENCE, events.recv())
        .await
        .unwrap_or_else(|_| panic!("{who}: no event for {} s", PATIENCE.as_secs()))
        .unwrap_or_else(|| panic!("{who}: the session stopped"))
}

/// Reads events until `Disconnected` and then `Connected`; returns the messages read on the way.
async fn through_reconnect(events: &mut mpsc::Receiver<Event>, who: &str) -> Vec<Box<Inbound>> {
    let mut messages = Vec::new();
    let mut down = false;
    loop {
        match next_event(events, who).await {
            Event::Message(m) => messages.push(m),
            Event::Disconnected(_) => down = true,
            Event::Connected if down => return messages,
            Event::Connected => {}
        }
    }
}

fn number(inbound: &Inbound) -> u32 {
    std::str::from_utf8(inbound.payload())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {:?}", inbound.payload()))
}

async fn publish(device: &Session, topic: &str, n: u32) {
    device
        .publish(
            topic.to_owned(),
            n.to_string().into_bytes(),
            Qos::AtLeastOnce,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_broker_restart_a_consumer_with_a_backlog_receives_every_new_message() {
    // The broker's log is kept if the test fails (the path is printed with the failure).
    let mut tmp = tempfile::tempdir().unwrap();
    tmp.disable_cleanup(true);
    println!("broker log in {}", tmp.path().display());
    let port = free_port();
    let mut broker = start_broker(port, tmp.path());
    let url: max300_mqtt::BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
    let topics = Topics::default();
    let unit = DeviceId::parse("unit-1").unwrap();
    let topic = topics.topic(&unit, Channel::Report);
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();

    let mut config = SessionConfig::new(url.clone(), "session-test-cloud", topics.cloud_filters());
    config.channel_capacity = 8;
    let (consumer, mut inbox) = max300_mqtt::connect(config, shutdown.clone()).unwrap();
    assert!(matches!(
        next_event(&mut inbox, "consumer").await,
        Event::Connected
    ));
    let (device, mut device_events) =
        max300_mqtt::connect(SessionConfig::new(url, "unit-1", vec![]), shutdown.clone()).unwrap();
    assert!(matches!(
        next_event(&mut device_events, "device").await,
        Event::Connected
    ));

    // The backlog: 4 messages in hand, then 8 waiting in the consumer's channel, and 8 that
    // found the channel full and were dropped (the device would resend those from its outbox).
    for n in 0..4 {
        publish(&device, &topic, n).await;
    }
    let mut backlog = Vec::new();
    for _ in 0..4 {
        match next_event(&mut inbox, "consumer").await {
            Event::Message(m) => backlog.push(m),
            other => panic!("consumer: expected a message, got {other:?}"),
        }
    }
    for n in 4..20 {
        publish(&device, &topic, n).await;
    }
    // Nothing to await here: the session only counts what it drops.
    for _ in 0..1000 {
        if consumer.dropped() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        consumer.dropped(),
        8,
        "12 of the 20 fit in hand and channel"
    );

    drop(broker);
    broker = start_broker(port, tmp.path());

    backlog.extend(through_reconnect(&mut inbox, "consumer").await);
    through_reconnect(&mut device_events, "device").await;
    assert_eq!(
        backlog.iter().map(|m| number(m)).collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>(),
        "the backlog is what arrived before the restart, in order"
    );
    // Handled at last. Their packet ids belong to the dead connection: on the new one they
    // would name other messages (and rumqttd drops a client for an ack it did not expect).
    for m in backlog {
        m.ack().await;
    }

    // Every message published after the restart arrives, and the consumer stays connected.
    for n in 100..130 {
        publish(&device, &topic, n).await;
        match next_event(&mut inbox, "consumer").await {
            Event::Message(m) => {
                assert_eq!(number(&m), n);
                m.ack().await;
            }
            other => panic!("consumer, waiting for message {n}: {other:?}"),
        }
    }
    assert!(consumer.is_connected());
    assert_eq!(consumer.subscription_error(), None);
    assert_eq!(consumer.dropped(), 8);
    assert_eq!(consumer.stale_acks(), 12, "the backlog's acks sent nothing");
    drop(broker);
    tmp.disable_cleanup(false);
}
