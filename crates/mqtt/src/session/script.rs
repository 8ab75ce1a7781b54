//! A broker whose every packet the test writes, for the session's own tests: it can withhold a
//! SUBACK, refuse a filter, drop a connection at a chosen moment, and shows exactly which
//! PUBACKs arrive and in what order. Real sockets on port 0; packets are encoded and decoded
//! with rumqttc's own codec.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, Subscribe,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::BrokerUrl;

/// How long the script waits for the session before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);
const MAX_PACKET: usize = 256 * 1024;

/// A listener on a free loopback port.
pub(crate) struct ScriptedBroker {
    listener: TcpListener,
}

impl ScriptedBroker {
    pub(crate) async fn start() -> ScriptedBroker {
        ScriptedBroker {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    pub(crate) fn url(&self) -> BrokerUrl {
        let addr = self.listener.local_addr().unwrap();
        format!("mqtt://{addr}").parse().unwrap()
    }

    /// Accepts the next connection and answers its CONNECT.
    pub(crate) async fn accept(&self) -> Peer {
        let (stream, _) = tokio::time::timeout(PATIENCE, self.listener.accept())
            .await
            .expect("the session connects")
            .unwrap();
        let mut peer = Peer {
            stream,
            buf: BytesMut::new(),
        };
        match peer.read().await {
            Some(Packet::Connect(_)) => {}
            other => panic!("expected CONNECT, got {other:?}"),
        }
        peer.send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await;
        peer
    }
}

/// One connection from the session.
pub(crate) struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    /// The next packet other than a PINGREQ (answered); `None` once the session closed.
    pub(crate) async fn read(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(Packet::PingReq) => self.send(Packet::PingResp).await,
                Ok(packet) => return Some(packet),
                Err(rumqttc::Error::InsufficientBytes(_)) => {
                    let n = tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                        .await
                        .expect("the session sends a packet")
                        .unwrap_or(0);
                    if n == 0 {
                        return None;
                    }
                }
                Err(e) => panic!("undecodable packet from the session: {e}"),
            }
        }
    }

    pub(crate) async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, MAX_PACKET).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub(crate) async fn expect_subscribe(&mut self) -> Subscribe {
        match self.read().await {
            Some(Packet::Subscribe(s)) => s,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        }
    }

    /// Reads the SUBSCRIBE and grants every filter at QoS 1.
    pub(crate) async fn grant(&mut self) {
        let sub = self.expect_subscribe().await;
        let codes = vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); sub.filters.len()];
        self.send(Packet::SubAck(SubAck::new(sub.pkid, codes)))
            .await;
    }

    /// Sends a QoS 1 message with packet id `pkid`.
    pub(crate) async fn publish(&mut self, pkid: u16, topic: &str, payload: &str) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
    }

    pub(crate) async fn expect_puback(&mut self) -> u16 {
        match self.read().await {
            Some(Packet::PubAck(PubAck { pkid })) => pkid,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// Waits until the session closes this connection.
    pub(crate) async fn expect_closed(&mut self) {
        if let Some(packet) = self.read().await {
            panic!("expected the connection to close, got {packet:?}");
        }
    }
}
