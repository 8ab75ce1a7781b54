//! A SunSpec battery controller over Modbus TCP: finds the SunSpec block, walks its model
//! chain to model 124 (storage), and drives it through `StorCtl_Mod`, `InWRte`/`OutWRte` (in
//! percent of `WChaMax`) and the revert timer `InOutWRte_RvrtTms`, reading every write back at
//! once. [`map`] holds the register layout and the scale-factor arithmetic; [`server`] (feature
//! `sim-server`) serves the same map over the simulated unit for `max300 battery-sim`.
//!
//! ```text
//!  apply(setpoint)                         read()
//!   read model 124 (limits, SFs, control)   read model 124
//!   write OutWRte..RvrtTms (4 registers)    decode ChaState, ChaSt, control
//!   write StorCtl_Mod if it changes
//!   read model 124 back: a difference is BatteryError::ReadBack
//! ```
//!
//! A request that gets no answer within [`REQUEST_TIMEOUT`] drops the connection; every call
//! is tried [`ATTEMPTS`] times, so one lost packet does not fail a period.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use max300_protocol::Setpoint;
use max300_protocol::clock::monotonic;
use tokio::sync::Mutex;
use tokio_modbus::Slave;
use tokio_modbus::client::{Context, Reader, Writer};
use tracing::{debug, info};

use super::{Battery, BatteryError, BatteryStatus};
use map::{Control, Storage};

pub mod map;
#[cfg(feature = "sim-server")]
pub mod server;

/// How long one Modbus request may take before the controller counts as not answering.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How many times a read or a write is tried before it fails.
pub const ATTEMPTS: u32 = 2;
/// The pause before the second try, after reconnecting.
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// After a controller did not answer, calls fail at once for this long rather than wait for
/// another timeout, so the agent stays responsive (MQTT, heartbeats, period reports).
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_secs(2);
/// The most models walked before the chain counts as broken.
const MAX_MODELS: usize = 64;

/// `sunspec+tcp://host:port/unit`: a SunSpec controller over Modbus TCP. The port defaults to
/// 502 and the unit id to 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SunSpecUrl {
    host: String,
    port: u16,
    unit: u8,
}

impl SunSpecUrl {
    /// The scheme prefix.
    pub const SCHEME: &'static str = "sunspec+tcp://";

    /// The host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Modbus unit id.
    pub fn unit(&self) -> u8 {
        self.unit
    }
}

impl FromStr for SunSpecUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(Self::SCHEME).ok_or_else(|| {
            format!("{s:?} is not a controller URL: expected sunspec+tcp://host:port/unit")
        })?;
        let (authority, unit) = match rest.split_once('/') {
            Some((a, "")) => (a, None),
            Some((a, u)) => (a, Some(u)),
            None => (rest, None),
        };
        let unit = match unit {
            None => 1,
            Some(u) => u.parse::<u8>().ok().filter(|u| *u >= 1).ok_or_else(|| {
                format!("{s:?}: unit {u:?} must be a Modbus unit id from 1 to 255")
            })?,
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host is missing"));
        }
        let port = match port {
            None => 502,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?}: port {p:?} must be from 1 to 65535"))?,
        };
        Ok(SunSpecUrl {
            host: host.to_owned(),
            port,
            unit,
        })
    }
}

impl fmt::Display for SunSpecUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}[{}]:{}/{}",
                Self::SCHEME,
                self.host,
                self.port,
                self.unit
            )
        } else {
            write!(
                f,
                "{}{}:{}/{}",
                Self::SCHEME,
                self.host,
                self.port,
                self.unit
            )
        }
    }
}

/// A SunSpec model-124 controller over Modbus TCP. One connection, held behind an async
/// mutex so requests never interleave; made again after any transport failure.
#[derive(Debug)]
pub struct SunSpecBattery {
    url: SunSpecUrl,
    revert_s: u16,
    conn: Mutex<Conn>,
}

#[derive(Default)]
struct Conn {
    ctx: Option<Context>,
    /// Where model 124 starts, once the chain was walked.
    storage: Option<u16>,
    /// The last setpoint written and its registers: while the registers still hold them, the
    /// setpoint reads back as written rather than as the register's 0.01 % steps.
    written: Option<(Setpoint, Control)>,
    /// After a transport failure: until when calls fail at once, and with what.
    unreachable: Option<(Instant, String)>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("connected", &self.ctx.is_some())
            .field("storage", &self.storage)
            .field("written", &self.written)
            .field("unreachable", &self.unreachable)
            .finish()
    }
}

impl SunSpecBattery {
    /// A controller at `url` whose revert timer is set to `revert` (whole seconds, at least
    /// 1). Nothing is connected until the first call.
    pub fn new(url: SunSpecUrl, revert: Duration) -> SunSpecBattery {
        SunSpecBattery {
            url,
            revert_s: u16::try_from(revert.as_secs().max(1)).unwrap_or(u16::MAX),
            conn: Mutex::new(Conn::default()),
        }
    }

    /// The controller's address.
    pub fn url(&self) -> &SunSpecUrl {
        &self.url
    }

    async fn connect(&self) -> Result<Context, BatteryError> {
        let target = format!("{}:{}", self.url.host, self.url.port);
        let addrs: Vec<SocketAddr> =
            tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::lookup_host(target.clone()))
                .await
                .map_err(|_| BatteryError::Transport(format!("{target}: name lookup timed out")))?
                .map_err(|e| BatteryError::Transport(format!("{target}: {e}")))?
                .collect();
        let addr = addrs
            .first()
            .copied()
            .ok_or_else(|| BatteryError::Transport(format!("{target}: no address")))?;
        let slave = Slave(self.url.unit);
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_modbus::client::tcp::connect_slave(addr, slave),
        )
        .await
        .map_err(|_| BatteryError::Transport(format!("{target}: connect timed out")))?
        .map_err(|e| BatteryError::Transport(format!("{target}: connect: {e}")))
    }

    /// Connects and walks the chain if needed; returns model 124's address.
    async fn ready<'a>(&self, conn: &'a mut Conn) -> Result<(&'a mut Context, u16), BatteryError> {
        let ctx = match conn.ctx.take() {
            Some(ctx) => ctx,
            None => {
                // A new connection may reach a controller that was replaced: walk again.
                conn.storage = None;
                self.connect().await?
            }
        };
        let ctx = conn.ctx.insert(ctx);
        let storage = match conn.storage {
            Some(s) => s,
            None => {
                let s = discover(ctx).await?;
                info!(controller = %self.url, model_124 = s, "sunspec storage model found");
                conn.storage = Some(s);
                s
            }
        };
        Ok((ctx, storage))
    }

    async fn try_read(&self, conn: &mut Conn) -> Result<BatteryStatus, BatteryError> {
        let (ctx, at) = self.ready(conn).await?;
        let storage = read_storage(ctx, at).await?;
        let setpoint = match conn.written {
            Some((sp, control)) if control == storage.control => sp,
            _ => storage.setpoint()?,
        };
        Ok(BatteryStatus {
            setpoint,
            soc_pct: storage.soc_pct,
            max_charge: storage.max_charge(),
            max_discharge: storage.max_discharge(),
            measured_kw: None,
        })
    }

    async fn try_apply(&self, conn: &mut Conn, setpoint: Setpoint) -> Result<(), BatteryError> {
        let (ctx, at) = self.ready(conn).await?;
        let storage = read_storage(ctx, at).await?;
        let target = storage.encode(setpoint, self.revert_s)?;
        // The rates and the timer first, then the mode: a change of direction passes through
        // a zero rate, never through the new rate in the old direction.
        let rates = at + map::offset::OUT_W_RTE as u16;
        request(
            "write OutWRte..InOutWRte_RvrtTms",
            rates,
            ctx.write_multiple_registers(rates, &target.rates()),
        )
        .await?;
        if storage.control.stor_ctl_mod != target.stor_ctl_mod {
            let mode = at + map::offset::STOR_CTL_MOD as u16;
            request(
                "write StorCtl_Mod",
                mode,
                ctx.write_single_register(mode, target.stor_ctl_mod),
            )
            .await?;
        }
        let back = read_storage(ctx, at).await?;
        if let Some((register, read, wrote)) = back.control.differences(&target).first() {
            // Whatever it holds, it is not what was written.
            conn.written = None;
            return Err(BatteryError::ReadBack {
                register,
                wrote: *wrote,
                read: *read,
            });
        }
        conn.written = Some((setpoint, target));
        Ok(())
    }
}

#[async_trait]
impl Battery for SunSpecBattery {
    async fn apply(&self, setpoint: Setpoint) -> Result<(), BatteryError> {
        let mut conn = self.conn.lock().await;
        backing_off(&conn)?;
        let mut attempt = 1;
        loop {
            match self.try_apply(&mut conn, setpoint).await {
                Ok(()) => {
                    conn.unreachable = None;
                    return Ok(());
                }
                Err(e) if attempt < ATTEMPTS => {
                    debug!(controller = %self.url, error = %e, "controller write failed: trying again");
                    retry_after(&mut conn, &e).await;
                    attempt += 1;
                }
                Err(e) => {
                    drop_after_transport_failure(&mut conn, &e);
                    return Err(e);
                }
            }
        }
    }

    async fn read(&self) -> Result<BatteryStatus, BatteryError> {
        let mut conn = self.conn.lock().await;
        backing_off(&conn)?;
        let mut attempt = 1;
        loop {
            match self.try_read(&mut conn).await {
                Ok(status) => {
                    conn.unreachable = None;
                    return Ok(status);
                }
                Err(e) if attempt < ATTEMPTS => {
                    debug!(controller = %self.url, error = %e, "controller read failed: trying again");
                    retry_after(&mut conn, &e).await;
                    attempt += 1;
                }
                Err(e) => {
                    drop_after_transport_failure(&mut conn, &e);
                    return Err(e);
                }
            }
        }
    }
}

/// After a transport failure the connection may still deliver a late answer to the request
/// that timed out: the next request starts on a new one.
fn drop_after_transport_failure(conn: &mut Conn, error: &BatteryError) {
    if let BatteryError::Transport(e) = error {
        conn.ctx = None;
        conn.unreachable = Some((monotonic() + UNREACHABLE_BACKOFF, e.clone()));
    }
}

/// The last transport error, while the back-off after it lasts.
fn backing_off(conn: &Conn) -> Result<(), BatteryError> {
    match &conn.unreachable {
        Some((until, e)) if monotonic() < *until => Err(BatteryError::Transport(format!(
            "{e} (not tried again for {} s)",
            UNREACHABLE_BACKOFF.as_secs()
        ))),
        _ => Ok(()),
    }
}

async fn retry_after(conn: &mut Conn, error: &BatteryError) {
    drop_after_transport_failure(conn, error);
    tokio::time::sleep(RETRY_DELAY).await;
}

/// One request with its timeout; tokio-modbus's nested result flattened into our error.
async fn request<T>(
    what: &str,
    addr: u16,
    call: impl Future<Output = tokio_modbus::Result<T>>,
) -> Result<T, BatteryError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Err(_) => Err(BatteryError::Transport(format!(
            "{what} at {addr}: no answer within {} ms",
            REQUEST_TIMEOUT.as_millis()
        ))),
        Ok(Err(e)) => Err(BatteryError::Transport(format!("{what} at {addr}: {e}"))),
        Ok(Ok(Err(code))) => Err(BatteryError::Device(format!(
            "{what} at {addr}: Modbus exception {:#04x} ({code})",
            u8::from(code)
        ))),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

async fn read_storage(ctx: &mut Context, at: u16) -> Result<Storage, BatteryError> {
    let block = request(
        "read model 124",
        at,
        ctx.read_holding_registers(at, map::STORAGE_BLOCK),
    )
    .await?;
    Storage::decode(&block)
}

/// Finds "SunS" at 40000, 0 or 50000, then walks the models to 124.
async fn discover(ctx: &mut Context) -> Result<u16, BatteryError> {
    let mut base = None;
    for candidate in map::BASES {
        match tokio::time::timeout(REQUEST_TIMEOUT, ctx.read_holding_registers(candidate, 2)).await
        {
            Err(_) => {
                return Err(BatteryError::Transport(format!(
                    "probe for SunS at {candidate}: no answer within {} ms",
                    REQUEST_TIMEOUT.as_millis()
                )));
            }
            Ok(Err(e)) => {
                return Err(BatteryError::Transport(format!(
                    "probe for SunS at {candidate}: {e}"
                )));
            }
            Ok(Ok(Ok(words))) if words == map::MARKER => {
                base = Some(candidate);
                break;
            }
            // Another map, or no registers there (an exception): try the next base.
            Ok(Ok(_)) => {}
        }
    }
    let base = base.ok_or_else(|| {
        BatteryError::Device("no SunSpec marker \"SunS\" at 40000, 0 or 50000".into())
    })?;
    let mut at = base + 2;
    let mut seen = Vec::new();
    for _ in 0..MAX_MODELS {
        let header = request("read a model header", at, ctx.read_holding_registers(at, 2)).await?;
        let (id, len) = (header[0], header[1]);
        if id == map::END {
            break;
        }
        if id == map::STORAGE {
            if len < map::STORAGE_LEN {
                return Err(BatteryError::Device(format!(
                    "model 124 at {at}: length {len} is below {}",
                    map::STORAGE_LEN
                )));
            }
            return Ok(at);
        }
        seen.push(id);
        at = at
            .checked_add(2 + len)
            .ok_or_else(|| BatteryError::Device(format!("model {id} at {at}: runs past 65535")))?;
    }
    Err(BatteryError::Device(format!(
        "no model 124 (storage) in the SunSpec chain at {base}; models found: {seen:?}"
    )))
}

#[cfg(test)]
mod tests;
