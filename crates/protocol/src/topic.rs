//! Topic names. Every topic string is built and parsed here, never with `format!` elsewhere.

use crate::DeviceId;

/// The per-device channels of DESIGN §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// cloud → device
    Schedule,
    /// cloud → device
    Control,
    /// cloud → device
    Receipt,
    /// device → cloud
    Ack,
    /// device → cloud
    Report,
    /// device → cloud
    Heartbeat,
    /// device → cloud
    Sync,
}

impl Channel {
    const ALL: [Channel; 7] = [
        Channel::Schedule,
        Channel::Control,
        Channel::Receipt,
        Channel::Ack,
        Channel::Report,
        Channel::Heartbeat,
        Channel::Sync,
    ];

    /// The last topic segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Schedule => "schedule",
            Channel::Control => "control",
            Channel::Receipt => "receipt",
            Channel::Ack => "ack",
            Channel::Report => "report",
            Channel::Heartbeat => "heartbeat",
            Channel::Sync => "sync",
        }
    }

    /// Whether devices publish on it.
    pub fn from_device(self) -> bool {
        matches!(
            self,
            Channel::Ack | Channel::Report | Channel::Heartbeat | Channel::Sync
        )
    }
}

/// Topic names under one root (`max300` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            root: "max300".into(),
        }
    }
}

impl Topics {
    /// Topics under `root`.
    pub fn new(root: impl Into<String>) -> Topics {
        Topics { root: root.into() }
    }

    /// `{root}/{device_id}/{channel}`.
    pub fn topic(&self, device: &DeviceId, channel: Channel) -> String {
        format!("{}/{}/{}", self.root, device, channel.as_str())
    }

    /// What the cloud subscribes to: every device's outbound channels.
    pub fn cloud_filters(&self) -> Vec<String> {
        Channel::ALL
            .into_iter()
            .filter(|c| c.from_device())
            .map(|c| format!("{}/+/{}", self.root, c.as_str()))
            .collect()
    }

    /// What one device subscribes to: its own inbound channels.
    pub fn device_filters(&self, device: &DeviceId) -> Vec<String> {
        Channel::ALL
            .into_iter()
            .filter(|c| !c.from_device())
            .map(|c| self.topic(device, c))
            .collect()
    }

    /// Splits a topic into its device and channel; `None` for any topic not of ours.
    pub fn parse(&self, topic: &str) -> Option<(DeviceId, Channel)> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix('/')?;
        let (device, channel) = rest.split_once('/')?;
        let channel = Channel::ALL.into_iter().find(|c| c.as_str() == channel)?;
        Some((DeviceId::parse(device).ok()?, channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_topics() {
        let t = Topics::default();
        let d = DeviceId::parse("max300-0001").unwrap();
        let topic = t.topic(&d, Channel::Report);
        assert_eq!(topic, "max300/max300-0001/report");
        assert_eq!(t.parse(&topic), Some((d, Channel::Report)));
    }

    #[test]
    fn ignores_foreign_topics() {
        let t = Topics::default();
        assert_eq!(t.parse("other/max300-0001/report"), None);
        assert_eq!(t.parse("max300/max300-0001/reboot"), None);
        assert_eq!(t.parse("max300/bad id/report"), None);
        assert_eq!(t.parse("max300/a/b/report"), None);
    }

    #[test]
    fn cloud_and_device_filters_split_the_channels() {
        let t = Topics::default();
        assert_eq!(t.cloud_filters().len(), 4);
        assert!(t.cloud_filters().contains(&"max300/+/sync".to_owned()));
        let d = DeviceId::parse("x").unwrap();
        assert_eq!(
            t.device_filters(&d),
            vec!["max300/x/schedule", "max300/x/control", "max300/x/receipt"]
        );
    }
}
