//! JSON Schemas of the object kinds, generated from the model types.
//!
//! One schema per kind plus one for any document, so editors can check YAML as
//! it is typed (`# yaml-language-server: $schema=…`). The schemas come from
//! the same types serde reads, so they cannot disagree on field names; rules
//! that span fields or objects are `converge validate`'s job. Pure: returns
//! JSON values; the CLI writes them.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use super::key::Kind;
use super::model::{API_VERSION, Document, MachineSpec, ServiceSpec, VmSpec};

/// `(file name, schema)` for every kind and for any document, in a fixed order.
pub fn all() -> Vec<(&'static str, Value)> {
    let kinds = [
        (Kind::Machine, kind_schema::<MachineSpec>(Kind::Machine)),
        (
            Kind::VirtualMachine,
            kind_schema::<VmSpec>(Kind::VirtualMachine),
        ),
        (Kind::Service, kind_schema::<ServiceSpec>(Kind::Service)),
    ];
    let mut defs = Map::new();
    let mut branches = Vec::new();
    let mut out = Vec::new();
    for (kind, schema) in kinds {
        let mut branch = schema.clone();
        if let Some(Value::Object(d)) = branch.as_object_mut().and_then(|o| o.remove("$defs")) {
            // Types of the same name are the same Rust type in every kind.
            defs.extend(d);
        }
        if let Some(o) = branch.as_object_mut() {
            o.remove("$schema");
        }
        branches.push(branch);
        out.push((file_name(kind), schema));
    }
    let any = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "converge document",
        "description": "Any converge/v1 document: Machine, VirtualMachine or Service.",
        "oneOf": branches,
        "$defs": defs,
    });
    out.push(("document.json", any));
    out
}

/// The schema of one kind, generated once per process: what `shape` walks
/// a document against.
pub fn of_kind(kind: Kind) -> &'static Value {
    static SCHEMAS: OnceLock<[Value; 3]> = OnceLock::new();
    let [machine, vm, service] = SCHEMAS.get_or_init(|| {
        [
            kind_schema::<MachineSpec>(Kind::Machine),
            kind_schema::<VmSpec>(Kind::VirtualMachine),
            kind_schema::<ServiceSpec>(Kind::Service),
        ]
    });
    match kind {
        Kind::Machine => machine,
        Kind::VirtualMachine => vm,
        Kind::Service => service,
    }
}

/// The file a kind's schema is written to.
pub fn file_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Machine => "machine.json",
        Kind::VirtualMachine => "virtualmachine.json",
        Kind::Service => "service.json",
    }
}

fn kind_schema<S: schemars::JsonSchema>(kind: Kind) -> Value {
    let schema = schemars::schema_for!(Document<S>);
    let mut value = schema.to_value();
    if let Some(o) = value.as_object_mut() {
        o.insert("title".into(), Value::String(kind.yaml_name().to_owned()));
        if let Some(Value::Object(props)) = o.get_mut("properties") {
            props.insert("apiVersion".into(), json!({"const": API_VERSION}));
            props.insert("kind".into(), json!({"const": kind.yaml_name()}));
        }
    }
    value
}

/// Serializes a schema the way it is committed: pretty, with a final newline.
pub fn render(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap_or_default();
    text.push('\n');
    text
}
