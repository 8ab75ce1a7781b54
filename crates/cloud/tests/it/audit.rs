//! The audit store on each backend: the same keys, and what is kept reads back as it was.

use bytes::Bytes;
use jiff::Timestamp;
use max300_cloud::audit::Audit;

async fn keeps_documents_and_rejections_under_the_same_keys(audit: &Audit) {
    let t: Timestamp = "2026-11-29T15:45:00.123Z".parse().unwrap();
    let doc = Bytes::from_static(b"{\"devices\": []}");
    let raw = audit.put_raw(doc.clone(), "fetch", t).await.unwrap();
    assert!(
        raw.starts_with("raw/2026-11-29/20261129T154500.123Z-fetch-"),
        "{raw}"
    );
    assert!(raw.ends_with(".json"), "{raw}");
    assert_eq!(audit.get(&raw).await.unwrap(), doc);
    // The same document received again in the same millisecond keeps its own object.
    let again = audit.put_raw(doc.clone(), "fetch", t).await.unwrap();
    assert_ne!(again, raw);
    assert_eq!(audit.get(&again).await.unwrap(), doc);
    let rejected = audit
        .put_rejections("2026-11-30", t, b"[{\"field\": \"x\"}]".to_vec())
        .await
        .unwrap();
    assert!(
        rejected.starts_with("rejections/2026-11-30/20261129T154500.123Z-"),
        "{rejected}"
    );
    assert_eq!(
        audit.get(&rejected).await.unwrap(),
        Bytes::from_static(b"[{\"field\": \"x\"}]")
    );
    // A document streamed in as it arrives, over more than one 5 MiB part, reads back whole.
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| b"{}[], \"ab"[i as usize % 8])
        .collect();
    let mut writer = audit.raw_writer("fetch", t).await.unwrap();
    for chunk in big.chunks(100_000) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let streamed = writer.finish().await.unwrap();
    assert!(
        streamed.starts_with("raw/2026-11-29/20261129T154500.123Z-fetch-"),
        "{streamed}"
    );
    assert_eq!(audit.get(&streamed).await.unwrap(), big);
    // Streamed back, a chunk at a time (as the normalizing reads it), it is the same bytes.
    use futures_util::TryStreamExt;
    let chunks: Vec<Bytes> = audit
        .stream(&streamed)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(chunks.len() > 1, "{} chunks", chunks.len());
    assert_eq!(chunks.concat(), big);
    let missing = audit.get("raw/2026-11-29/none.json").await.unwrap_err();
    assert!(missing.to_string().contains("none.json"), "{missing}");
}

#[tokio::test]
async fn a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::open(&format!("file://{}", dir.path().display())).unwrap();
    keeps_documents_and_rejections_under_the_same_keys(&audit).await;
}

#[cfg(feature = "aws")]
#[tokio::test]
#[ignore = "needs moto_server; .ci/run installs it"]
async fn an_s3_bucket_under_a_prefix() {
    use std::sync::Arc;

    use object_store::aws::AmazonS3Builder;
    use object_store::prefix::PrefixStore;

    let moto = crate::moto::Moto::start();
    let created = reqwest::Client::new()
        .put(format!("{}/audit-bucket", moto.endpoint))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success());
    // Credentials on the builder, not in the environment: tests share one process.
    let s3 = AmazonS3Builder::new()
        .with_bucket_name("audit-bucket")
        .with_endpoint(&moto.endpoint)
        .with_allow_http(true)
        .with_region(crate::moto::REGION)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    let audit = Audit::new(Arc::new(PrefixStore::new(s3, "audit")));
    keeps_documents_and_rejections_under_the_same_keys(&audit).await;
    // The keys sit under the prefix in the bucket itself.
    let listing = reqwest::get(format!(
        "{}/audit-bucket?list-type=2&prefix=audit/raw/2026-11-29/",
        moto.endpoint
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(
        listing.matches("<Key>").count(),
        3,
        "two documents put, one streamed: {listing}"
    );
}

#[test]
fn an_s3_url_without_a_bucket_or_with_an_unknown_parameter_is_refused() {
    let err = Audit::open("s3:///prefix").unwrap_err().to_string();
    if cfg!(feature = "aws") {
        assert!(err.contains("no bucket"), "{err}");
        let err = Audit::open("s3://b/p?colour=red").unwrap_err().to_string();
        assert!(err.contains("colour=red"), "{err}");
    } else {
        assert!(err.contains("not supported by this build"), "{err}");
    }
}
