//! Request plumbing: one call of each kind the store makes, with conditional failures told
//! apart from errors, paging, batching, bounded concurrency and backoff; and [`Change`], an
//! update expression built with every name behind a placeholder.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;

use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, ReturnValue, TransactWriteItem, Update,
};
use max300_protocol::Backoff;
use tokio::task::JoinSet;

use super::item::{Item, key, num};
use super::{ATTEMPTS, CONCURRENCY, DynamoStore, SHARDS};
use crate::CloudError;

impl DynamoStore {
    pub(super) async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, CloudError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", e))?;
        Ok(out.item)
    }

    /// Puts an item that must not exist yet; false if it does.
    pub(super) async fn put_new(&self, item: Item) -> Result<bool, CloudError> {
        let put = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err("PutItem", e)),
        }
    }

    /// Applies one guarded update; false when its condition failed (or it met a transaction
    /// on the same item), so the caller re-reads.
    pub(super) async fn update(
        &self,
        change: Change,
        pk: &str,
        sk: &str,
    ) -> Result<Option<Item>, CloudError> {
        let (expr, names, values, cond) = change.parts();
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(pk, sk)))
            .update_expression(expr)
            .set_condition_expression(cond)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(out) => Ok(Some(out.attributes.unwrap_or_default())),
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_conditional_check_failed_exception()
                        || s.is_transaction_conflict_exception()
                }) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err("UpdateItem", e)),
        }
    }

    /// Runs one transaction; false when it was cancelled (a condition failed or another
    /// transaction held one of its items), so the caller re-reads.
    pub(super) async fn transact(
        &self,
        op: &str,
        items: Vec<TransactWriteItem>,
    ) -> Result<bool, CloudError> {
        let out = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_transaction_canceled_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(op, e)),
        }
    }

    pub(super) async fn query(
        &self,
        index: Option<&str>,
        cond: &str,
        values: &[(&str, AttributeValue)],
        consistent: bool,
    ) -> Result<Vec<Item>, CloudError> {
        let mut out = Vec::new();
        self.query_pages(index, cond, values, consistent, &[], |page| {
            out.extend(page);
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// [`Self::query`], a page at a time to `each`, with only `attributes` of each item when
    /// any are named.
    pub(super) async fn query_pages(
        &self,
        index: Option<&str>,
        cond: &str,
        values: &[(&str, AttributeValue)],
        consistent: bool,
        attributes: &[&str],
        mut each: impl FnMut(Vec<Item>) -> Result<bool, CloudError>,
    ) -> Result<(), CloudError> {
        let mut start = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&*self.table)
                .key_condition_expression(cond)
                .set_exclusive_start_key(start.take());
            for (k, v) in values {
                q = q.expression_attribute_values(*k, v.clone());
            }
            if !attributes.is_empty() {
                // Named by placeholder: some attribute names are reserved words.
                let names: Vec<String> = (0..attributes.len()).map(|i| format!("#a{i}")).collect();
                q = q.projection_expression(names.join(", "));
                for (name, attribute) in names.iter().zip(attributes) {
                    q = q.expression_attribute_names(name, *attribute);
                }
            }
            q = match index {
                Some(i) => q.index_name(i),
                None => q.consistent_read(consistent),
            };
            let page = q.send().await.map_err(|e| self.err("Query", e))?;
            let more = each(page.items.unwrap_or_default())?;
            match page.last_evaluated_key {
                Some(k) if more && !k.is_empty() => start = Some(k),
                _ => return Ok(()),
            }
        }
    }

    /// Every item of a sharded GSI key `{prefix}#{0..16}`, with an optional sort-key
    /// condition such as `gsi2sk > :r`; with `first`, only the pages that hold a shard's
    /// first `first` (in sort-key order).
    pub(super) async fn shards(
        &self,
        index: &'static str,
        prefix: String,
        range: Option<(&'static str, AttributeValue)>,
        first: Option<usize>,
    ) -> Result<Vec<Item>, CloudError> {
        let parts = self
            .concurrently((0..SHARDS).collect(), move |store, shard| {
                let prefix = prefix.clone();
                let range = range.clone();
                async move {
                    let pk = AttributeValue::S(format!("{prefix}#{shard}"));
                    let (cond, values) = match range {
                        Some((op, v)) => (
                            format!("{index}pk = :pk AND {index}sk {op} :r"),
                            vec![(":pk", pk), (":r", v)],
                        ),
                        None => (format!("{index}pk = :pk"), vec![(":pk", pk)]),
                    };
                    let mut out = Vec::new();
                    store
                        .query_pages(Some(index), &cond, &values, false, &[], |page| {
                            out.extend(page);
                            Ok(first.is_none_or(|n| out.len() < n))
                        })
                        .await?;
                    Ok(out)
                }
            })
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Strongly consistent reads of many keys, 100 a request; missing keys are left out.
    pub(super) async fn batch_get(
        &self,
        keys: Vec<(String, String)>,
    ) -> Result<Vec<Item>, CloudError> {
        let unique: BTreeSet<(String, String)> = keys.into_iter().collect();
        let chunks: Vec<Vec<(String, String)>> = unique
            .into_iter()
            .collect::<Vec<_>>()
            .chunks(100)
            .map(<[_]>::to_vec)
            .collect();
        let parts = self
            .concurrently(chunks, |store, chunk| async move {
                let mut out = Vec::new();
                let mut keys: Vec<Item> = chunk.iter().map(|(p, s)| key(p, s)).collect();
                for attempt in 0..ATTEMPTS {
                    if keys.is_empty() {
                        return Ok(out);
                    }
                    let request = KeysAndAttributes::builder()
                        .set_keys(Some(std::mem::take(&mut keys)))
                        .consistent_read(true)
                        .build()
                        .map_err(|e| store.err("BatchGetItem", e))?;
                    let got = store
                        .client
                        .batch_get_item()
                        .request_items(&*store.table, request)
                        .send()
                        .await
                        .map_err(|e| store.err("BatchGetItem", e))?;
                    if let Some(mut items) = got.responses {
                        out.extend(items.remove(&*store.table).unwrap_or_default());
                    }
                    if let Some(mut rest) = got.unprocessed_keys {
                        keys = rest
                            .remove(&*store.table)
                            .map(|k| k.keys)
                            .unwrap_or_default();
                    }
                    if !keys.is_empty() {
                        // Throttled: back off before asking for the rest.
                        backoff(attempt).await;
                    }
                }
                Err(store.refused("BatchGetItem", "keys still unprocessed after retries"))
            })
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Strongly consistent reads of many keys, by key.
    pub(super) async fn by_key(
        &self,
        keys: Vec<(String, String)>,
    ) -> Result<HashMap<(String, String), Item>, CloudError> {
        Ok(self
            .batch_get(keys)
            .await?
            .into_iter()
            .filter_map(|i| {
                let k = (
                    i.get("pk")?.as_s().ok()?.clone(),
                    i.get("sk")?.as_s().ok()?.clone(),
                );
                Some((k, i))
            })
            .collect())
    }

    /// Runs `f` over `items` with at most [`CONCURRENCY`] in flight; results in input order.
    pub(super) async fn concurrently<T, R, F, Fut>(
        &self,
        items: Vec<T>,
        f: F,
    ) -> Result<Vec<R>, CloudError>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(DynamoStore, T) -> Fut,
        Fut: Future<Output = Result<R, CloudError>> + Send + 'static,
    {
        let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
        let mut set = JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            if set.len() >= CONCURRENCY {
                join_one(&mut set, &mut out).await?;
            }
            let fut = f(self.clone(), item);
            set.spawn(async move { (i, fut.await) });
        }
        while !set.is_empty() {
            join_one(&mut set, &mut out).await?;
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| CloudError::store("a store task lost its result")))
            .collect()
    }
}

async fn join_one<R>(
    set: &mut JoinSet<(usize, Result<R, CloudError>)>,
    out: &mut [Option<R>],
) -> Result<(), CloudError>
where
    R: Send + 'static,
{
    match set.join_next().await {
        Some(Ok((i, r))) => {
            out[i] = Some(r?);
            Ok(())
        }
        Some(Err(e)) => Err(CloudError::store_failed("store task failed", e)),
        None => Ok(()),
    }
}

/// The pause before retrying a lost race or a throttled batch (0-based attempt): 5 ms
/// doubling to 320 ms, then up to twice that at random, so two instances that collided do
/// not collide again. Real time.
const RETRY: Backoff = Backoff::new(
    std::time::Duration::from_millis(5),
    std::time::Duration::from_millis(320),
)
.jitter(1.0, 2.0);

/// Sleeps the [`RETRY`] pause for `attempt`.
pub(super) async fn backoff(attempt: u32) {
    tokio::time::sleep(RETRY.jittered(attempt, fastrand::f64())).await;
}

pub(super) fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut chunk = Vec::with_capacity(size);
    for item in items {
        chunk.push(item);
        if chunk.len() == size {
            out.push(std::mem::replace(&mut chunk, Vec::with_capacity(size)));
        }
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

/// One update expression with its condition, every attribute name behind a placeholder
/// (DynamoDB reserves hundreds of words, `state` and `version` among them).
#[derive(Clone, Debug, Default)]
pub(super) struct Change {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    set: Vec<String>,
    add: Vec<String>,
    remove: Vec<String>,
    cond: Vec<String>,
}

impl Change {
    /// A change that applies only if the item's revision is still `rev` (and counts it up).
    pub(super) fn guarded(rev: u64) -> Change {
        let mut c = Change::default();
        let r = c.n("rev");
        let was = c.v(num(rev));
        let next = c.v(num(rev + 1));
        c.when(format!("{r} = {was}"));
        c.set_raw(format!("{r} = {next}"));
        c
    }

    pub(super) fn n(&mut self, attr: &str) -> String {
        let alias = format!("#{}", attr.replace('_', ""));
        self.names.insert(alias.clone(), attr.to_owned());
        alias
    }

    pub(super) fn v(&mut self, value: AttributeValue) -> String {
        let alias = format!(":v{}", self.values.len());
        self.values.insert(alias.clone(), value);
        alias
    }

    pub(super) fn set(&mut self, attr: &str, value: AttributeValue) {
        let (n, v) = (self.n(attr), self.v(value));
        self.set.push(format!("{n} = {v}"));
    }

    pub(super) fn set_raw(&mut self, expr: String) {
        self.set.push(expr);
    }

    pub(super) fn add(&mut self, attr: &str, value: AttributeValue) {
        let (n, v) = (self.n(attr), self.v(value));
        self.add.push(format!("{n} {v}"));
    }

    /// Whether it adds to any attribute.
    pub(super) fn adds(&self) -> bool {
        !self.add.is_empty()
    }

    pub(super) fn remove(&mut self, attr: &str) {
        let n = self.n(attr);
        self.remove.push(n);
    }

    pub(super) fn when(&mut self, cond: String) {
        self.cond.push(cond);
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn parts(
        self,
    ) -> (
        String,
        Option<HashMap<String, String>>,
        Option<HashMap<String, AttributeValue>>,
        Option<String>,
    ) {
        let mut expr = Vec::new();
        if !self.set.is_empty() {
            expr.push(format!("SET {}", self.set.join(", ")));
        }
        if !self.add.is_empty() {
            expr.push(format!("ADD {}", self.add.join(", ")));
        }
        if !self.remove.is_empty() {
            expr.push(format!("REMOVE {}", self.remove.join(", ")));
        }
        let cond = (!self.cond.is_empty()).then(|| self.cond.join(" AND "));
        (
            expr.join(" "),
            (!self.names.is_empty()).then_some(self.names),
            (!self.values.is_empty()).then_some(self.values),
            cond,
        )
    }

    pub(super) fn tx(
        self,
        table: &str,
        pk: &str,
        sk: &str,
    ) -> Result<TransactWriteItem, CloudError> {
        let (expr, names, values, cond) = self.parts();
        let update = Update::builder()
            .table_name(table)
            .set_key(Some(key(pk, sk)))
            .update_expression(expr)
            .set_condition_expression(cond)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .build()
            .map_err(|e| CloudError::store_failed(format!("dynamodb table {table}"), e))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

pub(super) fn put_new_tx(table: &str, item: Item) -> Result<TransactWriteItem, CloudError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .map_err(|e| CloudError::store_failed(format!("dynamodb table {table}"), e))?;
    Ok(TransactWriteItem::builder().put(put).build())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::dynamodb::item::s;

    #[test]
    fn a_retry_waits_5_ms_doubling_to_320_ms_and_up_to_double() {
        // 5 ms << attempt, as far as 320 ms; then up to double at random.
        for attempt in 0..12u32 {
            let base = std::time::Duration::from_millis(5 << attempt.min(6));
            assert_eq!(RETRY.delay(attempt), base);
            assert_eq!(RETRY.jittered(attempt, 0.0), base);
            assert_eq!(RETRY.jittered(attempt, 1.0), base * 2);
        }
    }

    #[test]
    fn an_update_puts_every_name_behind_a_placeholder() {
        let mut c = Change::guarded(4);
        c.set("state", s("sent"));
        c.add("n_sent", num(1));
        c.remove("gsi2pk");
        c.when("attribute_exists(pk)".into());
        let (expr, names, values, cond) = c.parts();
        assert_eq!(
            expr,
            "SET #rev = :v1, #state = :v2 ADD #nsent :v3 REMOVE #gsi2pk"
        );
        assert_eq!(names.unwrap()["#state"], "state");
        assert_eq!(values.unwrap()[":v0"], num(4));
        assert_eq!(cond.as_deref(), Some("#rev = :v0 AND attribute_exists(pk)"));
    }
}
