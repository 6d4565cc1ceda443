//! A located YAML 1.2 node tree and a serde deserializer over it.
//!
//! Why not deserialize straight from text: validation must report *every* problem
//! at once, each at the `line:col` of the offending node, and semantic checks
//! (duplicate paths, unknown `requires`) need positions after the typed parse.
//! So a file is parsed once into a [`Node`] tree that keeps every position, and
//! typed values are deserialized from sub-trees (one resource at a time, so one
//! bad resource does not hide the next).
//!
//! Scalars follow the YAML 1.2 core schema: only `true`/`false` are booleans
//! (`off`, `yes` stay strings), and a field that asks for a string gets the
//! scalar's text exactly as written, so `mode: 0644` reads as `"0644"`.
//!
//! Invariant: pure. Text in, tree or located error out; no I/O.

use std::collections::HashMap;
use std::fmt;

use granit_parser::{Event, Parser, ScalarStyle};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, col: 1 };
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    Null,
    /// `plain` is false for quoted and block scalars (and `!!str`): those are
    /// always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub pos: Pos,
}

/// Upper bound on nodes after alias expansion, against alias bombs.
const MAX_NODES: usize = 1_000_000;
/// Upper bound on what aliases add, in all, counted as the bytes of the
/// nodes and of their text: an anchor reused a few times costs little, a
/// "billion laughs" stops here. The fuzzing campaign found the 1M-node
/// bound alone let a 324-byte file allocate 129 MiB, and a bound on nodes
/// alone let one with long scalars allocate 73 MiB.
const MAX_ALIAS_BYTES: usize = 8 << 20;

impl Node {
    /// The value of a mapping key, if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node and value node of a mapping entry.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        match &self.kind {
            NodeKind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn items(&self) -> &[Node] {
        match &self.kind {
            NodeKind::Seq(items) => items,
            _ => &[],
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }

    /// Position of a key's value, or of the key itself when the value is null,
    /// or `self.pos` when the key is absent.
    pub fn pos_of(&self, key: &str) -> Pos {
        match self.entry(key) {
            Some((k, v)) if v.is_null() => k.pos,
            Some((_, v)) => v.pos,
            None => self.pos,
        }
    }

    /// What the node is, for messages: `` `text` ``, `string "text"`, `a list`...
    pub fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Null => "null".into(),
            NodeKind::Scalar { text, plain: true } => format!("`{text}`"),
            NodeKind::Scalar { text, plain: false } => format!("string {text:?}"),
            NodeKind::Seq(_) => "a list".into(),
            NodeKind::Map(_) => "a mapping".into(),
        }
    }
}

/// A problem at a position in one file (the file is added by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocError {
    pub pos: Option<Pos>,
    pub msg: String,
}

impl LocError {
    pub fn new(pos: Pos, msg: impl Into<String>) -> Self {
        LocError {
            pos: Some(pos),
            msg: msg.into(),
        }
    }

    /// Attach a position if the error has none yet (the innermost wins).
    fn at(mut self, pos: Pos) -> Self {
        self.pos.get_or_insert(pos);
        self
    }
}

impl fmt::Display for LocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for LocError {}

impl de::Error for LocError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        LocError {
            pos: None,
            msg: msg.to_string(),
        }
    }
}

/// Parse one YAML document. `Ok(None)` for a stream with no document (empty or
/// comments only). A duplicate key is an error, like a syntax error: the first
/// one in the text is returned.
pub fn parse(text: &str) -> Result<Option<Node>, LocError> {
    let mut duplicates = Vec::new();
    let doc = parse_inner(text, &mut duplicates);
    match duplicates.into_iter().next() {
        Some(first) => Err(first),
        None => doc,
    }
}

/// Like [`parse`], but a duplicate key does not end the parse: each one is
/// returned beside the document (which keeps the first occurrence's value),
/// so that one file can show every duplicate and every other problem at
/// once. On a syntax error, the errors are the duplicates found before it,
/// then the syntax error.
pub fn parse_all(text: &str) -> Result<(Option<Node>, Vec<LocError>), Vec<LocError>> {
    let mut duplicates = Vec::new();
    match parse_inner(text, &mut duplicates) {
        Ok(doc) => Ok((doc, duplicates)),
        Err(e) => {
            duplicates.push(e);
            Err(duplicates)
        }
    }
}

fn parse_inner(text: &str, duplicates: &mut Vec<LocError>) -> Result<Option<Node>, LocError> {
    let mut builder = Builder {
        anchors: HashMap::new(),
        count: 0,
        aliased: 0,
    };
    let mut parser = Parser::new_from_str(text);
    let mut doc: Option<Node> = None;
    // Stack of open collections: (node under construction, pending key,
    // anchor, whether the pending key is a duplicate whose value is dropped,
    // and for a mapping the line of each key so far). The key index keeps
    // duplicate detection linear: a scan of the entries per key made an
    // 80k-key mapping take seconds.
    let mut stack: Vec<Open> = Vec::new();
    while let Some(ev) = parser.next_event() {
        let (event, span) = ev.map_err(|e| {
            let m = e.marker();
            LocError::new(
                Pos {
                    line: m.line().max(1) as u32,
                    col: m.col() as u32 + 1,
                },
                format!("invalid YAML: {}", e.info()),
            )
        })?;
        let pos = Pos {
            line: span.start.line().max(1) as u32,
            col: span.start.col() as u32 + 1,
        };
        let finished: Option<(Node, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => None,
            Event::DocumentStart(..) => {
                if doc.is_some() {
                    return Err(LocError::new(
                        pos,
                        "only one YAML document per file is allowed",
                    ));
                }
                None
            }
            Event::Alias(id) => {
                let anchored = builder
                    .anchors
                    .get(&id)
                    .ok_or_else(|| LocError::new(pos, "alias to an unknown anchor"))?;
                // Weighed before it is copied: the copy is what a bomb costs.
                let (added, bytes) = weigh(anchored);
                builder.count += added;
                builder.aliased += bytes;
                if builder.aliased > MAX_ALIAS_BYTES {
                    return Err(LocError::new(
                        pos,
                        format!(
                            "aliases expand to more than {} MiB; write the repeated part out, or repeat it less",
                            MAX_ALIAS_BYTES >> 20
                        ),
                    ));
                }
                if builder.count > MAX_NODES {
                    return Err(LocError::new(
                        pos,
                        "document too large after alias expansion",
                    ));
                }
                let node = anchored.clone();
                Some((Node { pos, ..node }, 0))
            }
            Event::Scalar(value, style, anchor, tag) => {
                let forced_str = match &tag {
                    None => false,
                    Some(t) if t.is_yaml_core_schema_tag("str") => true,
                    Some(t) => {
                        return Err(LocError::new(
                            pos,
                            format!("YAML tag `{}{}` is not supported", t.handle(), t.suffix()),
                        ));
                    }
                };
                builder.count += 1;
                let plain = style == ScalarStyle::Plain && !forced_str;
                let kind = if plain && matches!(&*value, "" | "~" | "null" | "Null" | "NULL") {
                    NodeKind::Null
                } else {
                    NodeKind::Scalar {
                        text: value.into_owned(),
                        plain,
                    }
                };
                Some((Node { kind, pos }, anchor))
            }
            Event::SequenceStart(_, anchor, tag) => {
                reject_collection_tag(tag.as_deref(), pos)?;
                builder.count += 1;
                stack.push(Open::new(NodeKind::Seq(Vec::new()), pos, anchor));
                None
            }
            Event::MappingStart(_, anchor, tag) => {
                reject_collection_tag(tag.as_deref(), pos)?;
                builder.count += 1;
                stack.push(Open::new(NodeKind::Map(Vec::new()), pos, anchor));
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let open = stack.pop().expect("parser balances collections");
                debug_assert!(open.pending.is_none());
                Some((open.node, open.anchor))
            }
            #[allow(unreachable_patterns)] // comment and anchor events are off by default
            _ => None,
        };
        if builder.count > MAX_NODES {
            return Err(LocError::new(pos, "document too large"));
        }
        let Some((node, anchor)) = finished else {
            continue;
        };
        if anchor != 0 {
            // A later anchor of the same id replaces the earlier one, as an
            // alias names the nearest anchor before it.
            builder.anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => doc = Some(node),
            Some(open) => match &mut open.node.kind {
                NodeKind::Seq(items) => items.push(node),
                NodeKind::Map(entries) => match open.pending.take() {
                    None => {
                        let NodeKind::Scalar { text, .. } = &node.kind else {
                            return Err(LocError::new(
                                node.pos,
                                "mapping keys must be plain strings",
                            ));
                        };
                        match open.keys.entry(text.clone()) {
                            std::collections::hash_map::Entry::Occupied(first) => {
                                duplicates.push(LocError::new(
                                    node.pos,
                                    format!(
                                        "duplicate key `{text}` (first at line {}): remove one",
                                        first.get()
                                    ),
                                ));
                                open.duplicate = true;
                            }
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(node.pos.line);
                            }
                        }
                        open.pending = Some(node);
                    }
                    Some(key) => {
                        if !std::mem::take(&mut open.duplicate) {
                            entries.push((key, node));
                        }
                    }
                },
                _ => unreachable!("only collections are pushed"),
            },
        }
    }
    Ok(doc)
}

struct Builder {
    /// Anchored nodes by anchor id.
    anchors: HashMap<usize, Node>,
    count: usize,
    /// The bytes aliases added ([`weigh`]).
    aliased: usize,
}

/// A collection being built.
struct Open {
    node: Node,
    /// A mapping's key whose value is still to come.
    pending: Option<Node>,
    anchor: usize,
    /// The pending key is a duplicate: its value is dropped.
    duplicate: bool,
    /// A mapping's keys so far, with the line of each.
    keys: HashMap<String, u32>,
}

impl Open {
    fn new(kind: NodeKind, pos: Pos, anchor: usize) -> Self {
        Open {
            node: Node { kind, pos },
            pending: None,
            anchor,
            duplicate: false,
            keys: HashMap::new(),
        }
    }
}

/// Nodes in `n`, and the bytes they hold (the nodes and their text).
fn weigh(n: &Node) -> (usize, usize) {
    let own = std::mem::size_of::<Node>();
    let add = |a: (usize, usize), w: (usize, usize)| (a.0 + w.0, a.1 + w.1);
    match &n.kind {
        NodeKind::Scalar { text, .. } => (1, own + text.len()),
        NodeKind::Seq(items) => items.iter().map(weigh).fold((1, own), add),
        NodeKind::Map(entries) => entries
            .iter()
            .fold((1, own), |a, (k, v)| add(add(a, weigh(k)), weigh(v))),
        NodeKind::Null => (1, own),
    }
}

fn reject_collection_tag(tag: Option<&granit_parser::Tag>, pos: Pos) -> Result<(), LocError> {
    match tag {
        None => Ok(()),
        Some(t) if t.is_yaml_core_schema_tag("map") || t.is_yaml_core_schema_tag("seq") => Ok(()),
        Some(t) => Err(LocError::new(
            pos,
            format!("YAML tag `{}{}` is not supported", t.handle(), t.suffix()),
        )),
    }
}

/// YAML 1.2 core-schema integer: decimal, `0o` octal or `0x` hex.
fn parse_int(s: &str) -> Option<i128> {
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let v = if let Some(oct) = digits.strip_prefix("0o") {
        i128::from_str_radix(oct, 8).ok()?
    } else if let Some(hex) = digits.strip_prefix("0x") {
        i128::from_str_radix(hex, 16).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -v } else { v })
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && s.bytes().any(|b| b.is_ascii_digit());
    if ok { s.parse().ok() } else { None }
}

/// Deserializes typed values from a node. `skip` names mapping keys to pass
/// over (the resource `kind` tag, already used to pick the type).
#[derive(Clone, Copy)]
pub struct NodeDe<'a> {
    node: &'a Node,
    skip: &'a [&'a str],
}

impl<'a> NodeDe<'a> {
    pub fn new(node: &'a Node) -> Self {
        NodeDe { node, skip: &[] }
    }

    pub fn skipping(node: &'a Node, skip: &'a [&'a str]) -> Self {
        NodeDe { node, skip }
    }

    fn err(&self, expected: &str) -> LocError {
        LocError::new(
            self.node.pos,
            format!("expected {expected}, found {}", self.node.describe()),
        )
    }

    fn int(&self) -> Result<i128, LocError> {
        match &self.node.kind {
            NodeKind::Scalar { text, plain: true } => {
                parse_int(text).ok_or_else(|| self.err("an integer"))
            }
            _ => Err(self.err("an integer")),
        }
    }
}

/// Deserialize a typed value from a node; errors carry the innermost position.
pub fn from_node<T: de::DeserializeOwned>(node: &Node) -> Result<T, LocError> {
    T::deserialize(NodeDe::new(node)).map_err(|e: LocError| e.at(node.pos))
}

macro_rules! de_int {
    ($name:ident, $visit:ident, $ty:ty) => {
        fn $name<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
            let n = self.int()?;
            let n = <$ty>::try_from(n).map_err(|_| {
                LocError::new(self.node.pos, format!("integer {n} is out of range"))
            })?;
            v.$visit(n).map_err(|e: LocError| e.at(self.node.pos))
        }
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = LocError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        let pos = self.node.pos;
        match &self.node.kind {
            NodeKind::Null => v.visit_unit(),
            NodeKind::Scalar { text, plain: true } => {
                if text == "true" {
                    v.visit_bool(true)
                } else if text == "false" {
                    v.visit_bool(false)
                } else if let Some(i) = parse_int(text) {
                    match i64::try_from(i) {
                        Ok(i) => v.visit_i64(i),
                        Err(_) => v.visit_str(text),
                    }
                } else if let Some(f) = parse_float(text) {
                    v.visit_f64(f)
                } else {
                    v.visit_str(text)
                }
            }
            NodeKind::Scalar { text, plain: false } => v.visit_str(text),
            NodeKind::Seq(_) => return self.deserialize_seq(v),
            NodeKind::Map(_) => return self.deserialize_map(v),
        }
        .map_err(|e: LocError| e.at(pos))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        match &self.node.kind {
            NodeKind::Scalar { text, plain: true } if text == "true" => v.visit_bool(true),
            NodeKind::Scalar { text, plain: true } if text == "false" => v.visit_bool(false),
            _ => Err(self.err("`true` or `false`")),
        }
    }

    de_int!(deserialize_i8, visit_i8, i8);
    de_int!(deserialize_i16, visit_i16, i16);
    de_int!(deserialize_i32, visit_i32, i32);
    de_int!(deserialize_i64, visit_i64, i64);
    de_int!(deserialize_u8, visit_u8, u8);
    de_int!(deserialize_u16, visit_u16, u16);
    de_int!(deserialize_u32, visit_u32, u32);
    de_int!(deserialize_u64, visit_u64, u64);

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        self.deserialize_f64(v)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        match &self.node.kind {
            NodeKind::Scalar { text, plain: true } => match parse_float(text) {
                Some(f) => v.visit_f64(f).map_err(|e: LocError| e.at(self.node.pos)),
                None => Err(self.err("a number")),
            },
            _ => Err(self.err("a number")),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        self.deserialize_str(v)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        match &self.node.kind {
            NodeKind::Scalar { text, .. } => {
                v.visit_str(text).map_err(|e: LocError| e.at(self.node.pos))
            }
            _ => Err(self.err("a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        self.deserialize_str(v)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        self.deserialize_str(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        if self.node.is_null() {
            v.visit_none().map_err(|e: LocError| e.at(self.node.pos))
        } else {
            v.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        if self.node.is_null() {
            v.visit_unit().map_err(|e: LocError| e.at(self.node.pos))
        } else {
            Err(self.err("null"))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, LocError> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, LocError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        match &self.node.kind {
            NodeKind::Seq(items) => v
                .visit_seq(SeqAccess {
                    items: items.iter(),
                })
                .map_err(|e: LocError| e.at(self.node.pos)),
            _ => Err(self.err("a list")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, LocError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, LocError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        match &self.node.kind {
            NodeKind::Map(entries) => v
                .visit_map(MapAccess {
                    entries: entries.iter(),
                    skip: self.skip,
                    value: None,
                })
                .map_err(|e: LocError| e.at(self.node.pos)),
            _ => Err(self.err("a mapping")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, LocError> {
        self.deserialize_map(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, LocError> {
        match &self.node.kind {
            NodeKind::Scalar { text, .. } => {
                let de: de::value::StrDeserializer<'_, LocError> =
                    text.as_str().into_deserializer();
                v.visit_enum(de).map_err(|e: LocError| e.at(self.node.pos))
            }
            _ => Err(self.err(&format!("one of {}", quote_list(variants)))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        self.deserialize_str(v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, LocError> {
        v.visit_unit()
    }
}

/// `s` as a YAML double-quoted scalar that parses back to `s`: `"` and
/// `\` escaped, and every character YAML does not allow raw in a stream
/// (C0 and C1 controls, DEL, the BOM, U+FFFE and U+FFFF) as `\uXXXX`.
pub fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20
                || (0x7f..=0x9f).contains(&(c as u32))
                || matches!(c, '\u{feff}' | '\u{fffe}' | '\u{ffff}') =>
            {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn quote_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct SeqAccess<'a> {
    items: std::slice::Iter<'a, Node>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = LocError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, LocError> {
        match self.items.next() {
            None => Ok(None),
            Some(node) => seed
                .deserialize(NodeDe::new(node))
                .map(Some)
                .map_err(|e: LocError| e.at(node.pos)),
        }
    }
}

struct MapAccess<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    skip: &'a [&'a str],
    value: Option<&'a Node>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = LocError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, LocError> {
        for (k, v) in self.entries.by_ref() {
            if k.as_str().is_some_and(|s| self.skip.contains(&s)) {
                continue;
            }
            self.value = Some(v);
            return seed
                .deserialize(NodeDe::new(k))
                .map(Some)
                .map_err(|e: LocError| e.at(k.pos));
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, LocError> {
        let node = self.value.take().expect("value after key");
        seed.deserialize(NodeDe::new(node))
            .map_err(|e: LocError| e.at(node.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct T {
        name: String,
        #[serde(default)]
        flag: bool,
        #[serde(default)]
        n: Option<u16>,
    }

    fn err_of<X: de::DeserializeOwned + fmt::Debug>(text: &str) -> (Pos, String) {
        let node = parse(text).unwrap().unwrap();
        let e = from_node::<X>(&node).unwrap_err();
        (e.pos.unwrap(), e.msg)
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  - x\n").unwrap().unwrap();
        assert_eq!(n.pos, Pos { line: 1, col: 1 });
        assert_eq!(n.get("b").unwrap().items()[0].pos, Pos { line: 3, col: 5 });
        assert_eq!(n.entry("b").unwrap().0.pos, Pos { line: 2, col: 1 });
    }

    #[test]
    fn yaml_1_2_booleans_and_strings() {
        let n = parse("name: off\nflag: true\n").unwrap().unwrap();
        let t: T = from_node(&n).unwrap();
        assert_eq!(t.name, "off");
        assert!(t.flag);
        assert_eq!(
            err_of::<T>("name: x\nflag: yes\n").0,
            Pos { line: 2, col: 7 }
        );
    }

    #[test]
    fn strings_keep_their_text() {
        let n = parse("name: 0644\n").unwrap().unwrap();
        assert_eq!(from_node::<T>(&n).unwrap().name, "0644");
    }

    #[test]
    fn unknown_key_at_the_key() {
        let (pos, msg) = err_of::<T>("name: a\n\nbogus: 1\n");
        assert_eq!(pos, Pos { line: 3, col: 1 });
        assert!(msg.contains("unknown field `bogus`"), "{msg}");
    }

    #[test]
    fn missing_field_at_the_mapping() {
        let (pos, msg) = err_of::<Vec<T>>("- flag: true\n- name: x\n  n: 3\n");
        assert_eq!(pos, Pos { line: 1, col: 3 });
        assert!(msg.contains("missing field `name`"), "{msg}");
    }

    #[test]
    fn wrong_type_at_the_value() {
        let (pos, _) = err_of::<T>("name: a\nn: [1]\n");
        assert_eq!(pos, Pos { line: 2, col: 4 });
        let (pos, msg) = err_of::<T>("name: a\nn: 70000\n");
        assert_eq!(pos, Pos { line: 2, col: 4 });
        assert!(msg.contains("out of range"), "{msg}");
    }

    #[test]
    fn duplicate_key_at_second_occurrence() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 3, col: 1 }));
        assert!(e.msg.contains("duplicate key `a`"));
    }

    /// Duplicate detection must stay linear: with a scan of the entries per
    /// key, this mapping took minutes in a debug build (5e9 comparisons);
    /// with the index it is a plain test. No timing is asserted.
    #[test]
    fn a_100k_key_mapping_parses_and_finds_its_duplicate() {
        let mut text: String = (0..100_000).map(|i| format!("k{i}: {i}\n")).collect();
        text.push_str("k500: again\n");
        let (doc, dups) = parse_all(&text).unwrap();
        assert_eq!(dups.len(), 1);
        assert_eq!(
            dups[0].pos,
            Some(Pos {
                line: 100_001,
                col: 1
            })
        );
        assert!(
            dups[0]
                .msg
                .contains("duplicate key `k500` (first at line 501)")
        );
        match doc.unwrap().kind {
            NodeKind::Map(entries) => assert_eq!(entries.len(), 100_000),
            other => panic!("not a mapping: {other:?}"),
        }
    }

    #[test]
    fn an_alias_names_the_nearest_anchor_before_it() {
        let doc = parse("a: &x 1\nb: *x\nc: &x 2\nd: *x\n").unwrap().unwrap();
        assert_eq!(doc.get("b").and_then(Node::as_str), Some("1"));
        assert_eq!(doc.get("d").and_then(Node::as_str), Some("2"));
    }

    #[test]
    fn parse_all_keeps_going_after_a_duplicate_key() {
        let (doc, dups) = parse_all("a: 1\nb: 2\na: 3\nb: {x: 1, x: 2}\nc: 4\n").unwrap();
        let doc = doc.unwrap();
        let at: Vec<Pos> = dups.iter().filter_map(|e| e.pos).collect();
        // The dropped second `b` still has its own duplicate reported.
        assert_eq!(
            at,
            [
                Pos { line: 3, col: 1 },
                Pos { line: 4, col: 1 },
                Pos { line: 4, col: 11 }
            ]
        );
        assert_eq!(
            doc.get("a").and_then(Node::as_str),
            Some("1"),
            "first one kept"
        );
        assert_eq!(doc.get("b").and_then(Node::as_str), Some("2"));
        assert_eq!(doc.get("c").and_then(Node::as_str), Some("4"));
        let errs = parse_all("a: 1\na: 2\nb: [\n").unwrap_err();
        assert_eq!(errs.len(), 2);
        assert!(
            errs[0].msg.starts_with("duplicate key `a`"),
            "{}",
            errs[0].msg
        );
        assert!(errs[1].msg.starts_with("invalid YAML"), "{}", errs[1].msg);
        // parse still stops at the first problem.
        assert_eq!(
            parse("a: 1\na: 2\nb: [\n").unwrap_err().pos,
            Some(Pos { line: 2, col: 1 })
        );
    }

    #[test]
    fn syntax_error_located() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.is_some());
        assert!(e.msg.starts_with("invalid YAML"), "{}", e.msg);
    }

    #[test]
    fn empty_and_comment_only_have_no_document() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# nothing\n").unwrap(), None);
    }

    #[test]
    fn two_documents_rejected() {
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }

    #[test]
    fn aliases_expand() {
        let n = parse("x: &a hello\ny: *a\n").unwrap().unwrap();
        assert_eq!(n.get("y").unwrap().as_str(), Some("hello"));
    }

    #[test]
    fn alias_bomb_refused() {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            s.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(
            parse(&s)
                .unwrap_err()
                .msg
                .contains("aliases expand to more than")
        );
    }

    #[test]
    fn an_anchor_reused_a_little_is_fine_and_a_big_plain_document_too() {
        // 9 x 9 x 9 x 10 = 7,290 nodes from aliases (under 1 MiB): well
        // under the bound.
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..4 {
            let p = i - 1;
            s.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(parse(&s).unwrap().is_some());
        // 200,000 plain nodes count against the node bound only.
        let big: String = (0..100_000).map(|i| format!("k{i}: v\n")).collect();
        assert!(parse(&big).unwrap().is_some());
    }

    #[test]
    fn aliases_of_long_scalars_count_their_bytes() {
        // Nine aliases of a 1 MiB scalar: few nodes, 9 MiB of text.
        let big = "x".repeat(1 << 20);
        let doc = format!("a: &a {big}\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n");
        assert!(
            parse(&doc)
                .unwrap_err()
                .msg
                .contains("aliases expand to more than 8 MiB")
        );
        let doc = format!("a: &a {big}\nb: [*a, *a, *a]\n");
        assert!(parse(&doc).unwrap().is_some());
    }

    #[test]
    fn double_quoted_reads_back_as_the_same_string() {
        for s in [
            "",
            "plain",
            "it's \"q\" \\ : # - [",
            "tab\tnl\ncr\r",
            "\u{7f}\u{85}\u{9f}\u{feff}\u{fffe}\u{ffff}",
            "\0nul",
            "é ✓ 𝄞",
            "\u{2028}",
        ] {
            let doc = format!("v: {}\n", double_quoted(s));
            let n = parse(&doc)
                .unwrap_or_else(|e| panic!("{s:?}: {doc:?}: {}", e.msg))
                .unwrap();
            assert_eq!(n.get("v").unwrap().as_str(), Some(s), "{doc:?}");
        }
    }

    #[test]
    fn ints_follow_core_schema() {
        assert_eq!(parse_int("0o17"), Some(15));
        assert_eq!(parse_int("0x1f"), Some(31));
        assert_eq!(parse_int("-12"), Some(-12));
        assert_eq!(parse_int("12a"), None);
        assert_eq!(parse_int(""), None);
    }
}
