//! The audit store: every raw document, fetched or POSTed, is kept before it is normalized,
//! and every rejection beside it. Keys are the same on every backend:
//! `raw/{received date}/{received instant}-{source}-{sha8}.json` and
//! `rejections/{schedule date}/{received instant}-{sha8}.json`.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use jiff::Timestamp;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::CloudError;

/// Where raw documents and rejections are kept.
#[derive(Clone, Debug)]
pub struct Audit {
    store: Arc<dyn ObjectStore>,
    /// The size of the parts a streamed document is written in, and so the most of it held
    /// at once: S3 takes no part under 5 MiB but the last; a folder takes any.
    part_bytes: usize,
}

/// A raw document being written as it arrives ([`Audit::raw_writer`]).
pub struct RawWriter {
    key: String,
    upload: WriteMultipart,
}

impl std::fmt::Debug for RawWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawWriter").field("key", &self.key).finish()
    }
}

impl RawWriter {
    /// Appends the next chunk; waits while two parts are on their way.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), CloudError> {
        self.upload
            .wait_for_capacity(2)
            .await
            .map_err(|e| CloudError::audit_failed(&self.key, e))?;
        self.upload.put(chunk);
        Ok(())
    }

    /// Completes the object; returns its key.
    pub async fn finish(self) -> Result<String, CloudError> {
        self.upload
            .finish()
            .await
            .map_err(|e| CloudError::audit_failed(&self.key, e))?;
        Ok(self.key)
    }

    /// Gives up on the object (a transfer that failed half-way): nothing is kept.
    pub async fn abort(self) {
        if let Err(e) = self.upload.abort().await {
            tracing::warn!(key = %self.key, error = %max300_protocol::error::Chain(&e), "a partial raw document was not removed");
        }
    }
}

impl Audit {
    /// An audit store on `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> Audit {
        Audit {
            store,
            part_bytes: 5 * 1024 * 1024,
        }
    }

    /// Opens an audit store from its URL: `file://DIR` (the default), a bare path, or
    /// `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]` (with the `aws` feature).
    pub fn open(url: &str) -> Result<Audit, CloudError> {
        let dir = match url.split_once("://") {
            None => url,
            Some(("file", dir)) => dir,
            #[cfg(feature = "aws")]
            Some(("s3", rest)) => return s3(rest),
            Some((scheme, _)) => {
                return Err(CloudError::config(format!(
                    "audit: {scheme}:// is not supported by this build; use file://DIR{}",
                    if cfg!(feature = "aws") {
                        " or s3://BUCKET/PREFIX"
                    } else {
                        ""
                    }
                )));
            }
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| CloudError::audit_failed(format!("cannot create {dir}"), e))?;
        let fs = LocalFileSystem::new_with_prefix(Path::new(dir))
            .map_err(|e| CloudError::audit_failed(dir, e))?;
        Ok(Audit {
            part_bytes: 256 * 1024,
            ..Audit::new(Arc::new(fs))
        })
    }

    /// Keeps a raw document; returns its key.
    pub async fn put_raw(
        &self,
        body: Bytes,
        source: &str,
        received: Timestamp,
    ) -> Result<String, CloudError> {
        let key = raw_key(source, received, &unique(&body));
        self.put(&key, body).await?;
        Ok(key)
    }

    /// Starts keeping a raw document that arrives in chunks. Its key has the same shape as
    /// [`Audit::put_raw`]'s, but its 8 hex digits are random: the content is not known yet.
    pub async fn raw_writer(
        &self,
        source: &str,
        received: Timestamp,
    ) -> Result<RawWriter, CloudError> {
        let tag = format!("{:08x}-{:04x}", fastrand::u32(..), fastrand::u16(..));
        let key = raw_key(source, received, &tag);
        let path = ObjectPath::parse(&key).map_err(|e| CloudError::audit_failed(&key, e))?;
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| CloudError::audit_failed(&key, e))?;
        Ok(RawWriter {
            upload: WriteMultipart::new_with_chunk_size(upload, self.part_bytes),
            key,
        })
    }

    /// Reads an object back as a stream of chunks, so a large one is never held whole.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<impl futures_util::Stream<Item = Result<Bytes, CloudError>> + use<>, CloudError>
    {
        use futures_util::{StreamExt, TryStreamExt};
        let got = self.read_object(key).await?;
        let key = key.to_owned();
        let chunks = match got.payload {
            // object_store reads a file 8 KiB at a time, each read a trip through the
            // blocking pool: 1,700 of them for a 13.6 MB document, which kept the normalizing
            // thread waiting on a loaded machine. A quarter MiB at a time, 55 of them.
            object_store::GetResultPayload::File(file, _) => file_chunks(file, got.range).boxed(),
            object_store::GetResultPayload::Stream(stream) => {
                stream.map_err(std::io::Error::other).boxed()
            }
        };
        Ok(chunks.map_err(move |e| CloudError::audit_failed(&key, e)))
    }

    /// Keeps the rejections of one ingestion; returns the key.
    pub async fn put_rejections(
        &self,
        schedule_date: &str,
        received: Timestamp,
        json: Vec<u8>,
    ) -> Result<String, CloudError> {
        let body = Bytes::from(json);
        let key = format!(
            "rejections/{schedule_date}/{}-{}.json",
            received.strftime("%Y%m%dT%H%M%S%.3fZ"),
            unique(&body)
        );
        self.put(&key, body).await?;
        Ok(key)
    }

    /// Reads an object back.
    pub async fn get(&self, key: &str) -> Result<Bytes, CloudError> {
        self.read_object(key)
            .await?
            .bytes()
            .await
            .map_err(|e| CloudError::audit_failed(key, e))
    }

    /// Starts reading an object.
    async fn read_object(&self, key: &str) -> Result<object_store::GetResult, CloudError> {
        let path = ObjectPath::parse(key).map_err(|e| CloudError::audit_failed(key, e))?;
        self.store
            .get(&path)
            .await
            .map_err(|e| CloudError::audit_failed(key, e))
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), CloudError> {
        let path = ObjectPath::parse(key).map_err(|e| CloudError::audit_failed(key, e))?;
        self.store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| CloudError::audit_failed(key, e))?;
        Ok(())
    }
}

/// How much of a local file one read of [`Audit::stream`] takes.
const FILE_CHUNK: u64 = 256 * 1024;

/// The bytes of `range` of a local file, read [`FILE_CHUNK`] at a time on the blocking pool.
fn file_chunks(
    file: std::fs::File,
    range: std::ops::Range<u64>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::try_unfold(
        (file, range.start, range.end),
        |(mut file, at, end)| async move {
            if at >= end {
                return Ok(None);
            }
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Seek, SeekFrom};
                file.seek(SeekFrom::Start(at))?;
                let mut buf = Vec::with_capacity(FILE_CHUNK.min(end - at) as usize);
                let read = (&mut file)
                    .take(FILE_CHUNK.min(end - at))
                    .read_to_end(&mut buf)?;
                if read == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ended at byte {at}, before {end}"),
                    ));
                }
                Ok(Some((Bytes::from(buf), (file, at + read as u64, end))))
            })
            .await
            .map_err(std::io::Error::other)?
        },
    )
}

/// An S3 bucket, under a prefix, with the usual AWS credential chain (object_store reads the
/// `AWS_*` variables, web identity, ECS and instance credentials). The keys below the prefix
/// are the same as in a local folder.
#[cfg(feature = "aws")]
fn s3(rest: &str) -> Result<Audit, CloudError> {
    use object_store::aws::AmazonS3Builder;
    use object_store::prefix::PrefixStore;

    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    if bucket.is_empty() {
        return Err(CloudError::config(format!(
            "audit: s3://{rest}: no bucket; use s3://BUCKET/PREFIX"
        )));
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("endpoint", url)) => {
                builder = builder
                    .with_endpoint(url)
                    .with_allow_http(url.starts_with("http://"));
            }
            Some(("region", region)) => builder = builder.with_region(region),
            _ => {
                return Err(CloudError::config(format!(
                    "audit: s3://{rest}: unknown parameter {pair:?}; expected endpoint= or region="
                )));
            }
        }
    }
    let store = builder
        .build()
        .map_err(|e| CloudError::config_because(format!("audit: s3://{rest}"), e))?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        Audit::new(Arc::new(store))
    } else {
        Audit::new(Arc::new(PrefixStore::new(store, prefix)))
    })
}

/// `raw/{received date}/{received instant}-{source}-{tag}.json`.
fn raw_key(source: &str, received: Timestamp, tag: &str) -> String {
    format!(
        "raw/{}/{}-{source}-{tag}.json",
        received.strftime("%Y-%m-%d"),
        received.strftime("%Y%m%dT%H%M%S%.3fZ"),
    )
}

/// A content hash plus a random part: two documents received in the same millisecond, even
/// identical ones, each keep their own object, so the audit trail counts every receipt.
fn unique(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:08x}-{:04x}", hash >> 32, fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_raw_documents_under_dated_keys() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(&format!("file://{}", dir.path().display())).unwrap();
        let t: Timestamp = "2026-11-29T15:45:00Z".parse().unwrap();
        let key = audit
            .put_raw(Bytes::from_static(b"{}"), "fetch", t)
            .await
            .unwrap();
        assert!(key.starts_with("raw/2026-11-29/20261129T154500"), "{key}");
        assert_eq!(audit.get(&key).await.unwrap(), Bytes::from_static(b"{}"));
        assert!(dir.path().join(&key).exists());
    }

    #[tokio::test]
    async fn a_streamed_document_reads_back_whole_in_chunks() {
        use futures_util::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(&format!("file://{}", dir.path().display())).unwrap();
        let t: Timestamp = "2026-11-29T15:45:00Z".parse().unwrap();
        let body: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = audit.raw_writer("fetch", t).await.unwrap();
        for chunk in body.chunks(64 * 1024) {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        let key = writer.finish().await.unwrap();
        assert!(
            key.starts_with("raw/2026-11-29/20261129T154500.000Z-fetch-"),
            "{key}"
        );
        let chunks: Vec<Bytes> = audit
            .stream(&key)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(chunks.concat(), body);
        assert_eq!(audit.get(&key).await.unwrap(), body);
    }

    #[tokio::test]
    async fn an_aborted_document_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(&format!("file://{}", dir.path().display())).unwrap();
        let t: Timestamp = "2026-11-29T15:45:00Z".parse().unwrap();
        let mut writer = audit.raw_writer("fetch", t).await.unwrap();
        writer.write(Bytes::from_static(b"{\"half")).await.unwrap();
        writer.abort().await;
        let left: Vec<_> = walk(dir.path());
        assert!(left.is_empty(), "{left:?}");
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .flat_map(|e| {
                if e.path().is_dir() {
                    walk(&e.path())
                } else {
                    vec![e.path()]
                }
            })
            .collect()
    }

    #[test]
    fn refuses_unknown_backends() {
        let err = Audit::open("ftp://x").unwrap_err();
        assert!(err.to_string().contains("ftp://"), "{err}");
    }
}
