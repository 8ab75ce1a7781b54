//! The cloud service's settings: an embedded default TOML, then a file, then `MAX300_*`
//! environment variables, then flags. Parsing is a pure function of its inputs.

use std::net::SocketAddr;
use std::path::PathBuf;

use jiff::civil::Time;
use max300_config::Sources;
use max300_mqtt::BrokerUrl;
use max300_protocol::{DeviceId, RateKw, day::time_zone};
use serde::{Deserialize, Serialize};

use crate::CloudError;

/// A device listed in the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The device.
    pub device_id: DeviceId,
    /// Its own limit, in kW.
    #[serde(default)]
    pub max_rate_kw: Option<f64>,
}

/// Everything the cloud service needs to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Where the default store and audit folder live.
    pub data_dir: PathBuf,
    /// The broker.
    pub mqtt: String,
    /// The HTTP listener.
    pub http: String,
    /// The provider endpoint.
    #[serde(default)]
    pub provider: Option<String>,
    /// The API token.
    #[serde(default)]
    pub api_token: Option<String>,
    /// Whether reads need the token too.
    pub protect_reads: bool,
    /// `sqlite://PATH`.
    #[serde(default)]
    pub store: Option<String>,
    /// `file://DIR`.
    #[serde(default)]
    pub audit: Option<String>,
    /// Topic root.
    pub topic_root: String,
    /// The fleet's zone.
    pub timezone: String,
    /// Limit for devices without their own, in kW.
    pub default_max_rate_kw: f64,
    /// Largest document, in MiB.
    pub max_document_mib: u64,
    /// Whether to fetch tomorrow's plan every day.
    pub daily_fetch: bool,
    /// Local time of the daily fetch, `HH:MM`.
    pub fetch_at: String,
    /// Provider timeout in seconds.
    pub provider_timeout_s: u64,
    /// Register devices on their first message.
    pub auto_register: bool,
    /// Devices' heartbeat interval, real seconds.
    pub heartbeat_interval_s: u64,
    /// First resend delay for an unacknowledged command, clock seconds.
    pub ack_timeout_s: u64,
    /// How long reports are kept, in days of clock time: a report of a period older than
    /// this is refused.
    pub retention_days: u64,
    /// Usable capacity of a unit, kWh, for the feasibility estimate at ingestion.
    pub capacity_kwh: f64,
    /// The units' lower SoC limit, percent (as the agents' `soc_min_pct`).
    pub soc_min_pct: f64,
    /// The units' upper SoC limit, percent (as the agents' `soc_max_pct`).
    pub soc_max_pct: f64,
    /// The units' round-trip efficiency, (0, 1].
    pub round_trip_efficiency: f64,
    /// Real seconds without a word from a device before it is an `offline` alert.
    pub offline_alert_s: u64,
    /// Local time, `HH:MM`, by which tomorrow's plan must be acknowledged, or it is a
    /// `plan_missing` alert.
    pub plan_due_at: String,
    /// MQTT client id; also names this instance as a lease holder.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Create a missing DynamoDB table at start-up (`--create-resources`), with the schema
    /// the deployment template declares; without it a missing table is an error.
    #[serde(default)]
    pub create_resources: bool,
    /// MQTT shared-subscription group for device feedback, when several instances share it.
    #[serde(default)]
    pub shared_group: Option<String>,
    /// The IoT data-plane endpoint a Lambda function publishes through.
    #[serde(default)]
    pub iot_data_endpoint: Option<String>,
    /// The CA that signed the broker's certificate (PEM), for `mqtts://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The cloud's certificate (PEM; CN max300-cloud), for mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The cloud's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// ALPN protocol, e.g. `x-amzn-mqtt-ca` for AWS IoT Core on port 443.
    #[serde(default)]
    pub alpn: Option<String>,
    /// Devices known up front.
    #[serde(default)]
    pub devices: Vec<DeviceEntry>,
}

impl CloudConfig {
    /// The embedded default, as `max300 config print-default cloud` prints it.
    pub const DEFAULT_TOML: &'static str = include_str!("../cloud.default.toml");

    /// Layers the default, an optional file and `MAX300_*` variables.
    pub fn load(file: Option<&str>, env: &[(String, String)]) -> Result<CloudConfig, CloudError> {
        Self::layered(file, env, &[])
    }

    /// Layers the embedded default, then the file, then `MAX300_<KEY>` variables, then flags
    /// (`(key, value)` pairs): see [`max300_config`]. An unknown key is an error that names it
    /// as the user wrote it; `MAX300_*` variables that are none of this struct's keys are left
    /// to the agent and the command line. Pure: the caller reads the file and the environment.
    pub fn layered(
        file: Option<&str>,
        env: &[(String, String)],
        flags: &[(&str, String)],
    ) -> Result<CloudConfig, CloudError> {
        max300_config::load(&Sources {
            default: Self::DEFAULT_TOML,
            file,
            env,
            flags,
        })
        .map_err(|e| CloudError::Config(e.to_string()))
    }

    /// Checks every setting once, at start-up, with a message that names it.
    pub fn validate(&self) -> Result<(), CloudError> {
        let bad = |key: &str, why: String| Err(CloudError::Config(format!("{key}: {why}")));
        self.mqtt
            .parse::<BrokerUrl>()
            .map_err(|e| CloudError::Config(format!("mqtt: {e}")))?;
        let http = self.http_addr()?;
        time_zone(&self.timezone).map_err(|e| CloudError::Config(format!("timezone: {e}")))?;
        self.fetch_time()?;
        self.plan_due_time()?;
        self.pack()?;
        self.default_max_rate()?;
        if self.max_document_mib == 0 || self.max_document_mib > 4096 {
            return bad(
                "max_document_mib",
                format!("{} is not within 1..=4096", self.max_document_mib),
            );
        }
        if self.ack_timeout_s == 0 {
            return bad("ack_timeout_s", "must be at least 1".into());
        }
        if !(1..=36_500).contains(&self.retention_days) {
            return bad(
                "retention_days",
                format!("{} is not within 1..=36500", self.retention_days),
            );
        }
        if self.heartbeat_interval_s == 0 {
            return bad("heartbeat_interval_s", "must be at least 1".into());
        }
        if let Some(token) = &self.api_token
            && token.len() < 16
        {
            return bad("api_token", "must be at least 16 characters".into());
        }
        if self.api_token.is_none() && !http.ip().is_loopback() {
            return bad(
                "http",
                format!(
                    "{http} is not a loopback address and no api_token is set: writes would be \
                     open to the network. Set api_token (or MAX300_API_TOKEN), or listen on 127.0.0.1"
                ),
            );
        }
        if let Some(group) = &self.shared_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            return bad(
                "shared_group",
                format!("{group:?} must be a non-empty name without '/', '+' or '#'"),
            );
        }
        for d in &self.devices {
            if let Some(kw) = d.max_rate_kw {
                RateKw::try_from(kw).map_err(|e| {
                    CloudError::Config(format!("devices.{}.max_rate_kw: {e}", d.device_id))
                })?;
            }
        }
        Ok(())
    }

    /// The HTTP listener address.
    pub fn http_addr(&self) -> Result<SocketAddr, CloudError> {
        self.http
            .parse()
            .map_err(|_| CloudError::Config(format!("http: {:?} is not host:port", self.http)))
    }

    /// The daily fetch time.
    pub fn fetch_time(&self) -> Result<Time, CloudError> {
        format!("{}:00", self.fetch_at)
            .parse()
            .map_err(|_| CloudError::Config(format!("fetch_at: {:?} is not HH:MM", self.fetch_at)))
    }

    /// What the feasibility estimate assumes of a unit.
    pub fn pack(&self) -> Result<crate::feasibility::Pack, CloudError> {
        let bad = |key: &str, why: String| Err(CloudError::Config(format!("{key}: {why}")));
        if !(self.capacity_kwh.is_finite() && self.capacity_kwh > 0.0) {
            return bad(
                "capacity_kwh",
                format!("{} must be above 0", self.capacity_kwh),
            );
        }
        if !(0.0..=100.0).contains(&self.soc_min_pct)
            || !(0.0..=100.0).contains(&self.soc_max_pct)
            || self.soc_min_pct >= self.soc_max_pct
        {
            return bad(
                "soc_min_pct/soc_max_pct",
                format!(
                    "{} and {} must be percentages with min below max",
                    self.soc_min_pct, self.soc_max_pct
                ),
            );
        }
        if !(self.round_trip_efficiency > 0.0 && self.round_trip_efficiency <= 1.0) {
            return bad(
                "round_trip_efficiency",
                format!("{} is not within (0, 1]", self.round_trip_efficiency),
            );
        }
        Ok(crate::feasibility::Pack {
            capacity_kwh: self.capacity_kwh,
            soc_min_pct: self.soc_min_pct,
            soc_max_pct: self.soc_max_pct,
            round_trip_efficiency: self.round_trip_efficiency,
        })
    }

    /// The local time tomorrow's plan is due by.
    pub fn plan_due_time(&self) -> Result<Time, CloudError> {
        format!("{}:00", self.plan_due_at).parse().map_err(|_| {
            CloudError::Config(format!("plan_due_at: {:?} is not HH:MM", self.plan_due_at))
        })
    }

    /// The default rate limit.
    pub fn default_max_rate(&self) -> Result<RateKw, CloudError> {
        RateKw::try_from(self.default_max_rate_kw)
            .map_err(|e| CloudError::Config(format!("default_max_rate_kw: {e}")))
    }

    /// The certificate files, when `ca` is set.
    pub fn tls(&self) -> Option<max300_mqtt::TlsFiles> {
        max300_mqtt::TlsFiles::from_settings(
            self.ca.as_ref(),
            self.cert.as_ref(),
            self.key.as_ref(),
            self.alpn.as_ref(),
        )
    }

    /// The store URL, defaulting into the data dir.
    pub fn store_url(&self) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("cloud.sqlite").display()))
    }

    /// The lifecycle's timing: the resend backoff from `ack_timeout_s` (never under 2 s of
    /// real time at the clock's speed) and the report retention window.
    pub fn policy(&self, clock: &dyn max300_protocol::Clock) -> crate::Policy {
        let secs = |s: u64| jiff::SignedDuration::from_secs(i64::try_from(s).unwrap_or(i64::MAX));
        crate::Policy {
            ack_timeout: secs(self.ack_timeout_s),
            floor: clock.clock_duration(std::time::Duration::from_secs(2)),
            retention: secs(self.retention_days.saturating_mul(86_400)),
        }
    }

    /// The audit URL, defaulting into the data dir.
    pub fn audit_url(&self) -> String {
        self.audit
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("audit").display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let c = CloudConfig::load(None, &[]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.timezone, "Europe/London");
        assert_eq!(c.fetch_time().unwrap().to_string(), "16:00:00");
    }

    #[test]
    fn the_example_config_loads_with_its_devices() {
        let c = CloudConfig::load(Some(include_str!("../../../config/cloud.toml")), &[]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].max_rate_kw, Some(100.0));
    }

    #[test]
    fn a_file_then_env_override_the_default() {
        let c = CloudConfig::load(
            Some("http = \"127.0.0.1:9000\"\nauto_register = true\n"),
            &env(&[
                ("MAX300_HTTP", "127.0.0.1:9100"),
                ("MAX300_DEFAULT_MAX_RATE_KW", "100"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http, "127.0.0.1:9100");
        assert!(c.auto_register);
        assert_eq!(c.default_max_rate_kw, 100.0);
    }

    #[test]
    fn each_layer_wins_over_the_one_before_default_file_env_flag() {
        let file = Some("ack_timeout_s = 20\nfetch_at = \"15:00\"\nplan_due_at = \"21:00\"\n");
        let env = env(&[
            ("MAX300_FETCH_AT", "14:00"),
            ("MAX300_PLAN_DUE_AT", "20:00"),
        ]);
        let flags = [("plan_due_at", "19:00".to_owned())];
        let c = CloudConfig::layered(file, &env, &flags).unwrap();
        // The default's retention, the file's timeout, the environment's fetch, the flag's due.
        assert_eq!(
            (
                c.retention_days,
                c.ack_timeout_s,
                c.fetch_at.as_str(),
                c.plan_due_at.as_str()
            ),
            (400, 20, "14:00", "19:00")
        );
        c.validate().unwrap();
    }

    #[test]
    fn env_values_take_the_type_of_their_key() {
        // A numeric token stays a string; numbers and booleans are parsed where the key has one.
        let c = CloudConfig::load(
            None,
            &env(&[
                ("MAX300_API_TOKEN", "1234567890123456"),
                ("MAX300_PROTECT_READS", "true"),
                ("MAX300_ROUND_TRIP_EFFICIENCY", "0.85"),
            ]),
        )
        .unwrap();
        assert_eq!(c.api_token.as_deref(), Some("1234567890123456"));
        assert!(c.protect_reads);
        assert_eq!(c.round_trip_efficiency, 0.85);
    }

    #[test]
    fn an_unknown_key_or_a_bad_value_is_named_where_it_was_set() {
        let err = CloudConfig::load(Some("htp = \"127.0.0.1:1\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config: config file: htp: unknown field `htp`, expected one of"),
            "{err}"
        );
        let err = CloudConfig::load(None, &env(&[("MAX300_ACK_TIMEOUT_S", "soon")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config: MAX300_ACK_TIMEOUT_S: invalid type: found string \"soon\", expected u64"
        );
        let err = CloudConfig::layered(None, &[], &[("auto_register", "maybe".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config: --auto-register: "), "{err}");
        // Variables of the agent or of the command line are not the cloud's business.
        CloudConfig::load(
            None,
            &env(&[("MAX300_DEVICE_ID", "d1"), ("MAX300_LOG_FORMAT", "json")]),
        )
        .unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = CloudConfig::load(Some("htp = 1"), &[]).unwrap_err();
        assert!(err.to_string().contains("htp"), "{err}");
        let mut c = CloudConfig::load(None, &[]).unwrap();
        c.fetch_at = "25:99".into();
        assert!(c.validate().unwrap_err().to_string().contains("fetch_at"));
    }

    #[test]
    fn a_shared_group_is_one_topic_level() {
        let mut c =
            CloudConfig::load(None, &env(&[("MAX300_SHARED_GROUP", "max300-cloud")])).unwrap();
        assert_eq!(c.shared_group.as_deref(), Some("max300-cloud"));
        c.validate().unwrap();
        for bad in ["", "a/b", "a+", "#"] {
            c.shared_group = Some(bad.into());
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("shared_group"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_public_listener_without_a_token_refuses_to_start() {
        let mut c = CloudConfig::load(None, &[]).unwrap();
        c.http = "0.0.0.0:8300".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("api_token"), "{err}");
        c.api_token = Some("0123456789abcdef".into());
        c.validate().unwrap();
    }
}
