//! YAML as Kubernetes reads it: kubectl and Helm turn YAML into JSON with YAML 1.1 rules (go-yaml v2 behind
//! sigs.k8s.io/yaml), so this module does the same, free of I/O, on the events of a YAML parser:
//!
//! - plain scalars resolve as YAML 1.1: `0644` is the octal 420, `0x1F` 31, `1_000` 1000, `yes`/`no`/`on`/
//!   `off`/`y`/`n` are booleans, `~` and `null` are null, a float with no fraction is an integer;
//! - quoted and block scalars are always strings (`"yes"` stays a string), as are values tagged `!!str`;
//! - anchors, aliases and merge keys (`<<`) are expanded, within a bound on the expanded size (an alias
//!   bomb is an error, not a memory blow-up);
//! - a key defined twice in one mapping is an error, as for `kubectl apply`.
//!
//! Errors name the line.

use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Nodes one file may expand to (aliases included): far above any real manifest, far below a bomb.
pub const MAX_NODES: usize = 2_000_000;
/// How deep mappings and sequences may nest (a real manifest nests a few dozen levels; a value nested
/// thousands deep would overflow the stack of whatever walks it).
pub const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct YamlError {
    pub line: usize,
    pub message: String,
}

/// One document of a stream, with the line its content starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub line: usize,
    pub value: Value,
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        nodes: usize,
    },
    Map {
        map: Map<String, Value>,
        key: Option<(String, bool)>,
        merges: Vec<Value>,
        anchor: usize,
        nodes: usize,
        line: usize,
    },
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Value, usize)>,
    docs: Vec<Document>,
    doc_line: Option<usize>,
    nodes: usize,
    error: Option<YamlError>,
}

/// The text a resolved key becomes in JSON (sigs.k8s.io/yaml writes non-string keys as their text).
fn key_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Null => Ok("null".into()),
        _ => Err("a mapping key must be a scalar".into()),
    }
}

fn float_syntax(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    mantissa_ok && exp.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

fn number_of_float(f: f64, text: &str) -> Result<Value, String> {
    if !f.is_finite() {
        return Err(format!("{text} cannot be written as JSON"));
    }
    if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        return Ok(Value::from(f as i64));
    }
    Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("{text} cannot be written as JSON"))
}

/// An integer as go-yaml v2 reads one: underscores dropped, then Go's `ParseInt(s, 0, 64)` (0x, 0o, 0b and
/// a leading 0 for octal), then unsigned.
fn int_of(text: &str) -> Option<Value> {
    let plain: String = text.chars().filter(|c| *c != '_').collect();
    let (neg, digits) = match plain.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, plain.strip_prefix('+').unwrap_or(&plain)),
    };
    let (radix, body) = if let Some(h) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, h)
    } else if let Some(o) = digits.strip_prefix("0o").or_else(|| digits.strip_prefix("0O")) {
        (8, o)
    } else if let Some(b) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        (2, b)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = u64::from_str_radix(body, radix).ok()?;
    if neg {
        let v = i64::try_from(magnitude).ok().map(|m| -m).or((magnitude == 1 << 63).then_some(i64::MIN))?;
        Some(Value::from(v))
    } else {
        Some(i64::try_from(magnitude).map(Value::from).unwrap_or_else(|_| Value::from(magnitude)))
    }
}

/// The JSON value of a scalar, with YAML 1.1 resolution for plain scalars.
pub fn resolve(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    let core = tag.filter(|t| t.handle == "!!" || t.handle == "tag:yaml.org,2002:").map(|t| t.suffix.as_str());
    match core {
        Some("str") | Some("binary") | Some("timestamp") => return Ok(Value::String(text.to_string())),
        Some("null") => return Ok(Value::Null),
        Some("bool") => {
            return match resolve(text, TScalarStyle::Plain, None)? {
                b @ Value::Bool(_) => Ok(b),
                _ => Err(format!("{text:?} is not a boolean")),
            }
        }
        Some("int") => return int_of(text).ok_or_else(|| format!("{text:?} is not an integer")),
        Some("float") => {
            let f: f64 = text.replace('_', "").parse().map_err(|_| format!("{text:?} is not a number"))?;
            return number_of_float(f, text);
        }
        _ => {}
    }
    if style != TScalarStyle::Plain || tag.is_some() {
        return Ok(Value::String(text.to_string()));
    }
    Ok(match text {
        "" | "~" | "null" | "Null" | "NULL" => Value::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Value::Bool(true),
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF" | ".nan" | ".NaN"
        | ".NAN" => return Err(format!("{text} cannot be written as JSON")),
        _ => {
            let starts_numeric = text.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
            if !starts_numeric {
                Value::String(text.to_string())
            } else if let Some(i) = int_of(text) {
                i
            } else if float_syntax(&text.replace('_', "")) {
                let f: f64 = text.replace('_', "").parse().map_err(|_| format!("{text:?} is not a number"))?;
                number_of_float(f, text)?
            } else {
                Value::String(text.to_string())
            }
        }
    })
}

impl Builder {
    fn fail(&mut self, mark: Marker, message: impl Into<String>) {
        self.fail_at(mark.line(), message);
    }

    fn fail_at(&mut self, line: usize, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(YamlError { line, message: message.into() });
        }
    }

    fn count(&mut self, n: usize, mark: Marker) -> bool {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            self.fail(mark, format!("the document expands to more than {MAX_NODES} nodes (aliases included)"));
            return false;
        }
        true
    }

    /// Puts a finished node where it belongs: the document, a sequence, or a mapping (as key or value).
    fn place(&mut self, v: Value, nodes: usize, anchor: usize, plain_merge: bool, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, (v.clone(), nodes));
        }
        match self.stack.last_mut() {
            None => self.docs.push(Document { line: self.doc_line.take().unwrap_or(mark.line()), value: v }),
            Some(Frame::Seq { items, nodes: n, .. }) => {
                items.push(v);
                *n += nodes;
            }
            Some(Frame::Map { key: k @ None, .. }) => match key_text(&v) {
                Ok(text) => *k = Some((text, plain_merge)),
                Err(e) => self.fail(mark, e),
            },
            Some(Frame::Map { map, key: k @ Some(_), merges, nodes: n, .. }) => {
                let (key, merge) = k.take().unwrap_or_default();
                *n += nodes;
                if merge {
                    merges.push(v);
                } else if map.contains_key(&key) {
                    let message = format!("key {key:?} is defined twice in one mapping");
                    self.fail(mark, message);
                } else {
                    map.insert(key, v);
                }
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => {
                // Anchors belong to their document.
                self.doc_line = None;
                self.anchors.clear();
            }
            Event::Scalar(text, style, anchor, tag) => {
                if self.doc_line.is_none() && self.stack.is_empty() {
                    self.doc_line = Some(mark.line());
                }
                let merge = style == TScalarStyle::Plain && tag.is_none() && text == "<<";
                match resolve(&text, style, tag.as_ref()) {
                    Ok(v) if self.count(1, mark) => self.place(v, 1, anchor, merge, mark),
                    Ok(_) => {}
                    Err(e) => self.fail(mark, e),
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some((v, nodes)) if self.count(nodes, mark) => self.place(v, nodes, 0, false, mark),
                Some(_) => {}
                None => self.fail(mark, "an alias to an unknown anchor"),
            },
            Event::SequenceStart(anchor, _) => {
                if self.doc_line.is_none() && self.stack.is_empty() {
                    self.doc_line = Some(mark.line());
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(mark, format!("nested deeper than {MAX_DEPTH} levels"));
                } else if self.count(1, mark) {
                    self.stack.push(Frame::Seq { items: Vec::new(), anchor, nodes: 1 });
                }
            }
            Event::MappingStart(anchor, _) => {
                if self.doc_line.is_none() && self.stack.is_empty() {
                    self.doc_line = Some(mark.line());
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(mark, format!("nested deeper than {MAX_DEPTH} levels"));
                } else if self.count(1, mark) {
                    let line = mark.line();
                    self.stack.push(Frame::Map {
                        map: Map::new(),
                        key: None,
                        merges: Vec::new(),
                        anchor,
                        nodes: 1,
                        line,
                    });
                }
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, anchor, nodes }) = self.stack.pop() {
                    self.place(Value::Array(items), nodes, anchor, false, mark);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { mut map, merges, anchor, nodes, line, .. }) = self.stack.pop() {
                    // Merged keys never override the mapping's own.
                    for m in merges {
                        let sources = match m {
                            Value::Array(a) => a,
                            other => vec![other],
                        };
                        for s in sources {
                            match s {
                                Value::Object(src) => {
                                    for (k, v) in src {
                                        map.entry(k).or_insert(v);
                                    }
                                }
                                _ => self.fail_at(line, "a merge key (<<) takes a mapping or a list of mappings"),
                            }
                        }
                    }
                    self.place(Value::Object(map), nodes, anchor, false, mark);
                }
            }
            Event::DocumentEnd | Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

/// The line where the node at `path` starts in the first document of `text` (`targets[3].selector` is
/// `["targets", "3", "selector"]`: mapping keys, and sequence indices as numbers; a mapping's value is shown at
/// its key's line), if the node exists.
pub fn line_of_path(text: &str, path: &[&str]) -> Option<usize> {
    enum Level {
        Map { key: Option<String>, key_line: usize, expect_key: bool },
        Seq { next: usize },
    }
    struct Finder<'a> {
        path: &'a [&'a str],
        stack: Vec<Level>,
        /// The path of the node about to start, as far as it matches `path`.
        best: Option<(usize, usize)>,
        done: bool,
    }
    impl Finder<'_> {
        /// The path of the node starting now, if it is a prefix of the wanted path: its depth.
        fn depth_matching(&self) -> Option<usize> {
            let mut depth = 0;
            for level in &self.stack {
                let seg = match level {
                    Level::Map { key: Some(k), expect_key: false, .. } => k.clone(),
                    Level::Seq { next } => next.to_string(),
                    _ => return None,
                };
                if self.path.get(depth) != Some(&seg.as_str()) {
                    return None;
                }
                depth += 1;
            }
            Some(depth)
        }

        fn node(&mut self, line: usize) {
            // A mapping's value is shown at its key's line.
            let line = match self.stack.last() {
                Some(Level::Map { key_line, expect_key: false, .. }) => *key_line,
                _ => line,
            };
            if let Some(d) = self.depth_matching() {
                if self.best.is_none_or(|(bd, _)| d > bd) {
                    self.best = Some((d, line));
                }
            }
        }

        fn after_node(&mut self) {
            match self.stack.last_mut() {
                Some(Level::Map { key, expect_key, .. }) => {
                    if *expect_key {
                        *expect_key = false;
                    } else {
                        *key = None;
                        *expect_key = true;
                    }
                }
                Some(Level::Seq { next }) => *next += 1,
                None => self.done = true,
            }
        }
    }
    impl MarkedEventReceiver for Finder<'_> {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            if self.done {
                return;
            }
            match ev {
                Event::Scalar(text, ..) => {
                    if let Some(Level::Map { key, key_line, expect_key: true }) = self.stack.last_mut() {
                        *key = Some(text);
                        *key_line = mark.line();
                    } else {
                        self.node(mark.line());
                    }
                    self.after_node();
                }
                Event::Alias(_) => {
                    self.node(mark.line());
                    self.after_node();
                }
                Event::SequenceStart(..) => {
                    self.node(mark.line());
                    self.stack.push(Level::Seq { next: 0 });
                }
                Event::MappingStart(..) => {
                    self.node(mark.line());
                    self.stack.push(Level::Map { key: None, key_line: mark.line(), expect_key: true });
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    self.stack.pop();
                    self.after_node();
                }
                _ => {}
            }
        }
    }
    let mut f = Finder { path, stack: Vec::new(), best: None, done: false };
    // The first document's events, in a loop (see `parse_documents`).
    let mut parser = Parser::new_from_str(text);
    while let Ok((ev, mark)) = parser.next_token() {
        if matches!(ev, Event::StreamEnd | Event::DocumentEnd) || f.stack.len() > MAX_DEPTH {
            break;
        }
        f.on_event(ev, mark);
    }
    f.best.filter(|(depth, _)| *depth == path.len()).map(|(_, line)| line)
}

/// Every document of a YAML stream (empty documents are `null`).
pub fn parse_documents(text: &str) -> Result<Vec<Document>, YamlError> {
    let mut b =
        Builder { stack: Vec::new(), anchors: HashMap::new(), docs: Vec::new(), doc_line: None, nodes: 0, error: None };
    // The parser's own `load` recurses once per nesting level (a file nested thousands deep overflows the
    // stack): its events are read here in a loop instead, stopping at the first error.
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((ev, mark)) => {
                b.on_event(ev, mark);
                if b.error.is_some() {
                    break;
                }
            }
            Err(e) => return Err(YamlError { line: e.marker().line(), message: e.info().to_string() }),
        }
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    Ok(b.docs)
}

/// The one document of a file (`null` when empty); a second document is an error.
pub fn parse_one(text: &str) -> Result<Value, YamlError> {
    let mut docs = parse_documents(text)?;
    match docs.len() {
        0 => Ok(Value::Null),
        1 => Ok(docs.remove(0).value),
        _ => Err(YamlError { line: docs[1].line, message: "one document was expected, this file has several".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Value {
        parse_one(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn plain_scalars_resolve_as_kubectl_reads_them() {
        let v = one("mode: 0644\nhex: 0x1F\nbig: 1_000\nyes: yes\nq: \"yes\"\ns: 'on'\nnul: ~\nf: 1.5\ni: 2.0\ne: 1e3\nneg: -010\nver: 1.2.3\nzero: 0\nb: 0b101\nstr: 08x\n");
        assert_eq!(
            v,
            json!({"mode": 420, "hex": 31, "big": 1000, "true": true, "q": "yes", "s": "on", "nul": null, "f": 1.5,
                   "i": 2, "e": 1000, "neg": -8, "ver": "1.2.3", "zero": 0, "b": 5, "str": "08x"})
        );
        assert_eq!(one("a: 09"), json!({"a": 9}), "not octal: read as a float, as go-yaml does");
        assert_eq!(one("a: !!str 0644\nb: !!int '12'\nc: |\n  yes\n"), json!({"a": "0644", "b": 12, "c": "yes\n"}));
    }

    #[test]
    fn the_line_of_a_path_is_where_that_node_starts() {
        let text = "namespace: shop\ntargets:\n- name: a\n  selector: {}\n- name: b\n  selector:\n    matchExpressions: [{key: x}]\n";
        assert_eq!(line_of_path(text, &["targets", "1", "selector"]), Some(6));
        assert_eq!(line_of_path(text, &["targets", "0", "selector"]), Some(4));
        assert_eq!(line_of_path(text, &["targets", "1", "selector", "matchExpressions", "0"]), Some(7));
        assert_eq!(line_of_path(text, &["targets", "1", "nope"]), None);
        assert_eq!(line_of_path(text, &["namespace"]), Some(1));
    }

    #[test]
    fn anchors_aliases_and_merge_keys_expand() {
        let v = one("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  b: 3\nl: [*b, *b]\n");
        assert_eq!(v["x"], json!({"b": 3, "a": 1}));
        assert_eq!(v["l"], json!([{"a": 1, "b": 2}, {"a": 1, "b": 2}]));
    }

    #[test]
    fn an_alias_bomb_is_an_error_not_a_blow_up() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, prev) in ["b", "c", "d", "e", "f", "g", "h"].iter().zip(["a", "b", "c", "d", "e", "f", "g"]) {
            bomb.push_str(&format!("{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let e = parse_one(&bomb).unwrap_err();
        assert!(e.message.contains("expands to more than"), "{e}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let n = 100_000;
        let block: String = (0..2_000).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        for text in [format!("{}x{}", "[".repeat(n), "]".repeat(n)), block] {
            let e = parse_documents(&text).unwrap_err();
            assert!(
                e.message.contains("nested deeper than 256 levels") || e.message.contains("recursion limit"),
                "{e}"
            );
        }
        let ok: String = (0..100).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(parse_one(&ok).is_ok(), "a hundred levels are fine");
        assert_eq!(line_of_path(&format!("{}x{}", "[".repeat(n), "]".repeat(n)), &["a"]), None);
    }

    #[test]
    fn an_anchor_belongs_to_its_document() {
        let e = parse_documents("a: &x 1\n---\nb: *x\n").unwrap_err();
        assert!(e.message.contains("unknown anchor"), "{e}");
    }

    #[test]
    fn documents_carry_their_line_and_errors_name_theirs() {
        let docs = parse_documents("a: 1\n---\n# c\nb: 2\n---\n").unwrap();
        let lines: Vec<usize> = docs.iter().filter(|d| !d.value.is_null()).map(|d| d.line).collect();
        assert_eq!(lines, vec![1, 4]);
        let e = parse_one("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(e.line >= 2, "{e}");
        let e = parse_one("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (3, "key \"a\" is defined twice in one mapping"));
        assert!(parse_one("a: .inf").is_err());
    }
}
