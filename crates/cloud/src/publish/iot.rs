//! The AWS IoT data-plane HTTPS API as a [`Transport`]: how a Lambda function, which holds no
//! MQTT connection, publishes commands and receipts. IoT Core delivers each publish to the
//! device's subscription at QoS 1, as the broker would.

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_iotdataplane::Client;
use aws_sdk_iotdataplane::primitives::Blob;
use max300_protocol::Message;

use super::Transport;
use crate::CloudError;

/// Publishes through `POST /topics/{topic}?qos=1`, signed with the usual AWS credential chain.
#[derive(Clone, Debug)]
pub struct IotDataPlane {
    client: Client,
}

impl IotDataPlane {
    /// A publisher to `endpoint`: the account's `iot:Data-ATS` endpoint
    /// (`aws iot describe-endpoint --endpoint-type iot:Data-ATS`), as a host or a URL.
    /// Region and credentials come from the environment, as for every AWS SDK.
    pub async fn connect(endpoint: &str) -> Result<IotDataPlane, CloudError> {
        let endpoint = endpoint.trim();
        if endpoint.is_empty() {
            return Err(CloudError::config("iot_data_endpoint: empty"));
        }
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("https://{endpoint}")
        };
        let shared = aws_config::defaults(BehaviorVersion::latest()).load().await;
        if shared.region().is_none() {
            return Err(CloudError::config(
                "iot_data_endpoint: no AWS region (set AWS_REGION)",
            ));
        }
        let config = aws_sdk_iotdataplane::config::Builder::from(&shared)
            .endpoint_url(url)
            .build();
        Ok(IotDataPlane {
            client: Client::from_conf(config),
        })
    }
}

#[async_trait]
impl Transport for IotDataPlane {
    async fn publish(&self, topic: String, message: &Message) -> Result<(), CloudError> {
        self.client
            .publish()
            .topic(&topic)
            .qos(1)
            .payload(Blob::new(message.encode()))
            .send()
            .await
            .map_err(|e| CloudError::Publish {
                what: topic.clone(),
                cause: e.into(),
            })?;
        Ok(())
    }

    /// There is no connection to hold: each publish is its own HTTPS request, and one that
    /// fails is reported (and retried by the sweeper) on its own.
    fn is_connected(&self) -> bool {
        true
    }
}
