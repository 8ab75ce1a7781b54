//! Splits a provider document into its top-level fields and the entries of its `schedules`
//! array as its bytes arrive, in chunks of any size, so that a fleet's document is read one
//! device at a time and never held whole.
//!
//! The splitter checks the structure it walks (the outer object, its keys, the array) and
//! finds where each value ends by counting brackets outside strings. It does not check what
//! is inside a value: every piece it hands out is parsed by `serde_json`, and a piece that is
//! not JSON makes the document not JSON. A document is valid JSON exactly when the splitter
//! accepts it and every piece parses: a bracket counted wrongly leaves a piece whose brackets
//! do not match, which does not parse.

use crate::ProtocolError;

/// A piece of the document, handed out as soon as it is complete.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// A top-level member other than an array under `schedules`: its key (decoded) and its
    /// raw value.
    Field { key: &'a str, value: &'a [u8] },
    /// The top-level `schedules` array begins: its entries follow.
    Schedules,
    /// One element of the top-level `schedules` array: its index and raw text.
    Entry { index: usize, value: &'a [u8] },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the outer `{` (a byte order mark and whitespace may come first).
    Start,
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in the outer object: a key.
    NextKey,
    /// Inside a key's quotes.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `:`: the start of a value.
    Value,
    /// Inside a value, capturing it.
    InValue,
    /// After a member: `,` or `}`.
    AfterMember,
    /// After `[` of `schedules`: an element or `]`.
    FirstEntry,
    /// After `,` in `schedules`: an element.
    NextEntry,
    /// After an element: `,` or `]`.
    AfterEntry,
    /// After the outer `}`: only whitespace.
    End,
}

/// The splitter's state between chunks.
#[derive(Debug)]
pub(crate) struct Splitter {
    state: State,
    /// Bytes consumed so far, for error messages.
    offset: u64,
    /// The key being read, then the key of the member being captured (raw, with escapes).
    key: Vec<u8>,
    key_escaped: bool,
    /// The key of the member being read, decoded.
    name: String,
    /// The value being captured, when it began in an earlier chunk; empty while it lies in
    /// the current chunk, from `start`, and is handed out from there without a copy.
    value: Vec<u8>,
    /// Where the value being captured began in the current chunk.
    start: Option<usize>,
    /// Open brackets in the captured value.
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Whether the value being captured is an element of `schedules`.
    in_schedules: bool,
    entries: usize,
    /// How many bytes of a leading byte order mark have been seen.
    bom: usize,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Splitter {
    pub(crate) fn new() -> Splitter {
        Splitter {
            state: State::Start,
            offset: 0,
            key: Vec::new(),
            key_escaped: false,
            name: String::new(),
            value: Vec::new(),
            start: None,
            depth: 0,
            in_string: false,
            escaped: false,
            in_schedules: false,
            entries: 0,
            bom: 0,
        }
    }

    /// Entries handed out so far.
    pub(crate) fn entries(&self) -> usize {
        self.entries
    }

    /// Splits the next chunk, handing each complete piece to `out`; an error from `out`
    /// stops the split and is returned.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut dyn FnMut(Piece<'_>) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match self.state {
                State::InValue => {
                    // The bulk of a document: skip runs of plain bytes at once.
                    let run = self.plain_run(&chunk[i..]);
                    if run > 0 {
                        if self.start.is_none() {
                            self.value.extend_from_slice(&chunk[i..i + run]);
                        }
                        i += run;
                        self.offset += run as u64;
                        continue;
                    }
                    if !self.value_byte(chunk, i, out)? {
                        // The byte ended a bare scalar: it belongs to what follows.
                        continue;
                    }
                }
                State::Key => {
                    if self.key_escaped {
                        self.key_escaped = false;
                    } else if b == b'\\' {
                        self.key_escaped = true;
                    } else if b == b'"' {
                        self.state = State::Colon;
                    }
                    self.key.push(b);
                    if self.state == State::Colon {
                        self.name = serde_json::from_slice(&self.key).map_err(|e| {
                            ProtocolError::Document(format!(
                                "not a JSON object: the key before byte {}: {e}",
                                self.offset
                            ))
                        })?;
                    }
                }
                State::Start => {
                    if self.offset == self.bom as u64 && self.bom < BOM.len() && b == BOM[self.bom]
                    {
                        self.bom += 1;
                    } else if self.bom != 0 && self.bom != BOM.len() {
                        // Half a byte order mark is not one.
                        return Err(self.not_an_object());
                    } else if b == b'{' {
                        self.state = State::FirstKey;
                    } else if !is_space(b) {
                        return Err(self.not_an_object());
                    }
                }
                State::FirstKey | State::NextKey => match b {
                    b'"' => {
                        self.key.clear();
                        self.key.push(b);
                        self.state = State::Key;
                    }
                    b'}' if self.state == State::FirstKey => self.state = State::End,
                    _ if is_space(b) => {}
                    _ => return Err(self.unexpected(b, "a key in quotes")),
                },
                State::Colon => match b {
                    b':' => self.state = State::Value,
                    _ if is_space(b) => {}
                    _ => return Err(self.unexpected(b, "':' after a key")),
                },
                State::Value => {
                    if b == b'[' && self.name == "schedules" {
                        self.state = State::FirstEntry;
                        out(Piece::Schedules)?;
                    } else if !is_space(b) {
                        self.in_schedules = false;
                        self.begin_value(b, i)?;
                    }
                }
                State::AfterMember => match b {
                    b',' => self.state = State::NextKey,
                    b'}' => self.state = State::End,
                    _ if is_space(b) => {}
                    _ => return Err(self.unexpected(b, "',' or '}' after a member")),
                },
                State::FirstEntry | State::NextEntry => match b {
                    b']' if self.state == State::FirstEntry => self.state = State::AfterMember,
                    _ if is_space(b) => {}
                    _ => {
                        self.in_schedules = true;
                        self.begin_value(b, i)?;
                    }
                },
                State::AfterEntry => match b {
                    b',' => self.state = State::NextEntry,
                    b']' => self.state = State::AfterMember,
                    _ if is_space(b) => {}
                    _ => return Err(self.unexpected(b, "',' or ']' after a schedule")),
                },
                State::End => {
                    if !is_space(b) {
                        return Err(self.unexpected(b, "nothing after the document's '}'"));
                    }
                }
            }
            self.offset += 1;
            i += 1;
        }
        // A value that goes on into the next chunk is kept.
        if let Some(start) = self.start.take() {
            self.value.extend_from_slice(&chunk[start..]);
        }
        Ok(())
    }

    /// Checks that the document ended where it may.
    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        match self.state {
            State::End => Ok(()),
            State::Start => Err(self.not_an_object()),
            _ => Err(ProtocolError::Document(format!(
                "not a JSON object: it ends early, at byte {}",
                self.offset
            ))),
        }
    }

    /// How many bytes from the start of `rest` can be copied into the value without a look:
    /// inside a string, anything but a quote or a backslash; outside one, anything but a
    /// bracket, a quote, a comma or whitespace.
    fn plain_run(&self, rest: &[u8]) -> usize {
        if self.escaped {
            return 0;
        }
        let stops = if self.in_string {
            &STRING_STOPS
        } else if self.depth > 0 {
            &NESTED_STOPS
        } else {
            return 0;
        };
        rest.iter()
            .position(|&b| stops[usize::from(b)])
            .unwrap_or(rest.len())
    }

    /// Begins capturing a value with `b`, at `at` in the current chunk.
    fn begin_value(&mut self, b: u8, at: usize) -> Result<(), ProtocolError> {
        if matches!(b, b'}' | b']' | b',' | b':') {
            return Err(self.unexpected(b, "a value"));
        }
        self.value.clear();
        self.start = Some(at);
        self.depth = u32::from(b == b'{' || b == b'[');
        self.in_string = b == b'"';
        self.escaped = false;
        self.state = State::InValue;
        Ok(())
    }

    /// Takes byte `at` of `chunk`, in a captured value; `false` when the byte is not part of
    /// it (it ends a bare number, `true`, `false` or `null`) and must be read again in the new
    /// state.
    fn value_byte(
        &mut self,
        chunk: &[u8],
        at: usize,
        out: &mut dyn FnMut(Piece<'_>) -> Result<(), ProtocolError>,
    ) -> Result<bool, ProtocolError> {
        let b = chunk[at];
        if self.in_string {
            self.keep(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.complete(chunk, at + 1, out)?;
                }
            }
            return Ok(true);
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.keep(b);
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.keep(b);
            }
            b'}' | b']' | b',' if self.depth == 0 => {
                self.complete(chunk, at, out)?;
                return Ok(false);
            }
            b'}' | b']' => {
                self.depth -= 1;
                self.keep(b);
                if self.depth == 0 {
                    self.complete(chunk, at + 1, out)?;
                }
            }
            _ if is_space(b) && self.depth == 0 => {
                self.complete(chunk, at, out)?;
            }
            _ => self.keep(b),
        }
        Ok(true)
    }

    /// Keeps a byte of a value begun in an earlier chunk (one in this chunk is sliced out).
    fn keep(&mut self, b: u8) {
        if self.start.is_none() {
            self.value.push(b);
        }
    }

    /// Hands out the captured value, which ends before `end` in `chunk`.
    fn complete(
        &mut self,
        chunk: &[u8],
        end: usize,
        out: &mut dyn FnMut(Piece<'_>) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let value = match self.start.take() {
            Some(start) => &chunk[start..end],
            None => &self.value[..],
        };
        if self.in_schedules {
            let index = self.entries;
            self.entries += 1;
            self.state = State::AfterEntry;
            out(Piece::Entry { index, value })
        } else {
            self.state = State::AfterMember;
            out(Piece::Field {
                key: &self.name,
                value,
            })
        }
    }

    fn not_an_object(&self) -> ProtocolError {
        ProtocolError::Document("not a JSON object: the document must start with '{'".into())
    }

    fn unexpected(&self, b: u8, wanted: &str) -> ProtocolError {
        let got = if b.is_ascii_graphic() {
            format!("'{}'", b as char)
        } else {
            format!("byte 0x{b:02x}")
        };
        ProtocolError::Document(format!(
            "not a JSON object: {got} at byte {}, where {wanted} was expected",
            self.offset
        ))
    }
}

/// The bytes a run of a value stops at: inside a string, a quote or a backslash; outside one
/// (within brackets), a quote or a bracket. A table, because the scan is most of the split.
const STRING_STOPS: [bool; 256] = stops(b"\"\\");
const NESTED_STOPS: [bool; 256] = stops(b"\"{}[]");

const fn stops(bytes: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        table[bytes[i] as usize] = true;
        i += 1;
    }
    table
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece of `input` fed in chunks of `size`, as owned text.
    fn split(input: &[u8], size: usize) -> Result<Vec<String>, ProtocolError> {
        let mut s = Splitter::new();
        let mut pieces = Vec::new();
        for chunk in input.chunks(size.max(1)) {
            s.feed(chunk, &mut |p| {
                pieces.push(match p {
                    Piece::Field { key, value } => {
                        format!("{key}={}", String::from_utf8_lossy(value))
                    }
                    Piece::Entry { index, value } => {
                        format!("[{index}]{}", String::from_utf8_lossy(value))
                    }
                    Piece::Schedules => "schedules=[".to_owned(),
                });
                Ok(())
            })?;
        }
        s.finish()?;
        Ok(pieces)
    }

    #[test]
    fn hands_out_fields_and_each_schedule_whatever_the_chunk_size() {
        let doc = "\u{feff} {\"a\":1, \"sch\\\"x\": \"}]\" ,\"sch\\u0065dules\" : [ {\"d\":\"[\\\"\"} ,5,\n[1,{}] ],\"z\":null,\"t\":true}  ";
        let want = vec![
            "a=1",
            "sch\"x=\"}]\"",
            "schedules=[",
            "[0]{\"d\":\"[\\\"\"}",
            "[1]5",
            "[2][1,{}]",
            "z=null",
            "t=true",
        ];
        for size in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                split(doc.as_bytes(), size).unwrap(),
                want,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn an_empty_object_or_array_has_no_entries() {
        assert_eq!(split(b"{}", 1).unwrap(), Vec::<String>::new());
        assert_eq!(
            split(br#"{"schedules":[]}"#, 1).unwrap(),
            vec!["schedules=["]
        );
        assert_eq!(
            split(br#"{"schedules":{}}"#, 1).unwrap(),
            vec!["schedules={}"]
        );
    }

    #[test]
    fn names_the_byte_where_the_structure_breaks() {
        let err = |input: &[u8]| split(input, 3).unwrap_err().to_string();
        assert!(err(b"[1]").contains("must start with '{'"));
        assert!(err(b"").contains("must start with '{'"));
        assert_eq!(
            err(br#"{"a" 1}"#),
            "document rejected: not a JSON object: '1' at byte 5, where ':' after a key was expected"
        );
        assert!(err(br#"{"a":1 "b":2}"#).contains("',' or '}' after a member"));
        assert!(err(br#"{"schedules":[1 2]}"#).contains("',' or ']' after a schedule"));
        assert!(err(br#"{"a":1}x"#).contains("nothing after the document's '}'"));
        assert!(err(br#"{"a":1,}"#).contains("a key in quotes"));
        assert!(err(br#"{"schedules":[1,]}"#).contains("a value"));
        assert_eq!(
            err(br#"{"schedules":[{"a":1}"#),
            "document rejected: not a JSON object: it ends early, at byte 21"
        );
    }
}
