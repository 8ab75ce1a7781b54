//! Table administration: the store's URL, and the table with the schema the deployment
//! template declares (one table, `pk`/`sk`, two sharded GSIs, TTL on `ttl`).

use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
};

use super::DynamoStore;
use crate::CloudError;

impl DynamoStore {
    /// Checks that the table exists; when it does not, creates it if `create` (the
    /// `--create-resources` flag), or says how to.
    pub async fn ensure_table(&self, create: bool) -> Result<(), CloudError> {
        let described = self
            .client
            .describe_table()
            .table_name(&*self.table)
            .send()
            .await;
        match described {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                if create {
                    self.create_table().await
                } else {
                    Err(CloudError::Config(format!(
                        "store: the DynamoDB table {} does not exist: start once with \
                         --create-resources (create_resources = true) to create it, or deploy \
                         deploy/template.yaml",
                        self.table
                    )))
                }
            }
            Err(e) => Err(self.err("DescribeTable", DisplayErrorContext(e))),
        }
    }

    /// Creates the table (on-demand capacity) with the schema the deployment template also
    /// declares, unless it exists, waits until it is active, and turns on TTL on `ttl`.
    pub async fn create_table(&self) -> Result<(), CloudError> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| self.err("CreateTable", e))
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(|e| self.err("CreateTable", e))
        };
        let index = |name: &str| -> Result<GlobalSecondaryIndex, CloudError> {
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key(&format!("{name}pk"), KeyType::Hash)?)
                .key_schema(key(&format!("{name}sk"), KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(|e| self.err("CreateTable", e))
        };
        let created = self
            .client
            .create_table()
            .table_name(&*self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?)
            .attribute_definitions(attr("gsi1pk")?)
            .attribute_definitions(attr("gsi1sk")?)
            .attribute_definitions(attr("gsi2pk")?)
            .attribute_definitions(attr("gsi2sk")?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .global_secondary_indexes(index("gsi1")?)
            .global_secondary_indexes(index("gsi2")?)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) => {}
            Err(e) => return Err(self.err("CreateTable", DisplayErrorContext(e))),
        }
        self.client
            .wait_until_table_exists()
            .table_name(&*self.table)
            .wait(std::time::Duration::from_secs(300))
            .await
            .map_err(|e| self.err("DescribeTable (waiting for ACTIVE)", DisplayErrorContext(e)))?;
        let ttl = self
            .client
            .describe_time_to_live()
            .table_name(&*self.table)
            .send()
            .await
            .map_err(|e| self.err("DescribeTimeToLive", DisplayErrorContext(e)))?;
        let enabled = ttl
            .time_to_live_description()
            .and_then(|d| d.attribute_name())
            .is_some_and(|a| a == "ttl");
        if !enabled {
            let spec = TimeToLiveSpecification::builder()
                .attribute_name("ttl")
                .enabled(true)
                .build()
                .map_err(|e| self.err("UpdateTimeToLive", e))?;
            self.client
                .update_time_to_live()
                .table_name(&*self.table)
                .time_to_live_specification(spec)
                .send()
                .await
                .map_err(|e| self.err("UpdateTimeToLive", DisplayErrorContext(e)))?;
        }
        Ok(())
    }
}

/// What `dynamodb://TABLE[?endpoint=URL&region=REGION]` names.
#[derive(Debug, PartialEq)]
pub(super) struct StoreUrl {
    pub(super) table: String,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
}

impl StoreUrl {
    pub(super) fn parse(url: &str) -> Result<StoreUrl, CloudError> {
        let bad = |why: String| CloudError::Store(format!("store URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("dynamodb://")
            .ok_or_else(|| bad("expected dynamodb://TABLE[?endpoint=URL&region=REGION]".into()))?;
        let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
        let valid = (3..=255).contains(&table.len())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(bad(format!(
                "table name {table:?} must be 3-255 characters of A-Z a-z 0-9 _ - ."
            )));
        }
        let mut target = StoreUrl {
            table: table.to_owned(),
            endpoint: None,
            region: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) if !v.is_empty() => target.endpoint = Some(v.to_owned()),
                Some(("region", v)) if !v.is_empty() => target.region = Some(v.to_owned()),
                _ => {
                    return Err(bad(format!(
                        "unknown or empty parameter {pair:?} (known: endpoint, region)"
                    )));
                }
            }
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_store_url_names_the_table_and_may_override_endpoint_and_region() {
        assert_eq!(
            StoreUrl::parse("dynamodb://max300-commands").unwrap(),
            StoreUrl {
                table: "max300-commands".into(),
                endpoint: None,
                region: None,
            }
        );
        assert_eq!(
            StoreUrl::parse("dynamodb://t_1.x?endpoint=http://127.0.0.1:5000&region=eu-west-2")
                .unwrap(),
            StoreUrl {
                table: "t_1.x".into(),
                endpoint: Some("http://127.0.0.1:5000".into()),
                region: Some("eu-west-2".into()),
            }
        );
    }

    #[test]
    fn a_bad_store_url_says_what_is_wrong() {
        let message = |url: &str| StoreUrl::parse(url).unwrap_err().to_string();
        assert!(message("sqlite://x").contains("expected dynamodb://TABLE"));
        assert!(message("dynamodb://").contains("table name \"\""));
        assert!(message("dynamodb://a b c").contains("must be 3-255 characters"));
        assert!(message("dynamodb://tbl?endpoint=").contains("\"endpoint=\""));
        let unknown = message("dynamodb://tbl?profile=x");
        assert!(unknown.starts_with("store: "), "{unknown}");
        assert!(unknown.contains("unknown or empty parameter \"profile=x\""));
    }

    #[tokio::test]
    async fn opening_a_bad_url_fails_before_any_aws_call() {
        let err = DynamoStore::open("dynamodb://x").await.unwrap_err();
        assert!(err.to_string().contains("table name \"x\""), "{err}");
    }
}
