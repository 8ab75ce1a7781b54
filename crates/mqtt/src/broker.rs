//! The embedded MQTT broker (rumqttd), for one machine: loopback only.
//!
//! rumqttd cannot enforce per-device topic rules and stalls new TLS connections behind one
//! silent peer, so it is a development and single-machine default. A fleet uses a hardened
//! broker (mosquitto, EMQX or AWS IoT Core); see the README.

use max300_protocol::error::Chain;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::MqttError;

fn broker_error(what: String) -> MqttError {
    MqttError::Broker { what, cause: None }
}

fn broker_failed(what: String, cause: impl std::error::Error + Send + Sync + 'static) -> MqttError {
    MqttError::Broker {
        what,
        cause: Some(Box::new(cause)),
    }
}

/// Starts the broker on `addr` (port 0 picks a free port) and returns the bound address.
/// The broker lives on its own threads until the process exits: rumqttd has no shutdown.
pub fn start(addr: SocketAddr, max_connections: usize) -> Result<SocketAddr, MqttError> {
    if !addr.ip().is_loopback() {
        return Err(broker_error(format!(
            "the embedded broker listens on loopback only, not {addr}: it cannot enforce \
             per-device topic rules. For a fleet, run mosquitto (see README: Brokers) and \
             point --mqtt at it"
        )));
    }
    let addr = if addr.port() == 0 {
        free_port(addr)?
    } else {
        addr
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let router = RouterConfig {
        max_connections: max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let config = Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    // Fail here, with a clear message, rather than in the broker's own thread.
    drop(
        TcpListener::bind(addr)
            .map_err(|e| broker_failed(format!("cannot listen on {addr}"), e))?,
    );
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %Chain(&e), "embedded broker stopped");
            }
        })
        .map_err(|e| broker_failed("cannot start its thread".into(), e))?;
    wait_listening(addr)?;
    Ok(addr)
}

/// rumqttd cannot report a port it bound from 0, so reserve one first. Another process could
/// take it in between; the bind check in `start` then fails loudly.
fn free_port(addr: SocketAddr) -> Result<SocketAddr, MqttError> {
    TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|e| broker_failed(format!("no free port on {}", addr.ip()), e))
}

fn wait_listening(addr: SocketAddr) -> Result<(), MqttError> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(broker_error(format!(
        "not accepting connections on {addr} after 2 s"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_non_loopback_address_with_advice() {
        let err = start("0.0.0.0:1883".parse().unwrap(), 10).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("loopback only") && text.contains("mosquitto"),
            "{text}"
        );
    }

    #[test]
    fn picks_a_free_port_when_given_port_zero() {
        let addr = start("127.0.0.1:0".parse().unwrap(), 10).unwrap();
        assert_ne!(addr.port(), 0);
        assert!(std::net::TcpStream::connect(addr).is_ok());
    }
}
