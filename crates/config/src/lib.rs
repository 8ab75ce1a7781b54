//! Settings for the cloud service and the edge agent, layered one way for both (DESIGN §8):
//! the embedded default TOML, then a config file (`--config FILE`), then `MAX300_*`
//! environment variables, then command-line flags; each layer wins over the ones before it,
//! key by key, and tables merge rather than replace.
//!
//! [figment] does the merging and remembers which layer gave each value, so an error names
//! where the bad value came from: the key in a TOML layer (`config file: sim.capacity_kwh`),
//! the variable in the environment (`MAX300_SAFETY_SETTLE_S`), the flag on the command line
//! (`--data-dir`).
//!
//! Each role's settings struct is the one list of its keys: with `deny_unknown_fields`, a key
//! it does not know is an error that names it. The environment is read through that same
//! struct: its fields and nested tables are found by asking its `Deserialize` impl
//! ([`Schema`]), so `MAX300_SAFETY_SETTLE_S` is `safety.settle_s` although both the table and
//! the field have underscores in their names (splitting on `_` would give `safety.settle.s`).
//!
//! Loading is a pure function of its inputs ([`Sources`]): the caller reads the file and the
//! environment, so tests pass a map and never set process variables.
//!
//! ## Layout
//! - [`Sources`]: the four layers as plain values; [`load`] turns them into a role's struct.
//! - [`Schema`]: a struct's keys and tables, read from its `Deserialize` impl.
//! - [`ConfigError`]: what went wrong, and where.

use std::cell::Cell;
use std::fmt;

use figment::error::Kind;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

/// The prefix of every environment variable that sets a key.
pub const ENV_PREFIX: &str = "MAX300_";

/// The inputs of one role's settings, weakest first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sources<'a> {
    /// The embedded default TOML (`max300 config print-default`).
    pub default: &'a str,
    /// The text of the config file, when one is given.
    pub file: Option<&'a str>,
    /// The environment as `(name, value)` pairs. Only `MAX300_<KEY>` names are read, and
    /// only those of the role's own keys and tables: the others belong to the other role or
    /// to the command line (`MAX300_API_TOKEN` is the cloud's; `MAX300_LOG_FORMAT` the CLI's).
    pub env: &'a [(String, String)],
    /// Command-line flags as `(key, value)` pairs, the strongest layer; a key is the
    /// setting's name (`data_dir`), shown to the user as the flag (`--data-dir`).
    pub flags: &'a [(&'a str, String)],
}

/// A setting that could not be loaded. Each message names the layer and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A TOML layer is not valid TOML.
    #[error("{layer}")]
    Syntax {
        /// `embedded default` or `config file`.
        layer: &'static str,
        /// The parser's error.
        #[source]
        source: TomlSyntax,
    },
    /// A required key is set in no layer.
    #[error("{key}: missing")]
    Missing {
        /// The key, dotted (`sim.capacity_kwh`).
        key: String,
    },
    /// A key no field has, or a value of the wrong type or form.
    #[error("{at}: {message}")]
    Invalid {
        /// Where: `config file: sim.capacity_kwh`, `MAX300_SIM_CAPACITY_KWH` or `--data-dir`.
        at: String,
        /// What is wrong, e.g. ``unknown field `colour`, expected one of …``.
        message: String,
    },
}

/// Layers `sources` and reads them into `T`.
///
/// A value from the environment or a flag is text, read as `T` asks for it: a number where
/// `T` has a number, `true` or `false` where it has a boolean, and a string where it has a
/// string, so `MAX300_DEVICE_ID=0001` keeps its zeros and `0.85` is the nearest `f64`. A
/// TOML layer's values keep their TOML types.
pub fn load<T: DeserializeOwned>(sources: &Sources<'_>) -> Result<T, ConfigError> {
    let schema = Schema::of::<T>();
    let figment = Figment::new()
        .merge(Layer::toml(Origin::Default, sources.default)?)
        .merge(Layer::toml(Origin::File, sources.file.unwrap_or(""))?)
        .merge(Layer::env(&schema, sources.env))
        .merge(Layer::flags(sources.flags));
    let merged = figment.find_value("").map_err(describe)?;
    T::deserialize(Typed {
        value: &merged,
        figment: &figment,
    })
    .map_err(describe)
}

/// Which layer a value came from; it says how a key is shown in an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Default,
    File,
    Env,
    Flag,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Default => "embedded default",
            Origin::File => "config file",
            Origin::Env => "environment",
            Origin::Flag => "command line",
        }
    }

    /// How the user wrote `path` in this layer.
    fn locate(self, path: &[&str]) -> String {
        match self {
            Origin::Default | Origin::File => format!("{}: {}", self.name(), path.join(".")),
            Origin::Env => format!("{ENV_PREFIX}{}", path.join("_").to_ascii_uppercase()),
            Origin::Flag => format!("--{}", path.join(".").replace('_', "-")),
        }
    }
}

/// One layer as figment sees it: its values, and where they came from.
struct Layer {
    origin: Origin,
    dict: Dict,
}

impl Layer {
    fn toml(origin: Origin, text: &str) -> Result<Layer, ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    layer: origin.name(),
                    source: TomlSyntax(Box::new(e)),
                })?;
        // A TOML table always serializes to a dict; an empty one stands in otherwise.
        let dict = match Value::serialize(&table) {
            Ok(Value::Dict(_, dict)) => dict,
            _ => Dict::new(),
        };
        Ok(Layer { origin, dict })
    }

    /// `MAX300_<KEY>` for each of the schema's keys, `MAX300_<TABLE>_<KEY>` inside its tables.
    /// A name under one of the tables that is no key there is kept, so that the struct's
    /// `deny_unknown_fields` names the variable.
    fn env(schema: &Schema, env: &[(String, String)]) -> Layer {
        let mut dict = Dict::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if let Some(path) = schema.env_path(&rest.to_ascii_lowercase()) {
                insert(&mut dict, &path, value);
            }
        }
        Layer {
            origin: Origin::Env,
            dict,
        }
    }

    fn flags(flags: &[(&str, String)]) -> Layer {
        let mut dict = Dict::new();
        for (key, value) in flags {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            insert(&mut dict, &path, value);
        }
        Layer {
            origin: Origin::Flag,
            dict,
        }
    }
}

fn insert(dict: &mut Dict, path: &[String], value: &str) {
    match path {
        [] => {}
        [key] => {
            dict.insert(key.clone(), Value::from(value.to_owned()));
        }
        [key, rest @ ..] => {
            let entry = dict
                .entry(key.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let origin = self.origin;
        Metadata::named(origin.name())
            .interpolater(move |_: &Profile, path: &[&str]| origin.locate(path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// A deserializer over figment's merged value that reads the text of the environment and of
/// flags as the type asked for, and fills in where each error came from.
///
/// figment's own `extract_lossy` guesses the number first (`"0.85"` becomes the `f32`
/// 0.8500000238…, then widened); here the target type parses the text itself.
struct Typed<'a> {
    value: &'a Value,
    figment: &'a Figment,
}

impl<'a> Typed<'a> {
    fn at(&self, value: &'a Value) -> Typed<'a> {
        Typed {
            value,
            figment: self.figment,
        }
    }

    /// The text of a value set in the environment or by a flag.
    fn text(&self) -> Option<&'a str> {
        let Value::String(tag, text) = self.value else {
            return None;
        };
        let name = &self.figment.get_metadata(*tag)?.name;
        (name == Origin::Env.name() || name == Origin::Flag.name()).then_some(text.as_str())
    }

    /// Names the layer of the innermost value an error is about, once.
    fn located(&self, mut error: figment::Error) -> figment::Error {
        if error.metadata.is_none() {
            error.metadata = self.figment.get_metadata(self.value.tag()).cloned();
            error.profile = Some(Profile::Default);
        }
        error
    }
}

macro_rules! parse_text {
    ($($method:ident => $parse:ty, $visit:ident;)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, figment::Error> {
                match self.text() {
                    Some(text) => match text.trim().parse::<$parse>() {
                        Ok(n) => visitor.$visit(n),
                        Err(_) => Err(self.located(de::Error::invalid_type(
                            de::Unexpected::Str(text),
                            &visitor,
                        ))),
                    },
                    None => self.deserialize_any(visitor),
                }
            }
        )*
    };
}

impl<'de, 'a> de::Deserializer<'de> for Typed<'a> {
    type Error = figment::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, figment::Error> {
        let result = match self.value {
            Value::Dict(_, dict) => visitor.visit_map(TypedMap {
                parent: self.at(self.value),
                entries: dict.iter(),
                pending: None,
            }),
            Value::Array(_, items) => visitor.visit_seq(TypedSeq {
                parent: self.at(self.value),
                items: items.iter().enumerate(),
            }),
            value => value.deserialize_any(visitor),
        };
        result.map_err(|e| self.located(e))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, figment::Error> {
        match self.text() {
            Some("true") => visitor.visit_bool(true),
            Some("false") => visitor.visit_bool(false),
            Some(text) => {
                Err(self.located(de::Error::invalid_type(de::Unexpected::Str(text), &visitor)))
            }
            None => self.deserialize_any(visitor),
        }
    }

    parse_text! {
        deserialize_u8 => u64, visit_u64;
        deserialize_u16 => u64, visit_u64;
        deserialize_u32 => u64, visit_u64;
        deserialize_u64 => u64, visit_u64;
        deserialize_u128 => u128, visit_u128;
        deserialize_i8 => i64, visit_i64;
        deserialize_i16 => i64, visit_i64;
        deserialize_i32 => i64, visit_i64;
        deserialize_i64 => i64, visit_i64;
        deserialize_i128 => i128, visit_i128;
        deserialize_f32 => f32, visit_f32;
        deserialize_f64 => f64, visit_f64;
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, figment::Error> {
        match self.value {
            Value::Empty(..) => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, figment::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, figment::Error> {
        self.value
            .deserialize_enum(name, variants, visitor)
            .map_err(|e| self.located(e))
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

/// A table's entries, each read with [`Typed`]; an error is prefixed with its key.
struct TypedMap<'a> {
    parent: Typed<'a>,
    entries: std::collections::btree_map::Iter<'a, String, Value>,
    pending: Option<(&'a String, &'a Value)>,
}

impl<'de, 'a> MapAccess<'de> for TypedMap<'a> {
    type Error = figment::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, figment::Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.pending = Some((key, value));
        // An unknown key is reported where its value was set.
        seed.deserialize(key.as_str().into_deserializer())
            .map(Some)
            .map_err(|mut e: figment::Error| {
                e.path.insert(0, key.clone());
                self.parent.at(value).located(e)
            })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, figment::Error> {
        let Some((key, value)) = self.pending.take() else {
            return Err(de::Error::custom("a value without its key"));
        };
        // A type that checks its value after reading it (`DeviceId` from a string) makes its
        // error outside `Typed`: it is located here.
        seed.deserialize(self.parent.at(value))
            .map_err(|mut e: figment::Error| {
                e.path.insert(0, key.clone());
                self.parent.at(value).located(e)
            })
    }
}

/// An array's items, each read with [`Typed`].
struct TypedSeq<'a> {
    parent: Typed<'a>,
    items: std::iter::Enumerate<std::slice::Iter<'a, Value>>,
}

impl<'de, 'a> de::SeqAccess<'de> for TypedSeq<'a> {
    type Error = figment::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, figment::Error> {
        let Some((i, item)) = self.items.next() else {
            return Ok(None);
        };
        seed.deserialize(self.parent.at(item))
            .map(Some)
            .map_err(|mut e: figment::Error| {
                e.path.insert(0, i.to_string());
                self.parent.at(item).located(e)
            })
    }
}

/// figment's error, in our words: where (as the user wrote it), then what.
fn describe(error: figment::Error) -> ConfigError {
    let path: Vec<&str> = error.path.iter().map(String::as_str).collect();
    if let Kind::MissingField(field) = &error.kind {
        let mut key = path.clone();
        key.push(field);
        return ConfigError::Missing { key: key.join(".") };
    }
    let at = match (&error.metadata, &error.profile) {
        (Some(md), Some(profile)) if !path.is_empty() => md.interpolate(profile, &path),
        (Some(md), _) => md.name.to_string(),
        (None, _) => path.join("."),
    };
    let message = match &error.kind {
        // serde's own wording, as the TOML parser printed it before.
        Kind::UnknownField(field, expected) => {
            format!("unknown field `{field}`, expected {}", one_of(expected))
        }
        kind => kind.to_string(),
    };
    ConfigError::Invalid { at, message }
}

fn one_of(names: &[&str]) -> String {
    match names {
        [] => "no fields".to_owned(),
        [one] => format!("`{one}`"),
        names => {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            format!("one of {}", quoted.join(", "))
        }
    }
}

/// A TOML parser's error, written on one line: the parser's own message spans lines with a
/// source excerpt, and a config error is one line. Its own `source` is none, as the parser's
/// message would only say the same again; the error itself is [`TomlSyntax::parse_error`].
#[derive(Debug)]
pub struct TomlSyntax(Box<toml::de::Error>);

impl TomlSyntax {
    /// The parser's error, with its span.
    pub fn parse_error(&self) -> &toml::de::Error {
        &self.0
    }
}

impl std::fmt::Display for TomlSyntax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.to_string();
        f.write_str(&text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

impl std::error::Error for TomlSyntax {}

/// The keys of a settings struct, and the schema of each key that is itself a table.
///
/// Read from the struct's `Deserialize` impl, which serde derives from the fields: the
/// struct stays the one list of its keys.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schema {
    /// Each key, with its own schema when it is a table (a struct, or an optional one).
    pub keys: Vec<(&'static str, Option<Schema>)>,
}

impl Schema {
    /// The schema of `T`; empty when `T` is not a struct.
    pub fn of<T: DeserializeOwned>() -> Schema {
        Schema::at::<T>(&mut Vec::new())
    }

    fn at<T: DeserializeOwned>(path: &mut Vec<&'static str>) -> Schema {
        let fields = fields_at::<T>(path).unwrap_or_default();
        let keys = fields
            .iter()
            .map(|&key| {
                path.push(key);
                let table = fields_at::<T>(path).map(|_| Schema::at::<T>(path));
                path.pop();
                (key, table)
            })
            .collect();
        Schema { keys }
    }

    /// The key path of an environment name (lowercased, prefix removed), or `None` when it
    /// is none of ours. A key wins over a table of the same prefix; inside a table, a name
    /// that is no key there is still ours, kept whole as the unknown key.
    pub fn env_path(&self, name: &str) -> Option<Vec<String>> {
        if let Some((key, _)) = self.keys.iter().find(|(key, _)| *key == name) {
            return Some(vec![(*key).to_owned()]);
        }
        self.keys.iter().find_map(|(key, table)| {
            let table = table.as_ref()?;
            let rest = name.strip_prefix(key)?.strip_prefix('_')?;
            let mut path = vec![(*key).to_owned()];
            match table.env_path(rest) {
                Some(inner) => path.extend(inner),
                None => path.push(rest.to_owned()),
            }
            Some(path)
        })
    }
}

/// The field names of the struct at `path` inside `T`, if it is a struct.
fn fields_at<T: DeserializeOwned>(path: &[&'static str]) -> Option<&'static [&'static str]> {
    let found = Cell::new(None);
    // The probe always fails once it has seen (or missed) the struct: nothing is built.
    let _ = T::deserialize(Probe {
        path,
        found: &found,
    });
    found.get()
}

/// A deserializer that walks `path` through nested structs and records the field names of
/// the struct at its end, then stops with an error.
struct Probe<'p> {
    path: &'p [&'static str],
    found: &'p Cell<Option<&'static [&'static str]>>,
}

/// The probe's only outcome: it never produces a value.
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("schema probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => {
                self.found.set(Some(fields));
                Err(Stop)
            }
            Some((key, rest)) => visitor.visit_map(OneKey {
                key: Some(key),
                value: Probe {
                    path: rest,
                    found: self.found,
                },
            }),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// A map of one key whose value is the probe, one level down.
struct OneKey<'p> {
    key: Option<&'static str>,
    value: Probe<'p>,
}

impl<'de, 'p> MapAccess<'de> for OneKey<'p> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(Probe {
            path: self.value.path,
            found: self.value.found,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Role {
        name: String,
        rate_kw: f64,
        durable: bool,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        safety: Safety,
        #[serde(default)]
        extra: Option<Extra>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Safety {
        settle_s: f64,
        soc_min_pct: f64,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Extra {
        depth_m: u32,
    }

    const DEFAULT: &str = "name = \"unit\"\nrate_kw = 150.0\ndurable = true\n\
                           [safety]\nsettle_s = 5.0\nsoc_min_pct = 10.0\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_role(
        file: Option<&str>,
        pairs: &[(&str, &str)],
        flags: &[(&str, String)],
    ) -> Result<Role, ConfigError> {
        load(&Sources {
            default: DEFAULT,
            file,
            env: &env(pairs),
            flags,
        })
    }

    #[test]
    fn the_schema_is_read_from_the_struct() {
        let schema = Schema::of::<Role>();
        let keys: Vec<&str> = schema.keys.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            ["name", "rate_kw", "durable", "token", "safety", "extra"]
        );
        let table = |name: &str| {
            schema
                .keys
                .iter()
                .find(|(k, _)| *k == name)
                .and_then(|(_, t)| t.clone())
        };
        assert_eq!(table("name"), None);
        assert_eq!(table("token"), None);
        let safety = table("safety").unwrap();
        assert_eq!(
            safety.keys,
            [("settle_s", None), ("soc_min_pct", None)].to_vec()
        );
        // An optional table is a table too.
        assert_eq!(table("extra").unwrap().keys, [("depth_m", None)].to_vec());
    }

    #[test]
    fn each_layer_wins_over_the_one_before() {
        let file = "rate_kw = 100\n[safety]\nsettle_s = 2.0\n";
        let c = load_role(Some(file), &[], &[]).unwrap();
        assert_eq!((c.rate_kw, c.safety.settle_s), (100.0, 2.0));
        // Tables merge: the default's soc_min_pct stays.
        assert_eq!(c.safety.soc_min_pct, 10.0);
        let c = load_role(Some(file), &[("MAX300_RATE_KW", "80")], &[]).unwrap();
        assert_eq!(c.rate_kw, 80.0);
        let c = load_role(
            Some(file),
            &[("MAX300_RATE_KW", "80")],
            &[("rate_kw", "60".to_owned())],
        )
        .unwrap();
        assert_eq!(c.rate_kw, 60.0);
    }

    #[test]
    fn env_names_with_underscores_find_their_table_and_key() {
        let c = load_role(
            None,
            &[
                ("MAX300_SAFETY_SETTLE_S", "0.5"),
                ("MAX300_EXTRA_DEPTH_M", "7"),
                ("MAX300_DURABLE", "false"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.safety.settle_s, 0.5);
        assert_eq!(c.extra, Some(Extra { depth_m: 7 }));
        assert!(!c.durable);
    }

    #[test]
    fn env_strings_stay_strings_where_the_struct_wants_one() {
        let c = load_role(
            None,
            &[
                ("MAX300_NAME", "0001"),
                ("MAX300_TOKEN", "1234567890123456"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.name, "0001");
        assert_eq!(c.token.as_deref(), Some("1234567890123456"));
    }

    #[test]
    fn env_text_is_parsed_by_the_type_it_sets() {
        // figment's own guess would make this the f32 nearest 0.85.
        let c = load_role(None, &[("MAX300_SAFETY_SOC_MIN_PCT", "0.85")], &[]).unwrap();
        assert_eq!(c.safety.soc_min_pct, 0.85);
        let c = load_role(None, &[("MAX300_EXTRA_DEPTH_M", " 7 ")], &[]).unwrap();
        assert_eq!(c.extra, Some(Extra { depth_m: 7 }));
        let err = load_role(None, &[("MAX300_DURABLE", "yes")], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MAX300_DURABLE: invalid type: found string \"yes\", expected a boolean"
        );
        let err = load_role(None, &[("MAX300_EXTRA_DEPTH_M", "-1")], &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("MAX300_EXTRA_DEPTH_M: "),
            "{err}"
        );
    }

    /// A value checked after it is read, as `DeviceId` is.
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(try_from = "String")]
    struct Word(String);

    impl TryFrom<String> for Word {
        type Error = String;
        fn try_from(s: String) -> Result<Self, String> {
            if s.contains(' ') {
                Err(format!("{s:?} is not one word"))
            } else {
                Ok(Word(s))
            }
        }
    }

    #[test]
    fn a_checked_value_is_named_by_its_layer() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Named {
            #[allow(dead_code)]
            words: Vec<Word>,
            #[allow(dead_code)]
            word: Word,
        }
        let named = |file: &str, flags: &[(&str, String)]| {
            load::<Named>(&Sources {
                default: "word = \"a\"\nwords = [\"b\"]",
                file: Some(file),
                flags,
                ..Sources::default()
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(named("", &[]), Ok(()));
        assert_eq!(
            named("", &[("word", "a b".to_owned())]),
            Err("--word: \"a b\" is not one word".to_owned())
        );
        assert_eq!(
            named("words = [\"c\", \"d e\"]", &[]),
            Err("config file: words.1: \"d e\" is not one word".to_owned())
        );
    }

    #[test]
    fn a_toml_layer_keeps_its_types() {
        let err = load_role(Some("durable = \"false\""), &[], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file: durable: invalid type: found string \"false\", expected a boolean"
        );
    }

    #[test]
    fn other_variables_are_not_ours() {
        let c = load_role(
            None,
            &[("MAX300_API_TOKEN", "the cloud's"), ("PATH", "/bin")],
            &[],
        )
        .unwrap();
        assert_eq!(c.name, "unit");
    }

    #[test]
    fn an_unknown_key_is_named_as_the_user_wrote_it() {
        let err = load_role(Some("colour = \"red\""), &[], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file: colour: unknown field `colour`, expected one of `name`, `rate_kw`, \
             `durable`, `token`, `safety`, `extra`"
        );
        let err = load_role(Some("[safety]\nsettle = 1"), &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config file: safety.settle: unknown field `settle`"),
            "{err}"
        );
        let err = load_role(None, &[("MAX300_SAFETY_SETTLE", "1")], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MAX300_SAFETY_SETTLE: unknown field `settle`, expected one of `settle_s`, \
             `soc_min_pct`"
        );
        let err = load_role(None, &[], &[("colour", "red".to_owned())]).unwrap_err();
        assert!(
            err.to_string().starts_with("--colour: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_is_named_by_its_layer() {
        let err = load_role(None, &[("MAX300_RATE_KW", "lots")], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MAX300_RATE_KW: invalid type: found string \"lots\", expected f64"
        );
        let err = load_role(Some("[safety]\nsettle_s = \"soon\""), &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config file: safety.settle_s: "),
            "{err}"
        );
        let err = load_role(None, &[], &[("durable", "maybe".to_owned())]).unwrap_err();
        assert!(err.to_string().starts_with("--durable: "), "{err}");
    }

    #[test]
    fn a_file_that_is_not_toml_is_one_line_naming_the_file() {
        let err = load_role(Some("rate_kw = = 1"), &[], &[]).unwrap_err();
        let cause = std::error::Error::source(&err).expect("the parser's error is kept");
        assert!(
            cause.source().is_none(),
            "the parser's message is said once"
        );
        let text = format!("{err}: {cause}");
        assert!(text.starts_with("config file: TOML parse error"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn a_missing_key_is_named() {
        let err = load::<Role>(&Sources {
            default: "rate_kw = 1\ndurable = true",
            ..Sources::default()
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "name: missing");
    }
}
