//! A SunSpec battery controller over Modbus TCP: finds the SunSpec block, walks its model
//! chain, and drives the unit through one of two control models, chosen by the URL's
//! `?control=` query:
//!
//! - `124` (the default): storage model 124, `StorCtl_Mod`, `InWRte`/`OutWRte` (in percent of
//!   `WChaMax`) and the revert timer `InOutWRte_RvrtTms`;
//! - `704`: DER AC controls model 704, `WSetEna` = 1, `WSetMod` = 1 (watts), `WSet` (signed,
//!   positive injecting, so charging is negative) and the revert timer `WSetRvrtTms`; the
//!   state of charge comes from model 713 (`SoC` × `Pct_SF`). The live limits still come
//!   from model 124 (`WChaMax`, and `ChaSt` full or empty), which 704 mode therefore also
//!   needs: model 702's ratings are nameplate values that say nothing about a full or empty
//!   battery, so they are not read.
//!
//! Every write is read back at once; a difference is [`BatteryError::ReadBack`]. On every
//! `read()` the measured power comes from model 802 (battery, preferred) or 103 (inverter)
//! when the chain has one; without either, or with `W` not implemented, it is `None`.
//!
//! ```text
//!  "SunS" ─ 1 ─ 124 ─ [103 | 802] ─ [704 ─ 713] ─ 0xFFFF      [ ] optional
//!
//!  apply(setpoint), control=124             apply(setpoint), control=704
//!   read 124 (limits, SFs, control)          read 704 (WSet_SF, control)
//!   write OutWRte..RvrtTms (4 registers)     write WSetRvrtTms (2 registers)
//!   write StorCtl_Mod if it changes          write WSetEna, WSetMod, WSet (4 registers)
//!   read 124 back                            read 704 back
//!
//!  read()
//!   read 124 (limits; SoC and control when control=124)
//!   read 704 and 713 (control and SoC when control=704)
//!   read W, W_SF of 802 or 103 (measured power, sign flipped to charge positive)
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
use map::{Control, DerControl, Meter, Storage};

pub mod map;

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

/// `sunspec+tcp://host:port/unit?control=124|704`: a SunSpec controller over Modbus TCP. The
/// port defaults to 502, the unit id to 1 and the control model to 124.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SunSpecUrl {
    host: String,
    port: u16,
    unit: u8,
    control: ControlModel,
}

/// The model a controller is driven through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlModel {
    /// Storage model 124: mode bits and rates in percent of `WChaMax`.
    #[default]
    Storage,
    /// DER AC controls model 704: a signed `WSet` in watts, with 713 for the state of charge.
    Der,
}

impl ControlModel {
    /// The model id, as written in the URL.
    pub fn id(self) -> u16 {
        match self {
            ControlModel::Storage => map::STORAGE,
            ControlModel::Der => map::der_ctl::ID,
        }
    }
}

impl FromStr for ControlModel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "124" => Ok(ControlModel::Storage),
            "704" => Ok(ControlModel::Der),
            other => Err(format!(
                "control {other:?} is not a control model: 124 (storage) or 704 (DER AC controls)"
            )),
        }
    }
}

impl fmt::Display for ControlModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id())
    }
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

    /// The model the controller is driven through.
    pub fn control(&self) -> ControlModel {
        self.control
    }
}

impl FromStr for SunSpecUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(Self::SCHEME).ok_or_else(|| {
            format!("{s:?} is not a controller URL: expected sunspec+tcp://host:port/unit")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let mut control = ControlModel::default();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("control", value)) => {
                    control = value.parse().map_err(|e| format!("{s:?}: {e}"))?;
                }
                _ => {
                    return Err(format!(
                        "{s:?}: query {pair:?} is not understood: the only one is control=124|704"
                    ));
                }
            }
        }
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
            control,
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
            )?;
        } else {
            write!(
                f,
                "{}{}:{}/{}",
                Self::SCHEME,
                self.host,
                self.port,
                self.unit
            )?;
        }
        // The default is left out, so a URL without a query prints as it was given.
        match self.control {
            ControlModel::Storage => Ok(()),
            other => write!(f, "?control={other}"),
        }
    }
}

/// A SunSpec controller over Modbus TCP, driven through model 124 or 704. One connection,
/// held behind an async mutex so requests never interleave; made again after any transport
/// failure.
#[derive(Debug)]
pub struct SunSpecBattery {
    url: SunSpecUrl,
    revert_s: u16,
    conn: Mutex<Conn>,
}

/// Where the models this client uses start, once the chain was walked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Model 124.
    pub storage: Option<u16>,
    /// Model 802 or 103, whichever measures (802 when both are there).
    pub meter: Option<(Meter, u16)>,
    /// Model 704.
    pub der_ctl: Option<u16>,
    /// Model 713.
    pub der_storage: Option<u16>,
    /// Every model id in the chain, in order, for error messages.
    pub models: Vec<u16>,
}

impl Chain {
    /// The addresses `control` needs (124, and 704 with 713 for `Der`), or an error naming
    /// what is missing and what was found.
    fn require(&self, control: ControlModel) -> Result<Ready, BatteryError> {
        let missing = |what: &str| {
            BatteryError::Device(format!(
                "control={control}: no model {what} in the SunSpec chain; models found: {:?}",
                self.models
            ))
        };
        let storage = self.storage.ok_or_else(|| missing("124 (storage)"))?;
        let der = match control {
            ControlModel::Storage => None,
            ControlModel::Der => Some((
                self.der_ctl
                    .ok_or_else(|| missing("704 (DER AC controls)"))?,
                self.der_storage
                    .ok_or_else(|| missing("713 (DER storage capacity)"))?,
            )),
        };
        Ok(Ready {
            storage,
            der,
            meter: self.meter,
        })
    }
}

/// The addresses one call uses.
#[derive(Clone, Copy, Debug)]
struct Ready {
    storage: u16,
    /// Models 704 and 713, in 704 mode.
    der: Option<(u16, u16)>,
    meter: Option<(Meter, u16)>,
}

/// The registers last written, in the control model's terms.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Written {
    Storage(Control),
    Der(DerControl),
}

#[derive(Default)]
struct Conn {
    ctx: Option<Context>,
    chain: Option<Chain>,
    /// The last setpoint written and its registers: while the registers still hold them, the
    /// setpoint reads back as written rather than as the register's steps.
    written: Option<(Setpoint, Written)>,
    /// After a transport failure: until when calls fail at once, and with what.
    unreachable: Option<(Instant, BatteryError)>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("connected", &self.ctx.is_some())
            .field("chain", &self.chain)
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
                .map_err(|_| BatteryError::unreachable(format!("{target}: name lookup timed out")))?
                .map_err(|e| {
                    BatteryError::unreachable_because(format!("{target}: name lookup"), e)
                })?
                .collect();
        let addr = addrs
            .first()
            .copied()
            .ok_or_else(|| BatteryError::unreachable(format!("{target}: no address")))?;
        let slave = Slave(self.url.unit);
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_modbus::client::tcp::connect_slave(addr, slave),
        )
        .await
        .map_err(|_| BatteryError::unreachable(format!("{target}: connect timed out")))?
        .map_err(|e| BatteryError::unreachable_because(format!("{target}: connect"), e))
    }

    /// Connects and walks the chain if needed; returns the addresses of the models used.
    async fn ready<'a>(
        &self,
        conn: &'a mut Conn,
    ) -> Result<(&'a mut Context, Ready), BatteryError> {
        let ctx = match conn.ctx.take() {
            Some(ctx) => ctx,
            None => {
                // A new connection may reach a controller that was replaced: walk again.
                conn.chain = None;
                self.connect().await?
            }
        };
        let ctx = conn.ctx.insert(ctx);
        let chain = match &conn.chain {
            Some(c) => c,
            None => {
                let c = discover(ctx).await?;
                info!(
                    controller = %self.url,
                    models = ?c.models,
                    model_124 = ?c.storage,
                    meter = ?c.meter,
                    "sunspec chain walked"
                );
                conn.chain.insert(c)
            }
        };
        let ready = chain.require(self.url.control)?;
        Ok((ctx, ready))
    }

    async fn try_read(&self, conn: &mut Conn) -> Result<BatteryStatus, BatteryError> {
        let written = conn.written;
        let (ctx, at) = self.ready(conn).await?;
        let storage = read_storage(ctx, at.storage).await?;
        let (setpoint, soc_pct) = match at.der {
            None => {
                let setpoint = match written {
                    Some((sp, Written::Storage(c))) if c == storage.control => sp,
                    _ => storage.setpoint()?,
                };
                (setpoint, storage.soc_pct)
            }
            Some((ctl, cap)) => {
                let (control, sf) = read_der_ctl(ctx, ctl).await?;
                let soc = read_der_soc(ctx, cap).await?;
                let setpoint = match written {
                    Some((sp, Written::Der(c))) if c == control => sp,
                    _ => control.setpoint(sf)?,
                };
                (setpoint, soc)
            }
        };
        let measured_kw = match at.meter {
            Some((meter, addr)) => {
                let block = request(
                    "read the measured power",
                    addr,
                    ctx.read_holding_registers(addr, meter.read_len()),
                )
                .await?;
                meter.measured_kw(&block)?
            }
            None => None,
        };
        Ok(BatteryStatus {
            setpoint,
            soc_pct,
            max_charge: storage.max_charge(),
            max_discharge: storage.max_discharge(),
            measured_kw,
        })
    }

    async fn try_apply(&self, conn: &mut Conn, setpoint: Setpoint) -> Result<(), BatteryError> {
        let (ctx, at) = self.ready(conn).await?;
        let result = match at.der {
            None => self.apply_storage(ctx, at.storage, setpoint).await,
            Some((ctl, _)) => self.apply_der(ctx, ctl, setpoint).await,
        };
        // Whatever the registers hold after a failed write, it is not known to be the target.
        conn.written = result.as_ref().ok().map(|w| (setpoint, *w));
        result.map(|_| ())
    }

    async fn apply_storage(
        &self,
        ctx: &mut Context,
        at: u16,
        setpoint: Setpoint,
    ) -> Result<Written, BatteryError> {
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
            return Err(BatteryError::ReadBack {
                register,
                wrote: *wrote,
                read: *read,
            });
        }
        Ok(Written::Storage(target))
    }

    async fn apply_der(
        &self,
        ctx: &mut Context,
        at: u16,
        setpoint: Setpoint,
    ) -> Result<Written, BatteryError> {
        let (_, sf) = read_der_ctl(ctx, at).await?;
        let target = DerControl::encode(setpoint, sf, u32::from(self.revert_s))?;
        // The timer first, so the new setting never runs under an old, shorter timer.
        let timer = at + map::der_ctl::W_SET_RVRT_TMS as u16;
        request(
            "write WSetRvrtTms",
            timer,
            ctx.write_multiple_registers(timer, &target.timer()),
        )
        .await?;
        // Enable, mode and the signed value in one request, so the unit never runs half of it.
        let setting = at + map::der_ctl::W_SET_ENA as u16;
        request(
            "write WSetEna..WSet",
            setting,
            ctx.write_multiple_registers(setting, &target.setting()),
        )
        .await?;
        let (back, _) = read_der_ctl(ctx, at).await?;
        if let Some((register, read, wrote)) = back.differences(&target).first() {
            return Err(BatteryError::ReadBack {
                register,
                wrote: *wrote,
                read: *read,
            });
        }
        Ok(Written::Der(target))
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
    if let BatteryError::Transport { .. } = error {
        conn.ctx = None;
        conn.unreachable = Some((monotonic() + UNREACHABLE_BACKOFF, error.clone()));
    }
}

/// The last transport error, while the back-off after it lasts.
fn backing_off(conn: &Conn) -> Result<(), BatteryError> {
    match &conn.unreachable {
        Some((until, BatteryError::Transport { what, cause })) if monotonic() < *until => {
            Err(BatteryError::Transport {
                what: format!(
                    "{what} (not tried again for {} s)",
                    UNREACHABLE_BACKOFF.as_secs()
                ),
                cause: cause.clone(),
            })
        }
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
        Err(_) => Err(BatteryError::unreachable(format!(
            "{what} at {addr}: no answer within {} ms",
            REQUEST_TIMEOUT.as_millis()
        ))),
        Ok(Err(e)) => Err(BatteryError::unreachable_because(
            format!("{what} at {addr}"),
            e,
        )),
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

async fn read_der_ctl(
    ctx: &mut Context,
    at: u16,
) -> Result<(DerControl, map::ScaleFactor), BatteryError> {
    let block = request(
        "read model 704",
        at,
        ctx.read_holding_registers(at, map::der_ctl::READ_LEN),
    )
    .await?;
    DerControl::decode(&block)
}

async fn read_der_soc(ctx: &mut Context, at: u16) -> Result<f64, BatteryError> {
    let len = map::der_storage::PCT_SF as u16 + 1;
    let block = request("read model 713", at, ctx.read_holding_registers(at, len)).await?;
    map::der_soc_pct(&block)
}

/// Finds "SunS" at 40000, 0 or 50000, then walks the whole chain, noting where the models
/// this client uses start. Which of them are required depends on the control model
/// ([`Chain::require`]), so a missing one is not an error here.
pub async fn discover(ctx: &mut Context) -> Result<Chain, BatteryError> {
    let mut base = None;
    for candidate in map::BASES {
        match tokio::time::timeout(REQUEST_TIMEOUT, ctx.read_holding_registers(candidate, 2)).await
        {
            Err(_) => {
                return Err(BatteryError::unreachable(format!(
                    "probe for SunS at {candidate}: no answer within {} ms",
                    REQUEST_TIMEOUT.as_millis()
                )));
            }
            Ok(Err(e)) => {
                return Err(BatteryError::unreachable_because(
                    format!("probe for SunS at {candidate}"),
                    e,
                ));
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
    let mut chain = Chain::default();
    for _ in 0..MAX_MODELS {
        let header =
            match request("read a model header", at, ctx.read_holding_registers(at, 2)).await {
                Ok(header) => header,
                // A device whose map stops without an end marker refuses the read past it:
                // what was found so far is the chain.
                Err(BatteryError::Device(e)) if !chain.models.is_empty() => {
                    debug!(at, error = %e, "sunspec chain ends without an end marker");
                    break;
                }
                Err(e) => return Err(e),
            };
        let (id, len) = (header[0], header[1]);
        if id == map::END {
            break;
        }
        let needs = match id {
            map::STORAGE => Some(map::STORAGE_LEN),
            map::der_ctl::ID => Some(map::der_ctl::READ_LEN - 2),
            map::der_storage::ID => Some(map::der_storage::PCT_SF as u16 - 1),
            other => Meter::from_id(other).map(|m| m.read_len() - 2),
        };
        if let Some(needs) = needs
            && len < needs
        {
            return Err(BatteryError::Device(format!(
                "model {id} at {at}: length {len} is below {needs}"
            )));
        }
        // The first of each counts; 802 measures at the battery, so it wins over 103.
        match id {
            map::STORAGE => {
                chain.storage.get_or_insert(at);
            }
            map::der_ctl::ID => {
                chain.der_ctl.get_or_insert(at);
            }
            map::der_storage::ID => {
                chain.der_storage.get_or_insert(at);
            }
            other => {
                if let Some(meter) = Meter::from_id(other)
                    && !matches!(chain.meter, Some((Meter::Battery, _)))
                    && (chain.meter.is_none() || meter == Meter::Battery)
                {
                    chain.meter = Some((meter, at));
                }
            }
        }
        chain.models.push(id);
        at = at
            .checked_add(2 + len)
            .ok_or_else(|| BatteryError::Device(format!("model {id} at {at}: runs past 65535")))?;
    }
    Ok(chain)
}

#[cfg(test)]
mod tests;
