//! Integration tests: a real embedded MQTT broker, a real agent (SQLite in a temp dir, the
//! simulated battery) and a raw MQTT client playing the cloud, under a scaled clock.

// A test that cannot set itself up should panic, with the value in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod flows;
mod helpers;
mod safety;
