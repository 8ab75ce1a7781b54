//! The agent's configuration: one serde struct, layered from the embedded default TOML, a
//! config file and `MAX300_*` environment variables, and checked once at start-up.

use std::path::PathBuf;
use std::time::Duration;

use jiff::SignedDuration;
use jiff::tz::TimeZone;
use max300_config::{ConfigError, Sources};
use max300_mqtt::BrokerUrl;
use max300_protocol::{DeviceId, RateKw, Topics};
use serde::{Deserialize, Serialize};

use crate::AgentError;
use crate::battery::{SimConfig, SunSpecUrl};
use crate::safety::SafetyConfig;

/// Everything one agent needs to run. Build it with [`AgentConfig::from_toml`], adjust it
/// (the binary applies CLI flags here), then call [`AgentConfig::validate`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This unit's id; also its MQTT client id.
    pub device_id: DeviceId,
    /// The directory of the store (`agent.sqlite`); created if missing.
    pub data_dir: PathBuf,
    /// The broker address, `mqtt://host:port`.
    pub mqtt: String,
    /// The root of every topic.
    pub topic_root: String,
    /// The IANA zone of schedule dates.
    pub timezone: String,
    /// This unit's own rate limit in kW.
    pub max_rate_kw: f64,
    /// Real seconds between heartbeats.
    pub heartbeat_interval_s: u64,
    /// Real seconds an outbox entry waits for a receipt before it is sent again.
    pub resend_after_s: u64,
    /// The controller's revert timer in whole real seconds (1..=60), more than twice
    /// `safety.settle_s`.
    pub revert_timeout_s: u64,
    /// How many hours back from the current period missed periods (the agent down, the
    /// clock unsynchronized) are still reported `skipped` (1..=8784); earlier ones get no
    /// report.
    pub catch_up_h: u32,
    /// `synchronous=FULL` when true, `OFF` when false.
    pub durable: bool,
    /// The CA that signed the broker's certificate (PEM), for `mqtts://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This unit's certificate (PEM; CN = O = device_id), for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// This unit's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// ALPN protocol, e.g. `x-amzn-mqtt-ca` for AWS IoT Core on port 443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// How the agent knows its clock is right: `ntp` (the system's time sync status),
    /// `assume` (always, e.g. on a scaled clock), or `auto` (`ntp` on the system clock,
    /// `assume` on a scaled one).
    pub clock_sync: String,
    /// Serve the agent's Prometheus metrics on this address (`host:port`); off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Which controller drives the battery: `"sim"` (in-process) or a SunSpec controller,
    /// `"sunspec+tcp://host:port/unit"`.
    pub battery: String,
    /// The limits kept whatever the controller: the SoC window, the power check.
    #[serde(default)]
    pub safety: SafetyConfig,
    /// The simulated battery, for `battery = "sim"`.
    pub sim: SimConfig,
}

/// Which controller the agent drives, parsed from [`AgentConfig::battery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatteryChoice {
    /// The in-process simulated unit.
    Sim,
    /// A SunSpec controller over Modbus TCP.
    SunSpec(SunSpecUrl),
    /// `dry-run:<url>`: the controller is read, never written; periods are reported
    /// `skipped` (reason `dry_run`) with what would have been applied.
    DryRun(SunSpecUrl),
}

/// The longest catch-up after an outage: 366 days, 17,568 reports at most.
const MAX_CATCH_UP_H: u32 = 366 * 24;

impl AgentConfig {
    /// The embedded default configuration, every field commented.
    pub const DEFAULT_TOML: &'static str = include_str!("../agent.default.toml");

    /// Layers `defaults`, then `file`, then `MAX300_<FIELD>` (and `MAX300_SIM_<FIELD>`,
    /// `MAX300_SAFETY_<FIELD>`) from `env`, and checks the result. Pure: the caller reads the
    /// file and the environment.
    pub fn from_toml(
        defaults: &str,
        file: Option<&str>,
        env: &[(String, String)],
    ) -> Result<AgentConfig, AgentError> {
        Self::layered(defaults, file, env, &[])
    }

    /// As [`AgentConfig::from_toml`], with flags (`(key, value)` pairs) as the strongest
    /// layer: see [`max300_config`]. An unknown key is an error that names it as the user
    /// wrote it (`sim.colour` in the file, `MAX300_SIM_COLOUR`, `--colour`); `MAX300_*`
    /// variables that are none of this struct's keys or tables belong to the cloud or the
    /// command line and are left alone.
    pub fn layered(
        defaults: &str,
        file: Option<&str>,
        env: &[(String, String)],
        flags: &[(&str, String)],
    ) -> Result<AgentConfig, AgentError> {
        let sources = Sources {
            default: defaults,
            file,
            env,
            flags,
        };
        let config: AgentConfig = max300_config::load(&sources).map_err(|e| match e {
            ConfigError::Missing { key } if key == "device_id" => AgentError::Config(
                "device_id: missing (set it in the config, --device-id or MAX300_DEVICE_ID)".into(),
            ),
            e => AgentError::Config(e.to_string()),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every range once, naming the field and the value in the message.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |msg: String| Err(AgentError::Config(msg));
        self.broker_url()?;
        self.time_zone()?;
        if self.topic_root.is_empty() || self.topic_root.contains(['+', '#', '/']) {
            return bad(format!(
                "topic_root: {:?} must be one non-empty topic level without wildcards",
                self.topic_root
            ));
        }
        self.max_rate()?;
        if !matches!(self.clock_sync.as_str(), "auto" | "ntp" | "assume") {
            return bad(format!(
                "clock_sync: {:?} is not auto, ntp or assume",
                self.clock_sync
            ));
        }
        if self.max_rate_kw <= 0.0 {
            return bad(format!("max_rate_kw: {} must be above 0", self.max_rate_kw));
        }
        if self.heartbeat_interval_s == 0 {
            return bad("heartbeat_interval_s: must be at least 1".into());
        }
        if self.resend_after_s < 2 {
            return bad(format!(
                "resend_after_s: {} is below the minimum of 2 (a fast clock must not cause a resend storm)",
                self.resend_after_s
            ));
        }
        if !(1..=60).contains(&self.revert_timeout_s) {
            return bad(format!(
                "revert_timeout_s: {} must be from 1 to 60",
                self.revert_timeout_s
            ));
        }
        // A cut-off is needed (the store's last report may be years old) and is a setting, so
        // an operator can ask for every missed period of a long outage to be reported.
        if !(1..=MAX_CATCH_UP_H).contains(&self.catch_up_h) {
            return bad(format!(
                "catch_up_h: {} must be from 1 to {MAX_CATCH_UP_H} (366 days)",
                self.catch_up_h
            ));
        }
        self.battery_choice()?;
        self.safety
            .validate()
            .map_err(|e| AgentError::Config(format!("safety.{e}")))?;
        // The wait for the power to settle holds up the re-assert, which comes at half the
        // revert timer: a timer no longer than twice the wait could run out while the agent
        // waits, and the unit would go idle by itself in the middle of a period.
        if self.revert_timeout_s as f64 <= 2.0 * self.safety.settle_s {
            return bad(format!(
                "revert_timeout_s: {} must be more than twice safety.settle_s ({})",
                self.revert_timeout_s, self.safety.settle_s
            ));
        }
        self.sim
            .validate()
            .map_err(|e| AgentError::Config(format!("sim.{e}")))
    }

    /// The battery controller, parsed.
    pub fn battery_choice(&self) -> Result<BatteryChoice, AgentError> {
        if self.battery == "sim" {
            return Ok(BatteryChoice::Sim);
        }
        let (dry_run, url) = match self.battery.strip_prefix("dry-run:") {
            Some(url) => (true, url),
            None => (false, self.battery.as_str()),
        };
        let url: SunSpecUrl = url.parse().map_err(|e| {
            AgentError::Config(format!(
                "battery: {e} (use \"sim\", sunspec+tcp://host:port/unit or dry-run:sunspec+tcp://…)"
            ))
        })?;
        Ok(if dry_run {
            BatteryChoice::DryRun(url)
        } else {
            BatteryChoice::SunSpec(url)
        })
    }

    /// The broker address, parsed.
    pub fn broker_url(&self) -> Result<BrokerUrl, AgentError> {
        self.mqtt
            .parse()
            .map_err(|e| AgentError::Config(format!("mqtt: {e}")))
    }

    /// The schedule zone, looked up in the bundled tz database.
    pub fn time_zone(&self) -> Result<TimeZone, AgentError> {
        max300_protocol::day::time_zone(&self.timezone)
            .map_err(|e| AgentError::Config(format!("timezone: {e}")))
    }

    /// This unit's own limit as a rate.
    pub fn max_rate(&self) -> Result<RateKw, AgentError> {
        RateKw::try_from(self.max_rate_kw)
            .map_err(|e| AgentError::Config(format!("max_rate_kw: {e}")))
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

    /// The topic layout.
    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_root.clone())
    }

    /// The store file inside `data_dir`.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("agent.sqlite")
    }

    /// The controller's revert timer (real time).
    pub fn revert_timeout(&self) -> Duration {
        Duration::from_secs(self.revert_timeout_s)
    }

    /// How far back missed periods are still reported (clock time).
    pub fn catch_up(&self) -> SignedDuration {
        SignedDuration::from_hours(i64::from(self.catch_up_h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_embedded_default_needs_only_a_device_id() {
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            None,
            &env(&[("MAX300_DEVICE_ID", "max300-0001")]),
        )
        .unwrap();
        assert_eq!(c.device_id.as_str(), "max300-0001");
        assert_eq!(c.topic_root, "max300");
        assert_eq!(c.timezone, "Europe/London");
        assert_eq!(c.max_rate_kw, 150.0);
        assert_eq!(
            (c.heartbeat_interval_s, c.resend_after_s, c.revert_timeout_s),
            (60, 10, 30)
        );
        assert!(c.durable);
        assert_eq!(c.sim.capacity_kwh, 300.0);
        assert_eq!(c.store_path(), PathBuf::from("data/agent/agent.sqlite"));
    }

    #[test]
    fn the_example_config_loads() {
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some(include_str!("../../../config/agent.toml")),
            &[],
        )
        .unwrap();
        assert_eq!(c.device_id.as_str(), "max300-0001");
        assert_eq!((c.max_rate_kw, c.sim.initial_soc_pct), (100.0, 40.0));
    }

    #[test]
    fn a_missing_device_id_says_where_to_set_it() {
        let err = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, None, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config: device_id: missing (set it in the config, --device-id or MAX300_DEVICE_ID)"
        );
    }

    #[test]
    fn the_file_overrides_the_default_and_env_overrides_the_file() {
        let file = "device_id = \"from-file\"\nmax_rate_kw = 100\n[sim]\ncapacity_kwh = 200\n";
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some(file),
            &env(&[
                ("MAX300_MQTT", "mqtt://broker:1884"),
                ("MAX300_DURABLE", "false"),
                ("MAX300_SIM_INITIAL_SOC_PCT", "20"),
                ("MAX300_SAFETY_SOC_MIN_PCT", "15"),
                ("MAX300_API_TOKEN", "not ours"),
            ]),
        )
        .unwrap();
        assert_eq!(c.device_id.as_str(), "from-file");
        assert_eq!(c.max_rate_kw, 100.0);
        assert_eq!(c.mqtt, "mqtt://broker:1884");
        assert!(!c.durable);
        assert_eq!(c.sim.capacity_kwh, 200.0);
        assert_eq!(c.sim.initial_soc_pct, 20.0);
        assert_eq!(c.safety.soc_min_pct, 15.0);
        assert_eq!(c.safety.soc_max_pct, 90.0);
    }

    #[test]
    fn each_layer_wins_over_the_one_before_default_file_env_flag() {
        let file = "device_id = \"from-file\"\nresend_after_s = 20\nheartbeat_interval_s = 30\n\
                    battery = \"dry-run:sunspec+tcp://plc/1\"\n";
        let c = AgentConfig::layered(
            AgentConfig::DEFAULT_TOML,
            Some(file),
            &env(&[
                ("MAX300_HEARTBEAT_INTERVAL_S", "15"),
                ("MAX300_BATTERY", "sunspec+tcp://plc/2"),
            ]),
            &[("battery", "sim".to_owned())],
        )
        .unwrap();
        // The default's topic root, the file's resend, the environment's heartbeat, the
        // flag's battery.
        assert_eq!(c.topic_root, "max300");
        assert_eq!(c.device_id.as_str(), "from-file");
        assert_eq!((c.resend_after_s, c.heartbeat_interval_s), (20, 15));
        assert_eq!(c.battery_choice().unwrap(), BatteryChoice::Sim);
    }

    #[test]
    fn a_nested_env_key_reaches_its_table_field() {
        // Both the table and the field have underscores: `safety.settle_s`, not `safety.settle.s`.
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some("device_id = \"d1\""),
            &env(&[
                ("MAX300_SAFETY_SETTLE_S", "0.5"),
                ("MAX300_SAFETY_POWER_TOLERANCE_KW", "1.25"),
                ("MAX300_SIM_ROUND_TRIP_EFFICIENCY", "0.92"),
                ("MAX300_SIM_STATE_FILE", "/var/lib/max300/soc.json"),
            ]),
        )
        .unwrap();
        assert_eq!(c.safety.settle_s, 0.5);
        assert_eq!(c.safety.power_tolerance_kw, 1.25);
        assert_eq!(c.sim.round_trip_efficiency, 0.92);
        assert_eq!(
            c.sim.state_file,
            Some(PathBuf::from("/var/lib/max300/soc.json"))
        );
        // The rest of the table keeps the default.
        assert_eq!(c.safety.soc_max_pct, 90.0);
    }

    #[test]
    fn an_unknown_key_is_named_from_the_file_and_from_the_environment() {
        let load = |file: &str, pairs: &[(&str, &str)]| {
            AgentConfig::from_toml(
                AgentConfig::DEFAULT_TOML,
                Some(&format!("device_id = \"d1\"\n{file}")),
                &env(pairs),
            )
            .unwrap_err()
            .to_string()
        };
        let err = load("[safety]\nsettle = 1", &[]);
        assert!(
            err.starts_with(
                "config: config file: safety.settle: unknown field `settle`, expected one of \
                 `soc_min_pct`"
            ),
            "{err}"
        );
        let err = load("", &[("MAX300_SAFETY_SETTLE", "1")]);
        assert!(
            err.starts_with(
                "config: MAX300_SAFETY_SETTLE: unknown field `settle`, expected one of \
                 `soc_min_pct`"
            ),
            "{err}"
        );
        let err = load("", &[("MAX300_SIM_COLOUR", "red")]);
        assert!(
            err.starts_with("config: MAX300_SIM_COLOUR: unknown field `colour`"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_values_are_named() {
        let cases = [
            ("revert_timeout_s = 0", "revert_timeout_s: 0"),
            ("revert_timeout_s = 61", "revert_timeout_s: 61"),
            ("resend_after_s = 1", "resend_after_s: 1"),
            (
                "battery = \"sunspec\"",
                "battery: \"sunspec\" is not a controller URL",
            ),
            (
                "battery = \"sunspec+tcp://plc:502/0\"",
                "battery: \"sunspec+tcp://plc:502/0\": unit \"0\"",
            ),
            ("mqtt = \"http://x\"", "mqtt:"),
            ("timezone = \"Mars/Base\"", "timezone:"),
            ("max_rate_kw = -1", "max_rate_kw:"),
            ("[safety]\nsoc_min_pct = 95", "safety.soc_min_pct: 95"),
            ("[safety]\nsettle_s = 120", "safety.settle_s: 120"),
            ("[sim]\nsoc_min_pct = 5", "unknown field `soc_min_pct`"),
            ("device_id = \"a b\"", "device_id"),
            ("colour = \"red\"", "colour"),
        ];
        for (file, expected) in cases {
            let file = if file.starts_with("device_id") {
                file.to_owned()
            } else {
                format!("device_id = \"d1\"\n{file}")
            };
            let err = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, Some(&file), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{file}: {err}");
        }
    }

    #[test]
    fn the_catch_up_cut_off_is_a_setting_with_a_documented_range() {
        let load = |file: &str, pairs: &[(&str, &str)]| {
            AgentConfig::from_toml(
                AgentConfig::DEFAULT_TOML,
                Some(&format!("device_id = \"d1\"\n{file}")),
                &env(pairs),
            )
        };
        let c = load("", &[]).unwrap();
        assert_eq!(c.catch_up_h, 48);
        assert_eq!(c.catch_up(), jiff::SignedDuration::from_hours(48));
        let c = load("catch_up_h = 24", &[("MAX300_CATCH_UP_H", "8784")]).unwrap();
        assert_eq!(c.catch_up(), jiff::SignedDuration::from_hours(8784));
        assert_eq!(load("catch_up_h = 1", &[]).unwrap().catch_up_h, 1);
        for (file, expected) in [
            (
                "catch_up_h = 0",
                "config: catch_up_h: 0 must be from 1 to 8784 (366 days)",
            ),
            (
                "catch_up_h = 8785",
                "config: catch_up_h: 8785 must be from 1 to 8784 (366 days)",
            ),
        ] {
            assert_eq!(load(file, &[]).unwrap_err().to_string(), expected);
        }
    }

    #[test]
    fn a_revert_timer_no_longer_than_twice_the_settle_time_is_refused() {
        let load = |file: &str, env_pairs: &[(&str, &str)]| {
            AgentConfig::from_toml(
                AgentConfig::DEFAULT_TOML,
                Some(&format!("device_id = \"d1\"\n{file}")),
                &env(env_pairs),
            )
        };
        for (file, pairs, expected) in [
            (
                "revert_timeout_s = 10",
                &[][..],
                "config: revert_timeout_s: 10 must be more than twice safety.settle_s (5)",
            ),
            (
                "revert_timeout_s = 4\n[safety]\nsettle_s = 2.5",
                &[][..],
                "config: revert_timeout_s: 4 must be more than twice safety.settle_s (2.5)",
            ),
            (
                "",
                &[("MAX300_REVERT_TIMEOUT_S", "2")][..],
                "config: revert_timeout_s: 2 must be more than twice safety.settle_s (5)",
            ),
        ] {
            let err = load(file, pairs).unwrap_err().to_string();
            assert_eq!(err, expected, "{file} {pairs:?}");
        }
        // Just over twice the wait is enough, and 0 s of settling allows the shortest timer.
        assert!(load("revert_timeout_s = 11", &[]).is_ok());
        assert!(load("revert_timeout_s = 1\n[safety]\nsettle_s = 0", &[]).is_ok());
    }

    #[test]
    fn the_sim_write_log_is_unset_by_default_and_set_from_env() {
        let c = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, Some("device_id = \"d1\""), &[])
            .unwrap();
        assert_eq!(c.sim.write_log, None);
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some("device_id = \"d1\""),
            &env(&[("MAX300_SIM_WRITE_LOG", "/tmp/x")]),
        )
        .unwrap();
        assert_eq!(c.sim.write_log, Some(PathBuf::from("/tmp/x")));
        // And it survives printing the config and reading it back.
        let back = AgentConfig::from_toml(&toml::to_string(&c).unwrap(), None, &[]).unwrap();
        assert_eq!(back.sim.write_log, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn the_battery_is_the_sim_or_a_sunspec_controller() {
        let c = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, Some("device_id = \"d1\""), &[])
            .unwrap();
        assert_eq!(c.battery_choice().unwrap(), BatteryChoice::Sim);
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some("device_id = \"d1\""),
            &env(&[("MAX300_BATTERY", "sunspec+tcp://192.168.1.20:502/1")]),
        )
        .unwrap();
        let BatteryChoice::SunSpec(url) = c.battery_choice().unwrap() else {
            panic!("{:?}", c.battery);
        };
        assert_eq!(
            (url.host(), url.port(), url.unit()),
            ("192.168.1.20", 502, 1)
        );
        let c = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some("device_id = \"d1\"\nbattery = \"dry-run:sunspec+tcp://plc/2\""),
            &[],
        )
        .unwrap();
        assert!(matches!(c.battery_choice().unwrap(), BatteryChoice::DryRun(u) if u.unit() == 2));
    }

    #[test]
    fn a_non_numeric_env_value_is_refused_by_name() {
        let err = AgentConfig::from_toml(
            AgentConfig::DEFAULT_TOML,
            Some("device_id = \"d1\""),
            &env(&[("MAX300_MAX_RATE_KW", "lots")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("MAX300_MAX_RATE_KW"), "{err}");
    }

    #[test]
    fn the_config_round_trips_through_toml() {
        let c = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, Some("device_id = \"d1\""), &[])
            .unwrap();
        let text = toml::to_string(&c).unwrap();
        let back = AgentConfig::from_toml(&text, None, &[]).unwrap();
        assert_eq!(back.device_id, c.device_id);
        assert_eq!(back.sim.max_charge_kw, c.sim.max_charge_kw);
    }
}
