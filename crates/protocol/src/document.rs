//! The provider document (DESIGN §4) and its normalization into one [`Schedule`] per device.
//!
//! The document is read once, borrowing from the input: each field is kept as raw JSON text
//! until it is checked, so every error can name its place and quote the offending value, and
//! one bad schedule never stops the others.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::day::{OffGrid, time_zone};
use crate::error::Chain;
mod split;

use split::{Piece, Splitter};

use crate::{Day, DeviceId, Mode, PERIOD_SECS, ProtocolError, RateKw, Roster, Schedule, Setpoint};

/// What normalization needs to know about the fleet.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// The fleet's zone; a document in another zone is rejected whole.
    pub timezone: TimeZone,
    /// The limit for devices without one of their own.
    pub default_max_rate: RateKw,
    /// Registered devices and the limit of each; `"*"` schedules go to these.
    pub devices: Roster<RateKw>,
    /// The largest document accepted, in bytes.
    pub max_document_bytes: usize,
}

impl Fleet {
    /// A fleet in `timezone` with no registered devices and the default limits.
    pub fn new(timezone: TimeZone) -> Fleet {
        Fleet {
            timezone,
            default_max_rate: RateKw::from_watts(150_000),
            devices: Roster::default(),
            max_document_bytes: 64 * 1024 * 1024,
        }
    }

    /// The rate limit that applies to `device`.
    pub fn max_rate(&self, device: &DeviceId) -> RateKw {
        self.devices
            .get(device.as_str())
            .copied()
            .unwrap_or(self.default_max_rate)
    }
}

/// One error inside a document: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// E.g. `schedules[3].intervals[12].rate_kw`.
    pub path: String,
    /// E.g. `412 exceeds max_rate_kw 150`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A device's schedule that was refused, with every reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The device, when its id could be read.
    pub device_id: Option<DeviceId>,
    /// How to name the device in messages: its id, or its place in the document.
    pub label: String,
    /// Every error found.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", self.label, e)?;
        }
        Ok(())
    }
}

/// A device's accepted schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct NormalizedSchedule {
    /// The plan.
    pub schedule: Schedule,
    /// How many periods the document left out and were filled with `idle`.
    pub filled: u32,
    /// Whether it came from the `"*"` entry.
    pub from_wildcard: bool,
}

/// The result of normalizing a document that was not rejected whole.
#[derive(Clone, Debug)]
pub struct Normalized {
    /// The local date and its grid.
    pub day: Day,
    /// The provider's `generated_at`, when it gave a valid one.
    pub generated_at: Option<Timestamp>,
    /// The accepted schedules, in document order.
    pub schedules: Vec<NormalizedSchedule>,
    /// The refused ones, in document order.
    pub rejected: Vec<Rejection>,
}

#[derive(Deserialize)]
struct RawSchedule<'a> {
    #[serde(borrow, default)]
    device_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    intervals: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawInterval<'a> {
    #[serde(borrow, default)]
    period: Option<&'a RawValue>,
    #[serde(borrow, default)]
    start: Option<&'a RawValue>,
    #[serde(borrow, default)]
    end: Option<&'a RawValue>,
    #[serde(borrow, default)]
    mode: Option<&'a RawValue>,
    #[serde(borrow, default)]
    rate_kw: Option<&'a RawValue>,
}

/// One checked interval: periods `first..last` (0-based, end exclusive) at one setpoint.
struct Span<'a> {
    index: usize,
    first: u32,
    last: u32,
    setpoint: Setpoint,
    rate_text: &'a str,
}

/// The target of one entry of `schedules`.
enum Target {
    Device(DeviceId),
    Wildcard,
    Invalid(FieldError, String),
}

/// Parses and normalizes a provider document held whole: [`Survey`], then [`Normalizer`],
/// each over all of `input`.
///
/// `Err` rejects the document whole (not JSON, too large, date or zone missing or wrong);
/// otherwise each schedule is accepted or rejected on its own.
pub fn normalize(input: &[u8], fleet: &Fleet) -> Result<Normalized, ProtocolError> {
    let mut survey = Survey::new(fleet);
    survey.feed(input)?;
    let outline = survey.finish()?;
    let mut out = Normalized {
        day: outline.day.clone(),
        generated_at: outline.generated_at,
        schedules: Vec::new(),
        rejected: Vec::new(),
    };
    let mut normalizer = Normalizer::new(&outline, fleet);
    normalizer.feed(input, &mut |outcome| match outcome {
        Outcome::Accepted(s) => out.schedules.push(s),
        Outcome::Rejected(r) => out.rejected.push(r),
    })?;
    normalizer.finish()?;
    Ok(out)
}

/// The first pass over a document, fed its bytes as they arrive: it checks that the whole
/// document is JSON within the size limit, and learns its date and zone and whom each entry
/// is for. Nothing may be committed before it finishes: a device listed twice is refused in
/// both places, and a document broken at its last byte is refused whole.
#[derive(Debug)]
pub struct Survey {
    splitter: Splitter,
    max_bytes: usize,
    bytes: usize,
    schedule_date: Option<String>,
    timezone: Option<String>,
    generated_at: Option<String>,
    /// The raw `schedules` value when it is not an array.
    schedules_other: Option<String>,
    schedules_seen: bool,
    listed: Listed,
    fleet_timezone: TimeZone,
}

/// What a [`Survey`] learnt: enough to normalize each entry on its own in a second pass.
#[derive(Clone, Debug)]
pub struct Outline {
    /// The local date and its grid.
    pub day: Day,
    /// The provider's `generated_at`, when it gave a valid one.
    pub generated_at: Option<Timestamp>,
    /// How many entries `schedules` has.
    pub entries: usize,
    /// How often each device id (and `"*"`) is listed, as far as the second pass asks (see
    /// [`Listed::settle`]).
    listed: Listed,
}

/// How often each id is listed, counted by a 128-bit hash of the id under two keys drawn at
/// random for each document, not by the id itself: 24 bytes an id rather than about a hundred
/// (at 100,000 devices the survey's peak was 14.5 MB, and is now under 5 MB). Two ids are
/// taken for one only if both 64-bit halves collide, about once in 10^28 documents of
/// 100,000 ids, and a provider cannot aim at it without the keys.
#[derive(Clone, Debug)]
struct Listed {
    keys: [RandomState; 2],
    counts: HashMap<(u64, u64), u32>,
}

impl Listed {
    fn new() -> Listed {
        Listed {
            keys: [RandomState::new(), RandomState::new()],
            counts: HashMap::new(),
        }
    }

    fn key(&self, id: &str) -> (u64, u64) {
        (self.keys[0].hash_one(id), self.keys[1].hash_one(id))
    }

    fn add(&mut self, id: &str) {
        *self.counts.entry(self.key(id)).or_default() += 1;
    }

    fn count(&self, id: &str) -> u32 {
        self.counts.get(&self.key(id)).copied().unwrap_or(0)
    }

    /// Keeps only what the second pass asks of it. With a `"*"` entry it asks which registered
    /// devices are not listed, so every count stays. Without one (the usual document) it asks
    /// only which ids are listed more than once, so the rest are dropped before the pipeline
    /// starts: at 100,000 devices the map was 3.3 MB of an ingestion's peak.
    fn settle(mut self) -> Listed {
        if self.count("*") == 0 {
            self.counts.retain(|_, n| *n > 1);
            self.counts.shrink_to_fit();
        }
        self
    }
}

impl Survey {
    /// A survey against `fleet`'s zone and size limit.
    pub fn new(fleet: &Fleet) -> Survey {
        Survey {
            splitter: Splitter::new(),
            max_bytes: fleet.max_document_bytes,
            bytes: 0,
            schedule_date: None,
            timezone: None,
            generated_at: None,
            schedules_other: None,
            schedules_seen: false,
            listed: Listed::new(),
            fleet_timezone: fleet.timezone.clone(),
        }
    }

    /// Reads the next chunk of the document.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ProtocolError> {
        self.bytes = self.bytes.saturating_add(chunk.len());
        if self.bytes > self.max_bytes {
            return Err(ProtocolError::Document(format!(
                "{} bytes exceeds the limit of {} bytes",
                self.bytes, self.max_bytes
            )));
        }
        let Survey {
            splitter,
            schedule_date,
            timezone,
            generated_at,
            schedules_other,
            schedules_seen,
            listed,
            ..
        } = self;
        splitter.feed(chunk, &mut |piece| {
            match piece {
                Piece::Field { key, value } => {
                    let text = utf8(value, || key.to_owned())?;
                    json(text, || key.to_owned())?;
                    let slot = match key {
                        "schedule_date" => &mut *schedule_date,
                        "timezone" => &mut *timezone,
                        "generated_at" => &mut *generated_at,
                        "schedules" => &mut *schedules_other,
                        _ => return Ok(()),
                    };
                    if key == "schedules" {
                        if *schedules_seen {
                            return Err(duplicate_field(key));
                        }
                        *schedules_seen = true;
                    } else if slot.is_some() {
                        return Err(duplicate_field(key));
                    }
                    // As serde reads an optional field: `null` is absent.
                    *slot = (text != "null").then(|| text.to_owned());
                }
                Piece::Schedules => {
                    if *schedules_seen {
                        return Err(duplicate_field("schedules"));
                    }
                    *schedules_seen = true;
                }
                Piece::Entry { index, value } => {
                    let place = || format!("schedules[{index}]");
                    let text = utf8(value, place)?;
                    match read_entry(index, text).0 {
                        Target::Device(id) => listed.add(id.as_str()),
                        Target::Wildcard => listed.add("*"),
                        // Read whole, an entry is JSON; one that could not be read may
                        // have stopped at its first wrong type, so check the rest.
                        Target::Invalid(..) => json(text, place)?,
                    }
                }
            }
            Ok(())
        })
    }

    /// Checks the document's end and its date and zone.
    pub fn finish(self) -> Result<Outline, ProtocolError> {
        self.splitter.finish()?;
        let date_text = required_string(self.schedule_date.as_deref(), "schedule_date")?;
        let date: Date = date_text.parse().map_err(|_| {
            ProtocolError::Document(format!(
                "schedule_date: {date_text:?} is not a date (YYYY-MM-DD)"
            ))
        })?;
        let tz_text = required_string(self.timezone.as_deref(), "timezone")?;
        let tz = time_zone(&tz_text).map_err(|_| {
            ProtocolError::Document(format!("timezone: {tz_text:?} is not a known zone"))
        })?;
        if tz.iana_name() != self.fleet_timezone.iana_name() {
            return Err(ProtocolError::Document(format!(
                "timezone: {tz_text:?} is not the fleet's zone {}",
                self.fleet_timezone.iana_name().unwrap_or("UTC")
            )));
        }
        let day = Day::new(date, tz).map_err(|e| ProtocolError::Document(Chain(&e).to_string()))?;
        let generated_at = self
            .generated_at
            .as_deref()
            .and_then(|raw| serde_json::from_str::<String>(raw).ok())
            .and_then(|s| s.parse().ok());
        if let Some(other) = &self.schedules_other {
            return Err(ProtocolError::Document(format!(
                "schedules: expected an array, got {}",
                quote(other)
            )));
        }
        if !self.schedules_seen {
            return Err(ProtocolError::Document("schedules: missing".into()));
        }
        Ok(Outline {
            day,
            generated_at,
            entries: self.splitter.entries(),
            listed: self.listed.settle(),
        })
    }
}

impl Outline {
    /// How many schedules the document can yield at most: one per entry, and the `"*"`
    /// entry's for every registered device not listed.
    pub fn most_schedules(&self, fleet: &Fleet) -> usize {
        let wildcard = if self.listed.count("*") > 0 {
            fleet
                .devices
                .iter()
                .filter(|(id, _)| self.listed.count(id) == 0)
                .count()
        } else {
            0
        };
        self.entries + wildcard
    }
}

/// What normalization decided for one device (or one unreadable entry).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// An accepted schedule.
    Accepted(NormalizedSchedule),
    /// A refused one, with every reason.
    Rejected(Rejection),
}

/// The second pass over a surveyed document, fed the same bytes again: it normalizes each
/// entry as soon as it is read, in document order. `"*"` yields one outcome per registered
/// device the document does not list, where the `"*"` entry stands.
#[derive(Debug)]
pub struct Normalizer<'a> {
    outline: &'a Outline,
    fleet: &'a Fleet,
    splitter: Splitter,
}

impl<'a> Normalizer<'a> {
    /// A normalizer for the document `outline` describes.
    pub fn new(outline: &'a Outline, fleet: &'a Fleet) -> Normalizer<'a> {
        Normalizer {
            outline,
            fleet,
            splitter: Splitter::new(),
        }
    }

    /// Reads the next chunk, handing each outcome to `out` as its entry completes.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut dyn FnMut(Outcome),
    ) -> Result<(), ProtocolError> {
        let (outline, fleet) = (self.outline, self.fleet);
        self.splitter.feed(chunk, &mut |piece| {
            if let Piece::Entry { index, value } = piece {
                // The survey checked that it is JSON.
                let text = utf8(value, || format!("schedules[{index}]"))?;
                entry(outline, fleet, index, text, out);
            }
            Ok(())
        })
    }

    /// Checks that the document ended as it did when surveyed.
    pub fn finish(self) -> Result<(), ProtocolError> {
        self.splitter.finish()?;
        if self.splitter.entries() != self.outline.entries {
            return Err(ProtocolError::Document(format!(
                "schedules: {} entries, but {} when surveyed: the document changed",
                self.splitter.entries(),
                self.outline.entries
            )));
        }
        Ok(())
    }
}

/// Normalizes entry `i` of `schedules`.
fn entry(outline: &Outline, fleet: &Fleet, i: usize, text: &str, out: &mut dyn FnMut(Outcome)) {
    let day = &outline.day;
    let path = format!("schedules[{i}]");
    let (target, body) = read_entry(i, text);
    let (device_id, label) = match target {
        Target::Invalid(err, label) => {
            return out(Outcome::Rejected(Rejection {
                device_id: None,
                label,
                errors: vec![err],
            }));
        }
        Target::Device(id) => (Some(id.clone()), id.to_string()),
        Target::Wildcard => (None, "*".to_owned()),
    };
    let key = device_id.as_ref().map_or("*", |d| d.as_str());
    if outline.listed.count(key) > 1 {
        let message = format!("{key} is listed more than once");
        return out(Outcome::Rejected(Rejection {
            device_id,
            label,
            errors: vec![FieldError {
                path: format!("{path}.device_id"),
                message,
            }],
        }));
    }
    let body = body.expect("a device or wildcard target always comes with its body");
    let plan = read_plan(day, body.intervals, &path);
    match device_id {
        Some(id) => {
            let max = fleet.max_rate(&id);
            out(outcome(id, label, day, &plan, max, false));
        }
        None => {
            if let Err(errors) = &plan {
                // Name the wildcard itself once rather than once per device.
                return out(Outcome::Rejected(Rejection {
                    device_id: None,
                    label,
                    errors: errors.clone(),
                }));
            }
            for (id, &max) in fleet
                .devices
                .devices()
                .filter(|(id, _)| outline.listed.count(id.as_str()) == 0)
            {
                let label = id.to_string();
                out(outcome(id, label, day, &plan, max, true));
            }
        }
    }
}

/// A piece's text: the whole document is refused when it is not UTF-8.
fn utf8(value: &[u8], place: impl Fn() -> String) -> Result<&str, ProtocolError> {
    std::str::from_utf8(value).map_err(|e| not_json(&place(), e))
}

/// Checks that a piece is JSON: the whole document is refused when it is not.
fn json(text: &str, place: impl Fn() -> String) -> Result<(), ProtocolError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|e| not_json(&place(), e))
}

fn not_json(place: &str, why: impl fmt::Display) -> ProtocolError {
    ProtocolError::Document(format!("not a JSON object: {place}: {why}"))
}

fn duplicate_field(key: &str) -> ProtocolError {
    ProtocolError::Document(format!("not a JSON object: duplicate field `{key}`"))
}

/// A schedule entry's intervals, read into a full day of setpoints.
struct PlanOk<'a> {
    path: String,
    setpoints: Vec<Setpoint>,
    filled: u32,
    spans: Vec<Span<'a>>,
}

type Plan<'a> = Result<PlanOk<'a>, Vec<FieldError>>;

/// One device's outcome under `plan`, held to the device's own limit.
fn outcome(
    id: DeviceId,
    label: String,
    day: &Day,
    plan: &Plan,
    max: RateKw,
    from_wildcard: bool,
) -> Outcome {
    let plan = match plan {
        Ok(p) => p,
        Err(errors) => {
            return Outcome::Rejected(Rejection {
                device_id: Some(id),
                label,
                errors: errors.clone(),
            });
        }
    };
    let over: Vec<FieldError> = plan
        .spans
        .iter()
        .filter(|s| s.setpoint.rate() > max)
        .map(|s| FieldError {
            path: format!("{}.intervals[{}].rate_kw", plan.path, s.index),
            message: format!("{} exceeds max_rate_kw {max}", s.rate_text),
        })
        .collect();
    if !over.is_empty() {
        return Outcome::Rejected(Rejection {
            device_id: Some(id),
            label,
            errors: over,
        });
    }
    let schedule = Schedule::new(id, day.clone(), plan.setpoints.clone())
        .expect("read_plan yields exactly one setpoint per period");
    Outcome::Accepted(NormalizedSchedule {
        schedule,
        filled: plan.filled,
        from_wildcard,
    })
}

fn read_entry(i: usize, text: &str) -> (Target, Option<RawSchedule<'_>>) {
    let path = format!("schedules[{i}]");
    let body: RawSchedule = match serde_json::from_str(text) {
        Ok(b) => b,
        Err(_) => {
            let err = FieldError {
                path: path.clone(),
                message: format!("expected an object, got {}", quote(text)),
            };
            return (Target::Invalid(err, path), None);
        }
    };
    let Some(raw_id) = body.device_id else {
        let err = FieldError {
            path: format!("{path}.device_id"),
            message: "missing".into(),
        };
        return (Target::Invalid(err, path), None);
    };
    let Some(text) = string_value(raw_id) else {
        let err = FieldError {
            path: format!("{path}.device_id"),
            message: format!("expected a string, got {}", quote(raw_id.get())),
        };
        return (Target::Invalid(err, path), None);
    };
    if text == "*" {
        return (Target::Wildcard, Some(body));
    }
    match DeviceId::parse(&*text) {
        Ok(id) => (Target::Device(id), Some(body)),
        Err(e) => {
            let err = FieldError {
                path: format!("{path}.device_id"),
                message: e.to_string(),
            };
            let label: String = text.chars().take(64).collect();
            (Target::Invalid(err, label), None)
        }
    }
}

/// Reads one schedule's intervals into a full day of setpoints, filling gaps with idle.
fn read_plan<'a>(day: &Day, intervals: Option<&'a RawValue>, path: &str) -> Plan<'a> {
    let Some(raw) = intervals else {
        return Err(vec![FieldError {
            path: format!("{path}.intervals"),
            message: "missing".into(),
        }]);
    };
    // Most documents are well formed: every interval is read in one pass, and only when
    // that fails is the list read element by element, to name each one that is wrong.
    let list: Vec<Result<RawInterval, FieldError>> =
        match serde_json::from_str::<Vec<RawInterval>>(raw.get()) {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(_) => {
                let list: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| {
                    vec![FieldError {
                        path: format!("{path}.intervals"),
                        message: format!("expected an array, got {}", quote(raw.get())),
                    }]
                })?;
                list.into_iter()
                    .enumerate()
                    .map(|(j, raw)| {
                        serde_json::from_str(raw.get()).map_err(|e| FieldError {
                            path: format!("{path}.intervals[{j}]"),
                            message: if raw.get().starts_with('{') {
                                e.to_string()
                            } else {
                                format!("expected an object, got {}", quote(raw.get()))
                            },
                        })
                    })
                    .collect()
            }
        };

    let mut errors = Vec::new();
    let mut spans = Vec::with_capacity(list.len());
    for (j, interval) in list.into_iter().enumerate() {
        // Named only when something is wrong: most documents have none, and a day has 48
        // intervals for each of thousands of units.
        let here = || format!("{path}.intervals[{j}]");
        match interval
            .map_err(|e| vec![e])
            .and_then(|i| read_interval(day, i, here))
        {
            Ok(span) => spans.push(Span { index: j, ..span }),
            Err(mut e) => errors.append(&mut e),
        }
    }

    let n = day.period_count() as usize;
    let mut owner: Vec<Option<usize>> = vec![None; n];
    let mut setpoints = vec![Setpoint::IDLE; n];
    for span in &spans {
        for p in span.first..span.last {
            let slot = &mut owner[p as usize];
            if let Some(other) = *slot {
                errors.push(FieldError {
                    path: format!("{path}.intervals[{}]", span.index),
                    message: format!("period {} overlaps {path}.intervals[{other}]", p + 1),
                });
                break;
            }
            *slot = Some(span.index);
            setpoints[p as usize] = span.setpoint;
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(PlanOk {
        path: path.to_owned(),
        filled: owner.iter().filter(|o| o.is_none()).count() as u32,
        setpoints,
        spans,
    })
}

fn read_interval<'a>(
    day: &Day,
    interval: RawInterval<'a>,
    here: impl Fn() -> String,
) -> Result<Span<'a>, Vec<FieldError>> {
    let err = |field: &str, message: String| FieldError {
        path: if field.is_empty() {
            here()
        } else {
            format!("{}.{field}", here())
        },
        message,
    };

    let range = match (interval.period, interval.start) {
        (Some(_), Some(_)) => Err(err("", "give either period or start, not both".into())),
        (None, None) => Err(err("", "missing: give period or start".into())),
        (Some(p), None) => match interval.end {
            Some(_) => Err(err("end", "end goes with start, not with period".into())),
            None => read_period(day, p)
                .map(|p| (p - 1, p))
                .map_err(|m| err("period", m)),
        },
        (None, Some(s)) => read_range(day, s, interval.end).map_err(|(f, m)| err(f, m)),
    };
    let mode = match interval.mode {
        None => Err(err("mode", "missing".into())),
        Some(raw) => match string_value(raw).and_then(|s| Mode::parse_loose(&s)) {
            Some(m) => Ok(m),
            None => Err(err(
                "mode",
                format!("{} is not charge, discharge or idle", quote(raw.get())),
            )),
        },
    };
    let rate = match (interval.rate_kw, &mode) {
        (None, Ok(Mode::Idle)) => Ok((RateKw::ZERO, "0")),
        (None, _) => Err(err("rate_kw", "missing".into())),
        (Some(raw), _) => read_rate(raw.get())
            .map(|r| (r, raw.get()))
            .map_err(|m| err("rate_kw", m)),
    };
    match (range, mode, rate) {
        (Ok((first, last)), Ok(mode), Ok((rate, rate_text))) => match Setpoint::new(mode, rate) {
            Ok(setpoint) => Ok(Span {
                index: 0,
                first,
                last,
                setpoint,
                rate_text,
            }),
            Err(_) => Err(vec![err(
                "rate_kw",
                format!("idle takes rate_kw 0, got {rate_text}"),
            )]),
        },
        (range, mode, rate) => Err([range.err(), mode.err(), rate.err()]
            .into_iter()
            .flatten()
            .collect()),
    }
}

fn read_period(day: &Day, raw: &RawValue) -> Result<u32, String> {
    let text = raw.get();
    let n = day.period_count();
    if !looks_numeric(text) {
        return Err(format!("expected a whole number, got {}", quote(text)));
    }
    match text.parse::<i64>() {
        Ok(p) if (1..=i64::from(n)).contains(&p) => Ok(p as u32),
        Ok(p) => Err(format!("{p} is outside 1..={n} for {}", day.date())),
        Err(_) => match text.parse::<f64>() {
            Ok(f) if f.is_finite() && f.fract() != 0.0 => {
                Err(format!("{text} is not a whole number"))
            }
            // `3.0` or `3e0`: a whole number written as a float.
            Ok(f) if (1.0..=f64::from(n)).contains(&f) => Ok(f as u32),
            Ok(f) if f.is_finite() && f.abs() < 1e15 => {
                Err(format!("{text} is outside 1..={n} for {}", day.date()))
            }
            _ => Err(format!("{text} does not fit")),
        },
    }
}

fn read_range(
    day: &Day,
    start: &RawValue,
    end: Option<&RawValue>,
) -> Result<(u32, u32), (&'static str, String)> {
    let instant =
        |raw: &RawValue, field: &'static str| -> Result<Timestamp, (&'static str, String)> {
            string_value(raw)
                .and_then(|s| s.parse::<Timestamp>().ok())
                .ok_or_else(|| {
                    (
                        field,
                        format!("{} is not an RFC 3339 instant", quote(raw.get())),
                    )
                })
        };
    let s = instant(start, "start")?;
    let e = match end {
        Some(raw) => instant(raw, "end")?,
        None => s
            .checked_add(SignedDuration::from_secs(PERIOD_SECS))
            .map_err(|_| ("start", format!("{} is out of range", quote(start.get()))))?,
    };
    let boundary = |t: Timestamp, raw: &str, field: &'static str| {
        day.boundary(t).map_err(|why| {
            let msg = match why {
                OffGrid::Outside => format!(
                    "{} is outside {} ({} to {})",
                    quote(raw),
                    day.date(),
                    day.start(),
                    day.end()
                ),
                OffGrid::NotOnBoundary => format!(
                    "{} is not a period boundary (periods start every 30 minutes from local midnight)",
                    quote(raw)
                ),
            };
            (field, msg)
        })
    };
    let first = boundary(s, start.get(), "start")?;
    let end_text = end.map_or_else(|| format!("\"{e}\""), |r| r.get().to_owned());
    let last = boundary(e, &end_text, if end.is_some() { "end" } else { "start" })?;
    if first == day.period_count() {
        return Err((
            "start",
            format!("{} is outside {}", quote(start.get()), day.date()),
        ));
    }
    if last <= first {
        return Err(("end", format!("{} is not after start", quote(&end_text))));
    }
    Ok((first, last))
}

fn read_rate(text: &str) -> Result<RateKw, String> {
    if !looks_numeric(text) {
        return Err(format!("expected a number, got {}", quote(text)));
    }
    let kw: f64 = text
        .parse()
        .map_err(|_| format!("{text} is not a number"))?;
    if !kw.is_finite() {
        return Err(format!("{text} is not finite"));
    }
    RateKw::try_from(kw).map_err(|e| match e {
        ProtocolError::InvalidRate(m) => m.replacen(&kw.to_string(), text, 1),
        other => other.to_string(),
    })
}

fn looks_numeric(text: &str) -> bool {
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

fn required_string(raw: Option<&str>, field: &str) -> Result<String, ProtocolError> {
    let raw = raw.ok_or_else(|| ProtocolError::Document(format!("{field}: missing")))?;
    serde_json::from_str::<String>(raw).map_err(|_| {
        ProtocolError::Document(format!("{field}: expected a string, got {}", quote(raw)))
    })
}

/// A JSON string's text: borrowed from the document unless it has escapes. Every interval
/// has a mode and most a start and an end, so at 10,000 units these are hundreds of thousands
/// of strings, each once an allocation of its own.
fn string_value(raw: &RawValue) -> Option<Cow<'_, str>> {
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(text) => Some(Cow::Borrowed(text)),
        Err(_) => serde_json::from_str::<String>(raw.get())
            .ok()
            .map(Cow::Owned),
    }
}

/// Raw JSON text for an error message, cut short so a hostile document can't flood the log.
fn quote(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
#[path = "document_tests.rs"]
mod tests;
