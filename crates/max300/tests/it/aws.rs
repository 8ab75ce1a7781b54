//! What the AWS tests share: moto (DynamoDB and S3 in one process), a bucket and a table on
//! it, and the environment a `max300` process needs to reach them.

use std::sync::Arc;

use max300_cloud::CommandStore;
use max300_cloud::store::DynamoStore;

#[path = "../../../cloud/tests/it/moto.rs"]
mod moto;

pub use moto::Moto;

/// A moto server with one table and one bucket.
pub struct Aws {
    /// The server.
    pub moto: Moto,
    /// The table's name.
    pub table: String,
    /// The bucket's name.
    pub bucket: String,
}

impl Aws {
    /// Starts moto and creates the table (with the template's schema) and the bucket.
    pub async fn start() -> Aws {
        let moto = Moto::start();
        let aws = Aws {
            moto,
            table: "max300".into(),
            bucket: "max300-audit".into(),
        };
        DynamoStore::from_client(aws.moto.dynamodb(), &aws.table)
            .create_table()
            .await
            .unwrap();
        // object_store can't create buckets; moto takes an unsigned PUT.
        let created = reqwest::Client::new()
            .put(format!("{}/{}", aws.moto.endpoint, aws.bucket))
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success(), "{}", created.status());
        aws
    }

    /// The store on the table, as the test sees it.
    pub fn store(&self) -> Arc<dyn CommandStore> {
        Arc::new(DynamoStore::from_client(self.moto.dynamodb(), &self.table))
    }

    /// `store` and `audit` settings, and the credentials and region a process needs, as
    /// environment variables.
    pub fn env(&self) -> Vec<(String, String)> {
        let e = &self.moto.endpoint;
        [
            (
                "MAX300_STORE",
                format!("dynamodb://{}?endpoint={e}", self.table),
            ),
            (
                "MAX300_AUDIT",
                format!("s3://{}/audit?endpoint={e}", self.bucket),
            ),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", moto::REGION.into()),
            // Nothing may reach for instance metadata or a profile on this machine.
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The keys in the bucket under `prefix`.
    pub async fn objects(&self, prefix: &str) -> Vec<String> {
        let xml = reqwest::get(format!(
            "{}/{}?list-type=2&prefix={prefix}",
            self.moto.endpoint, self.bucket
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_owned()))
            .collect()
    }
}
