//! Broker addresses: `mqtt://host:port`, or `mqtts://host:port` for TLS.

use std::fmt;
use std::str::FromStr;

use crate::MqttError;

/// A parsed broker address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to use TLS.
    pub tls: bool,
}

impl FromStr for BrokerUrl {
    type Err = MqttError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| MqttError::Url {
            url: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(rest) = s.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(bad("expected mqtt://host:port or mqtts://host:port"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad("a host and a non-zero port are needed"));
        }
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_tls_addresses() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1883".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1883, false));
        let u: BrokerUrl = "mqtts://broker.example".parse().unwrap();
        assert_eq!((u.port, u.tls), (8883, true));
        assert_eq!(u.to_string(), "mqtts://broker.example:8883");
    }

    #[test]
    fn refuses_other_schemes_and_bad_ports() {
        assert!("http://x:1".parse::<BrokerUrl>().is_err());
        let err = "mqtt://x:99999".parse::<BrokerUrl>().unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }
}
