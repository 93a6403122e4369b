//! Every error in the shape of one document, each at its own location:
//! unknown and missing fields, values of the wrong type, invalid values.
//!
//! serde stops at a document's first error. When it does, `parse` asks this
//! module for the others, so that a document with a misspelt enum value and
//! an unknown field is fixed in one run, not two. The document is read
//! again as a located tree (from the YAML parser's events) and walked
//! against its kind's JSON Schema (`schema`: generated from the very types
//! serde reads, so names, nesting and required fields agree). A single
//! value is checked by reading its source text again as the Rust type its
//! schema names (`leaf_check`), so its message is the one serde gives for
//! it. Only what is certainly wrong is reported: where the schema cannot
//! tell (a union it does not model, a value written through a tag or over
//! several lines), nothing is said. It must not report anything serde
//! would accept. Pure: text in, problems out.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Span, StrInput};

use super::at::Loc;
use super::fields::{AbsPath, BridgeName, HostAddr, HostKey, SpecPath, UserName};
use super::key::Kind;
use super::model::{
    Activation, ActivationMode, Boot, Build, BuildOn, Disk, Document, DriftPolicy, Forward,
    HealthCheck, MachineSpec, Metadata, Network, NetworkMode, NixBuild, OnDelete, Protocol, Role,
    RollbackPolicy, ServiceSpec, Target, VmHost, VmPowerState, VmSpec,
};
use super::names::Name;
use super::quantity::{ByteSize, HumanDuration, Port};
use super::schema;
use super::yaml;

/// One problem of a document, at a document-relative location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    pub loc: Loc,
    pub message: String,
    /// A required field is absent: reported at its mapping's last key,
    /// which may have a problem of its own.
    pub missing_field: bool,
}

/// Every problem of `doc`, a document of `kind`, in document order, given
/// that serde read it up to `first`, where it found its first error. Empty
/// when `doc` cannot be read as YAML at all (the parser's error says why).
///
/// serde reads a document in order, so every single value before `first`
/// was read and accepted: those are not read again (reading a value again
/// is most of this module's cost). Mappings are still walked whole, since
/// serde finds a missing field only at the end of its mapping.
pub(super) fn problems(doc: &str, kind: Kind, first: Loc) -> Vec<Problem> {
    let Some(tree) = tree(doc) else {
        return Vec::new();
    };
    let root = schema::of_kind(kind);
    let mut walk = Walk {
        doc,
        kind,
        accepted_before: first,
        defs: root.get("$defs").and_then(Value::as_object),
        out: Vec::new(),
    };
    walk.check(root, &tree, Some(DOCUMENT));
    walk.out
}

/// A node of the document, where it was written.
#[derive(Debug)]
struct Located {
    node: Node,
    loc: Loc,
    /// Byte range of its source text in the document (a scalar's, quotes
    /// included).
    span: (usize, usize),
}

#[derive(Debug)]
enum Node {
    /// A scalar: its text after escapes, whether it is null, whether it
    /// carries a tag (whose meaning the walk does not model).
    Scalar {
        text: String,
        null: bool,
        tagged: bool,
    },
    Seq(Vec<Located>),
    Map(Vec<(Located, Located)>),
    /// `*name`: checked where its anchor is, not again here.
    Alias,
}

/// The document's one node, from the parser's events. `None` when the
/// document cannot be parsed, or nests deeper than parsing allows (the
/// typed parse said so already).
fn tree(doc: &str) -> Option<Located> {
    let mut events = Parser::new_from_str(doc);
    loop {
        match events.next_event()? {
            Ok((Event::DocumentStart(..), _)) => break,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    let first = events.next_event()?.ok()?;
    node(&mut events, first, 0)
}

fn node<'a>(
    events: &mut Parser<'a, StrInput<'a>>,
    (event, span): (Event<'a>, Span),
    depth: usize,
) -> Option<Located> {
    if depth > yaml::MAX_DEPTH {
        return None;
    }
    let node = match event {
        Event::Scalar(text, style, _, tag) => Node::Scalar {
            null: tag.as_ref().map_or(
                style == ScalarStyle::Plain
                    && matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL"),
                |tag| tag.is_yaml_core_schema_tag("null"),
            ),
            tagged: tag.is_some(),
            text: text.into_owned(),
        },
        Event::SequenceStart(..) => {
            let mut items = Vec::new();
            loop {
                match events.next_event()?.ok()? {
                    (Event::SequenceEnd, _) => break,
                    next => items.push(node(events, next, depth + 1)?),
                }
            }
            Node::Seq(items)
        }
        Event::MappingStart(..) => {
            let mut entries = Vec::new();
            loop {
                match events.next_event()?.ok()? {
                    (Event::MappingEnd, _) => break,
                    next => {
                        let key = node(events, next, depth + 1)?;
                        let value = events.next_event()?.ok()?;
                        entries.push((key, node(events, value, depth + 1)?));
                    }
                }
            }
            Node::Map(entries)
        }
        Event::Alias(_) => Node::Alias,
        _ => return None,
    };
    Some(Located {
        node,
        loc: Loc::new(
            u32::try_from(span.start.line()).unwrap_or(u32::MAX),
            u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX),
        ),
        span: (
            span.start.byte_offset().unwrap_or(0),
            span.end.byte_offset().unwrap_or(0),
        ),
    })
}

fn is_null(node: &Located) -> bool {
    matches!(node.node, Node::Scalar { null: true, .. })
}

/// Whether a schema accepts null: `{"type": "null"}` or a type list with it.
fn allows_null(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::String(t)) => t == "null",
        Some(Value::Array(types)) => types.iter().any(|t| t == "null"),
        _ => false,
    }
}

/// The types a schema names, `null` left out.
fn types(schema: &Map<String, Value>) -> Vec<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .filter(|t| *t != "null")
    .collect()
}

/// What the walk calls the schema of a whole document.
const DOCUMENT: &str = "#document";

struct Walk<'a> {
    doc: &'a str,
    kind: Kind,
    /// Single values before this were read and accepted by serde.
    accepted_before: Loc,
    defs: Option<&'a Map<String, Value>>,
    out: Vec<Problem>,
}

impl Walk<'_> {
    fn push(&mut self, node: &Located, raw_message: &str) {
        self.out.push(Problem {
            loc: node.loc,
            message: yaml::reword(raw_message),
            missing_field: false,
        });
    }

    /// Checks `node` against `schema`; `def` names the definition the
    /// schema came from, if any (the Rust type of a single value).
    fn check(&mut self, schema: &Value, node: &Located, def: Option<&str>) {
        let Some(schema) = schema.as_object() else {
            return;
        };
        if matches!(node.node, Node::Alias) {
            return;
        }
        if let Some(name) = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
        {
            if let Some(target) = self.defs.and_then(|defs| defs.get(name)) {
                self.check(target, node, Some(name));
            }
            return;
        }
        let union = schema.get("anyOf").or_else(|| schema.get("oneOf"));
        if let Some(branches) = union.and_then(Value::as_array) {
            if is_null(node) && branches.iter().any(allows_null) {
                return;
            }
            if branches.iter().all(|b| b.get("const").is_some()) {
                // An enum: its variants are one value of its Rust type.
                self.leaf(schema, node, def);
                return;
            }
            let others: Vec<&Value> = branches.iter().filter(|b| !allows_null(b)).collect();
            if let [only] = others[..] {
                self.check(only, node, def);
            }
            return;
        }
        if schema.contains_key("const") {
            // `apiVersion` and `kind`: read and checked before the document.
            return;
        }
        if is_null(node) && allows_null(&Value::Object(schema.clone())) {
            return;
        }
        let types = types(schema);
        if types.contains(&"object") {
            self.object(schema, node, def);
        } else if types.contains(&"array") {
            self.array(schema, node);
        } else if !types.is_empty() {
            self.leaf(schema, node, def);
        }
    }

    fn object(&mut self, schema: &Map<String, Value>, node: &Located, def: Option<&str>) {
        let Node::Map(entries) = &node.node else {
            self.push(node, "expected mapping start");
            return;
        };
        let properties = schema.get("properties").and_then(Value::as_object);
        let patterns = schema
            .get("patternProperties")
            .and_then(Value::as_object)
            .filter(|p| !p.is_empty());
        let mut present = BTreeSet::new();
        for (key, value) in entries {
            let Some(name) = Self::key_text(key) else {
                continue;
            };
            if let Some(property) = properties.and_then(|p| p.get(&name)) {
                present.insert(name);
                self.check(property, value, None);
            } else if let Some(patterns) = patterns {
                for (pattern, property) in patterns {
                    self.key(pattern, key);
                    self.check(property, value, None);
                }
            } else {
                match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        // serde's own words, fields in their declared order.
                        let message = unknown_field(def, self.kind, &name)
                            .unwrap_or_else(|| format!("unknown field `{name}`"));
                        self.push(key, &message);
                    }
                    Some(additional @ Value::Object(_)) => self.check(additional, value, None),
                    _ => {}
                }
            }
        }
        // serde names a missing field where it noticed: at the mapping's
        // last key (at its `{` when it is empty).
        let at = entries.last().map_or(node, |(key, _)| key);
        let required = schema.get("required").and_then(Value::as_array);
        for field in required.into_iter().flatten().filter_map(Value::as_str) {
            if !present.contains(field) {
                self.out.push(Problem {
                    loc: at.loc,
                    message: format!("missing field `{field}`"),
                    missing_field: true,
                });
            }
        }
    }

    fn array(&mut self, schema: &Map<String, Value>, node: &Located) {
        let Node::Seq(items) = &node.node else {
            self.push(node, "expected sequence start");
            return;
        };
        if let Some(item_schema) = schema.get("items") {
            for item in items {
                self.check(item_schema, item, None);
            }
        }
    }

    /// A map key checked against the pattern its map's keys must match:
    /// as the definition with that pattern (a name, say).
    fn key(&mut self, pattern: &str, key: &Located) {
        let Some((name, def)) = self.defs.and_then(|defs| {
            defs.iter()
                .find(|(_, d)| d.get("pattern").and_then(Value::as_str) == Some(pattern))
        }) else {
            return;
        };
        if let Some(def) = def.as_object() {
            self.leaf(def, key, Some(name));
        }
    }

    /// A single value, read again from its source text as its Rust type.
    fn leaf(&mut self, schema: &Map<String, Value>, node: &Located, def: Option<&str>) {
        match &node.node {
            Node::Map(entries) if schema.contains_key("oneOf") || schema.contains_key("enum") => {
                // serde reads a mapping as an enum's variant and its value:
                // the variant is the first key, and every variant here is a
                // plain word, which takes no value.
                if let Some((variant, value)) = entries.first() {
                    let before = self.out.len();
                    self.leaf(schema, variant, def);
                    if self.out.len() == before && !is_null(value) {
                        self.push(value, "unexpected value for unit enum variant");
                    }
                }
            }
            Node::Seq(_) | Node::Map(_) => {
                self.push(node, "expected string scalar");
            }
            Node::Alias => {}
            Node::Scalar { null, .. } => {
                if self.accepted_before.is_known() && node.loc < self.accepted_before {
                    return;
                }
                let Some(check) = leaf_check(def, schema) else {
                    return;
                };
                // Any scalar but null reads as a string.
                if def.is_none() && types(schema) == ["string"] && !null {
                    return;
                }
                let Some(raw) = self.raw(node) else {
                    return;
                };
                if let Err(message) = check(raw) {
                    self.out.push(Problem {
                        loc: node.loc,
                        message,
                        missing_field: false,
                    });
                }
            }
        }
    }

    /// The source text of a scalar, if reading it alone means what it
    /// means in place: one line, no tag.
    fn raw<'s>(&'s self, node: &Located) -> Option<&'s str> {
        let Node::Scalar { tagged, null, .. } = &node.node else {
            return None;
        };
        let raw = self.doc.get(node.span.0..node.span.1)?;
        if raw.is_empty() {
            return null.then_some("null");
        }
        (!tagged && !raw.contains(['\n', '\r'])).then_some(raw)
    }

    /// A key's name: the text of a scalar key.
    fn key_text(key: &Located) -> Option<String> {
        match &key.node {
            Node::Scalar { text, .. } => Some(text.clone()),
            _ => None,
        }
    }
}

/// What serde says about the field `name` in a mapping of definition `def`
/// (or of the whole document of `kind`): a mapping holding only that key is
/// read as the definition's Rust type, which names the unknown field before
/// it looks for missing ones.
fn unknown_field(def: Option<&str>, kind: Kind, name: &str) -> Option<String> {
    // What follows the field's name is the same for every name, so serde
    // is asked once per definition, with a stand-in name.
    static SUFFIXES: OnceLock<Vec<(&'static str, Kind, String)>> = OnceLock::new();
    let def = def?;
    let suffixes = SUFFIXES.get_or_init(|| {
        let kinds = [Kind::Machine, Kind::VirtualMachine, Kind::Service];
        let mut suffixes = Vec::new();
        for def in CLOSED {
            for kind in kinds {
                let message = struct_reader(def, kind)
                    .and_then(|read| read("{zz: ~}").err())
                    .and_then(|m| m.strip_prefix("unknown field `zz`").map(str::to_owned));
                if let Some(suffix) = message {
                    suffixes.push((def, kind, suffix));
                }
            }
        }
        suffixes
    });
    let (_, _, suffix) = suffixes.iter().find(|(d, k, _)| *d == def && *k == kind)?;
    Some(format!("unknown field `{name}`{suffix}"))
}

/// The definitions of mappings with a fixed set of fields (and the whole
/// document), which [`struct_reader`] reads.
const CLOSED: [&str; 15] = [
    DOCUMENT,
    "Metadata",
    "MachineSpec",
    "Target",
    "Build",
    "NixBuild",
    "Activation",
    "HealthCheck",
    "VmSpec",
    "Disk",
    "Network",
    "Forward",
    "Boot",
    "ServiceSpec",
    "Role",
];

/// Reads a mapping as the Rust type of definition `def` (or of the whole
/// document of `kind`).
fn struct_reader(def: &str, kind: Kind) -> Option<LeafCheck> {
    Some(match (def, kind) {
        (DOCUMENT, Kind::Machine) => reads_as::<Document<MachineSpec>>,
        (DOCUMENT, Kind::VirtualMachine) => reads_as::<Document<VmSpec>>,
        (DOCUMENT, Kind::Service) => reads_as::<Document<ServiceSpec>>,
        ("Metadata", _) => reads_as::<Metadata>,
        ("MachineSpec", _) => reads_as::<MachineSpec>,
        ("Target", _) => reads_as::<Target>,
        ("Build", _) => reads_as::<Build>,
        ("NixBuild", _) => reads_as::<NixBuild>,
        ("Activation", _) => reads_as::<Activation>,
        ("HealthCheck", _) => reads_as::<HealthCheck>,
        ("VmSpec", _) => reads_as::<VmSpec>,
        ("Disk", _) => reads_as::<Disk>,
        ("Network", _) => reads_as::<Network>,
        ("Forward", _) => reads_as::<Forward>,
        ("Boot", _) => reads_as::<Boot>,
        ("ServiceSpec", _) => reads_as::<ServiceSpec>,
        ("Role", _) => reads_as::<Role>,
        _ => return None,
    })
}

type LeafCheck = fn(&str) -> Result<(), String>;

/// Whether `raw` reads as a `T`, and serde's message if not.
fn reads_as<T: DeserializeOwned>(raw: &str) -> Result<(), String> {
    yaml::from_str::<T>(raw)
        .map(drop)
        .map_err(|(_, message)| message)
}

/// How a single value of a schema is checked: by the Rust type of its
/// definition, or of its JSON type and format.
fn leaf_check(def: Option<&str>, schema: &Map<String, Value>) -> Option<LeafCheck> {
    let check: LeafCheck = match def {
        Some("Name") => reads_as::<Name>,
        Some("Duration") => reads_as::<HumanDuration>,
        Some("ByteSize") => reads_as::<ByteSize>,
        Some("Port") => reads_as::<Port>,
        Some("HostAddr") => reads_as::<HostAddr>,
        Some("HostKey") => reads_as::<HostKey>,
        Some("UserName") => reads_as::<UserName>,
        Some("SpecPath") => reads_as::<SpecPath>,
        Some("AbsPath") => reads_as::<AbsPath>,
        Some("BridgeName") => reads_as::<BridgeName>,
        Some("VmHost") => reads_as::<VmHost>,
        Some("ActivationMode") => reads_as::<ActivationMode>,
        Some("BuildOn") => reads_as::<BuildOn>,
        Some("RollbackPolicy") => reads_as::<RollbackPolicy>,
        Some("DriftPolicy") => reads_as::<DriftPolicy>,
        Some("VmPowerState") => reads_as::<VmPowerState>,
        Some("NetworkMode") => reads_as::<NetworkMode>,
        Some("Protocol") => reads_as::<Protocol>,
        Some("OnDelete") => reads_as::<OnDelete>,
        Some(_) => return None,
        None => {
            let format = schema.get("format").and_then(Value::as_str);
            match (types(schema).first().copied()?, format) {
                ("string", _) => reads_as::<String>,
                ("boolean", _) => reads_as::<bool>,
                ("integer", Some("uint8")) => reads_as::<u8>,
                ("integer", Some("uint16")) => reads_as::<u16>,
                ("integer", Some("uint32")) => reads_as::<u32>,
                ("integer", Some("uint64" | "uint")) => reads_as::<u64>,
                ("integer", _) => reads_as::<i64>,
                ("number", _) => reads_as::<f64>,
                _ => return None,
            }
        }
    };
    Some(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine that sets every field.
    const MACHINE: &str = r#"apiVersion: converge/v1
kind: Machine
metadata: {name: web1, tags: [web, prod]}
spec:
  target:
    host: 10.0.0.5
    user: root
    port: 2222
    hostKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMzF7DriQ4T2pY6rNprVCreoHiN39UEyrA0sXYy4MI/Z"
    knownHosts: keys/known_hosts
    identityFile: /root/.ssh/id_ed25519
    stateDir: /var/lib/converge
  build: {command: ["./build.sh", "web1"], timeout: 20m}
  activation:
    mode: switch
    healthChecks: [{exec: ["true"], timeout: 60s}]
    rollback: auto
    timeout: 5m
    confirmTimeout: 30s
  drift: warn
  interval: 1h30m
"#;

    /// A VM that sets every field.
    const VM: &str = r#"apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: builder}
spec:
  host: hyper1
  state: stopped
  cpus: 4
  memory: 2GiB
  disks:
    - {name: root, size: 20GiB, backingImage: images/base.qcow2}
    - name: data
      size: 1TiB
  network:
    mode: bridge
    bridge: br0
  boot: {kernel: boot/vmlinuz, initrd: boot/initrd, append: "console=ttyS0"}
  extraArgs: ["-nographic"]
  machine: inner
  onDelete: delete
  stopTimeout: 0s
"#;

    /// A service that sets every field.
    const SERVICE: &str = r#"apiVersion: converge/v1
kind: Service
metadata: {name: home-vpn}
spec:
  module: wireguard
  settings: {port: 51820, nested: {list: [1, two, ~]}}
  roles:
    controller: {machines: [gw]}
    peer:
      tags: [all]
      after: [controller]
      settings: {keepalive: 25}
      perMachine: {laptop: {keepalive: 10}}
"#;

    /// Every diagnostic parsing `doc` as a file yields: serde's first and
    /// the rest from `problems`, each once.
    fn typed_errors(doc: &str) -> Vec<(u32, u32, String)> {
        let parsed = crate::spec::parse::parse_file(std::path::Path::new("m.yaml"), doc.as_bytes());
        parsed
            .diagnostics
            .into_iter()
            .map(|d| (d.line, d.column, d.message))
            .collect()
    }

    #[test]
    fn a_valid_document_of_every_kind_has_no_problem() {
        for (doc, kind) in [
            (MACHINE, Kind::Machine),
            (VM, Kind::VirtualMachine),
            (SERVICE, Kind::Service),
        ] {
            assert_eq!(problems(doc, kind, Loc::UNKNOWN), [], "{doc}");
            assert_eq!(typed_errors(doc), [], "{doc}");
        }
    }

    /// Each edit makes one error; `problems` must find it exactly where
    /// serde does, and nothing else.
    #[test]
    fn the_one_error_of_a_document_is_found_where_serde_finds_it() {
        let cases: &[(&str, Kind, &str, &str)] = &[
            (MACHINE, Kind::Machine, "drift: warn", "drift: fix"),
            (MACHINE, Kind::Machine, "drift: warn", "drift: {warn: 1}"),
            (MACHINE, Kind::Machine, "drift: warn", "colour: blue"),
            (MACHINE, Kind::Machine, "    user: root", "    usr: root"),
            (MACHINE, Kind::Machine, "port: 2222", "port: 0"),
            (MACHINE, Kind::Machine, "port: 2222", "port: 70000"),
            (MACHINE, Kind::Machine, "port: 2222", "port: [22]"),
            (MACHINE, Kind::Machine, "port: 2222", "port: twenty"),
            (
                MACHINE,
                Kind::Machine,
                "tags: [web, prod]",
                "tags: [web, Prod]",
            ),
            (MACHINE, Kind::Machine, "tags: [web, prod]", "tags: web"),
            (
                MACHINE,
                Kind::Machine,
                "timeout: 20m",
                "timeout: 20 minutes",
            ),
            (
                MACHINE,
                Kind::Machine,
                "healthChecks: [{exec: [\"true\"], timeout: 60s}]",
                "healthChecks: [{timeout: 60s}]",
            ),
            (
                MACHINE,
                Kind::Machine,
                "stateDir: /var/lib/converge",
                "stateDir: var/lib",
            ),
            (MACHINE, Kind::Machine, "mode: switch", "mode: ~"),
            (
                MACHINE,
                Kind::Machine,
                "{exec: [\"true\"], timeout: 60s}",
                "{}",
            ),
            (
                MACHINE,
                Kind::Machine,
                "healthChecks: [{exec: [\"true\"], timeout: 60s}]",
                "healthChecks:\n      - timeout: 60s\n",
            ),
            (
                MACHINE,
                Kind::Machine,
                "build: {command: [\"./build.sh\", \"web1\"], timeout: 20m}",
                "build:",
            ),
            (
                MACHINE,
                Kind::Machine,
                "build: {command: [\"./build.sh\", \"web1\"], timeout: 20m}",
                "build: ~",
            ),
            (
                MACHINE,
                Kind::Machine,
                "metadata: {name: web1, tags: [web, prod]}\n",
                "",
            ),
            (
                MACHINE,
                Kind::Machine,
                "{name: web1, tags: [web, prod]}",
                "{tags: [web, prod]}",
            ),
            (
                MACHINE,
                Kind::Machine,
                "  build: {command: [\"./build.sh\", \"web1\"], timeout: 20m}\n",
                "",
            ),
            (VM, Kind::VirtualMachine, "cpus: 4", "cpus: -1"),
            (VM, Kind::VirtualMachine, "cpus: 4", "cpus: many"),
            (VM, Kind::VirtualMachine, "memory: 2GiB", "memory: 2GB"),
            (VM, Kind::VirtualMachine, "size: 1TiB", "size: [1]"),
            (VM, Kind::VirtualMachine, "mode: bridge", "mode: nat"),
            (
                VM,
                Kind::VirtualMachine,
                "bridge: br0",
                "bridge: {name: br0}",
            ),
            (VM, Kind::VirtualMachine, "host: hyper1", "host: Hyper1"),
            (
                VM,
                Kind::VirtualMachine,
                "onDelete: delete",
                "onDelete: shred",
            ),
            (
                VM,
                Kind::VirtualMachine,
                "extraArgs: [\"-nographic\"]",
                "extraArgs: -nographic",
            ),
            (VM, Kind::VirtualMachine, "  memory: 2GiB\n", ""),
            (
                SERVICE,
                Kind::Service,
                "controller: {machines: [gw]}",
                "Controller: {machines: [gw]}",
            ),
            (
                SERVICE,
                Kind::Service,
                "perMachine: {laptop:",
                "perMachine: {Laptop:",
            ),
            (
                SERVICE,
                Kind::Service,
                "after: [controller]",
                "after: controller",
            ),
            (SERVICE, Kind::Service, "tags: [all]", "tag: [all]"),
            (
                SERVICE,
                Kind::Service,
                "module: wireguard",
                "module: [wireguard]",
            ),
            (
                SERVICE,
                Kind::Service,
                "settings: {keepalive: 25}",
                "settings: 25",
            ),
        ];
        for (doc, kind, from, to) in cases {
            assert!(doc.contains(from), "{from}");
            let doc = doc.replacen(from, to, 1);
            let serde = yaml_error(&doc, *kind);
            let found: Vec<(Loc, String)> = problems(&doc, *kind, Loc::UNKNOWN)
                .into_iter()
                .map(|p| (p.loc, p.message))
                .collect();
            assert_eq!(found, [serde], "{from} -> {to}");
            assert_eq!(typed_errors(&doc).len(), 1, "{from} -> {to}");
        }
    }

    fn yaml_error(doc: &str, kind: Kind) -> (Loc, String) {
        use crate::spec::model::{Document, MachineSpec, ServiceSpec, VmSpec};
        let result = match kind {
            Kind::Machine => yaml::from_str::<Document<MachineSpec>>(doc).map(drop),
            Kind::VirtualMachine => yaml::from_str::<Document<VmSpec>>(doc).map(drop),
            Kind::Service => yaml::from_str::<Document<ServiceSpec>>(doc).map(drop),
        };
        match result {
            Err(e) => e,
            Ok(()) => panic!("no error in\n{doc}"),
        }
    }

    #[test]
    fn a_missing_field_and_an_unknown_one_in_one_mapping_are_both_reported() {
        for checks in [
            "healthChecks: [{timeout: 60s, timeout2: 1}]",
            "healthChecks: [{timeout2: 1, timeout: 60s}]",
            "healthChecks:\n      - timeout2: 1\n        timeout: 60s\n",
        ] {
            let doc = MACHINE.replace("healthChecks: [{exec: [\"true\"], timeout: 60s}]", checks);
            let errors: Vec<String> = typed_errors(&doc).into_iter().map(|(_, _, m)| m).collect();
            assert_eq!(
                errors,
                [
                    "unknown field `timeout2`, expected one of exec, timeout",
                    "missing field `exec`"
                ],
                "{checks}"
            );
        }
    }

    #[test]
    fn every_error_of_a_document_is_reported_in_one_run() {
        let doc = MACHINE
            .replace("tags: [web, prod]", "tags: [web, Prod]")
            .replace("    user: root", "    usr: root")
            .replace("port: 2222", "port: 0")
            .replace("drift: warn", "drift: fix")
            .replace("  interval: 1h30m\n", "  colour: blue\n")
            .replace("mode: switch", "mode: swich");
        let errors = typed_errors(&doc);
        let places: Vec<(u32, u32)> = errors.iter().map(|(l, c, _)| (*l, *c)).collect();
        assert_eq!(
            places,
            [(3, 36), (7, 5), (8, 11), (15, 11), (20, 10), (21, 3)],
            "{errors:#?}"
        );
    }

    #[test]
    fn every_definition_of_a_mapping_without_other_fields_names_its_fields_as_serde_does() {
        for kind in [Kind::Machine, Kind::VirtualMachine, Kind::Service] {
            let root = schema::of_kind(kind);
            let defs = root.get("$defs").and_then(Value::as_object).unwrap();
            let closed = defs
                .iter()
                .filter(|(_, d)| d.get("additionalProperties") == Some(&Value::Bool(false)))
                .map(|(name, _)| name.as_str());
            for name in closed.chain([DOCUMENT]) {
                let message = unknown_field(Some(name), kind, "zz\u{1b}");
                let serde = serde_json::to_string("zz\u{1b}")
                    .ok()
                    .and_then(|key| struct_reader(name, kind)?(&format!("{{{key}: ~}}")).err());
                assert_eq!(message, serde, "{name}");
                assert!(
                    message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("unknown field `zz\u{1b}`, expected")),
                    "{name}: {message:?}"
                );
            }
        }
    }

    #[test]
    fn every_definition_of_a_single_value_has_a_check() {
        for (file, schema) in schema::all() {
            let defs = schema.get("$defs").and_then(Value::as_object);
            for (name, def) in defs.into_iter().flatten() {
                let def = def.as_object().expect("a definition is an object");
                let single = !types(def).iter().any(|t| matches!(*t, "object" | "array"));
                if single {
                    assert!(
                        leaf_check(Some(name), def).is_some(),
                        "{file}: definition {name} has no leaf_check: add its Rust type"
                    );
                }
            }
        }
    }
}
