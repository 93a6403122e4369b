//! The committed JSON Schemas are what the model generates, and every example
//! file points its editor at one of them.

use std::path::{Path, PathBuf};

use converge::spec::schema;

use crate::support::desired::manifest_dir;

#[test]
fn committed_schemas_match_the_model() {
    let dir = manifest_dir().join("schemas");
    let mut stale = Vec::new();
    for (name, value) in schema::all() {
        let path = dir.join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != schema::render(&value) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/{{{}}} differ from the model: run `cargo run -- schema --out schemas` and commit the result",
        stale.join(",")
    );
    // No schema file is left over from a kind that no longer exists.
    let expected: Vec<&str> = schema::all().into_iter().map(|(name, _)| name).collect();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("schemas/ exists")
        .map(|e| {
            e.expect("read schemas/")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    present.sort();
    let mut expected_sorted: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    expected_sorted.sort();
    assert_eq!(
        present, expected_sorted,
        "schemas/ holds other files than the generated ones: run `cargo run -- schema --out schemas`"
    );
}

#[test]
fn every_schema_names_each_kind_and_the_api_version() {
    let all = schema::all();
    for (name, value) in &all {
        assert_eq!(
            value["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
    }
    let kinds: Vec<(&str, &str)> = vec![
        ("machine.json", "Machine"),
        ("virtualmachine.json", "VirtualMachine"),
        ("service.json", "Service"),
    ];
    for (file, kind) in kinds {
        let (_, value) = all
            .iter()
            .find(|(name, _)| *name == file)
            .unwrap_or_else(|| panic!("no schema {file}"));
        assert_eq!(value["properties"]["kind"]["const"], kind, "{file}");
        assert_eq!(
            value["properties"]["apiVersion"]["const"], "converge/v1",
            "{file}"
        );
        assert_eq!(
            value["additionalProperties"], false,
            "{file}: unknown fields must be rejected"
        );
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read an examples directory") {
        let path = entry.expect("read an examples directory").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_file_points_at_an_existing_schema() {
    let mut files = Vec::new();
    yaml_files(&manifest_dir().join("examples"), &mut files);
    assert!(
        files.len() >= 10,
        "found only {} example files",
        files.len()
    );
    const PREFIX: &str = "# yaml-language-server: $schema=";
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read an example");
        let first = text.lines().next().unwrap_or_default();
        let target = first.strip_prefix(PREFIX).unwrap_or_else(|| {
            panic!(
                "{}: the first line must be `{PREFIX}<relative path to schemas/document.json>`, is {first:?}",
                file.display()
            )
        });
        let schema = file.parent().expect("a file has a parent").join(target);
        let schema = schema
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: schema {target} does not exist: {e}", file.display()));
        let schemas_dir = manifest_dir()
            .join("schemas")
            .canonicalize()
            .expect("schemas/ exists");
        assert_eq!(
            schema.parent(),
            Some(schemas_dir.as_path()),
            "{}: {target} is not in schemas/",
            file.display()
        );
    }
}
