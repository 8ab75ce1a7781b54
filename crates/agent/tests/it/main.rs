//! Integration tests: a real embedded MQTT broker, a real agent (SQLite in a temp dir, the
//! simulated battery) and a raw MQTT client playing the cloud, under a scaled clock.

mod flows;
mod helpers;
