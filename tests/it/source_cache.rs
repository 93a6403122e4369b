//! The source's parse cache: a reload parses only what changed, and never
//! misses a change.

use std::time::{Duration, SystemTime};

use converge::source::Source;
use converge::spec::Name;

use crate::support::desired::{render, write_dir};

fn machine(name: &str, interval: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: Machine
metadata: {{name: {name}}}
spec:
  target: {{host: {name}.lan}}
  build: {{nix: {{flake: \".#{name}\"}}}}
  interval: {interval}
"
    )
}

fn set_mtime(path: &std::path::Path, mtime: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(mtime))
        .expect("set a file's mtime");
}

fn interval_of(source: &mut Source, name: &str) -> String {
    let (assembled, _) = source.load().expect("load");
    let Some(desired) = &assembled.desired else {
        panic!("invalid: {}", render(&assembled));
    };
    let n = Name::new(name).expect("name");
    desired.machines[&n].spec.interval.value.to_string()
}

#[test]
fn a_reload_parses_only_the_file_that_changed() {
    let files: Vec<(String, String)> = (0..10)
        .map(|i| (format!("m{i}.yaml"), machine(&format!("m{i}"), "5m")))
        .collect();
    let dir = write_dir(&files);
    // Files of a checkout are usually older than the last load.
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for (path, _) in &files {
        set_mtime(&dir.path().join(path), an_hour_ago);
    }
    let mut source = Source::new(dir.path());
    let (_, first) = source.load().expect("load");
    assert_eq!((first.files, first.parsed, first.reused), (10, 10, 0));
    let (_, again) = source.load().expect("load");
    assert_eq!((again.files, again.parsed, again.reused), (10, 0, 10));

    std::fs::write(dir.path().join("m3.yaml"), machine("m3", "10m")).expect("write");
    assert_eq!(interval_of(&mut source, "m3"), "10m");
    std::fs::remove_file(dir.path().join("m4.yaml")).expect("remove");
    std::fs::write(dir.path().join("new.yaml"), machine("m10", "1m")).expect("write");
    let (assembled, stats) = source.load().expect("load");
    let desired = assembled.desired.expect("valid");
    assert_eq!(desired.machines.len(), 10);
    assert!(!desired.machines.contains_key("m4"));
    assert!(desired.machines.contains_key("m10"));
    // new.yaml is new; m3.yaml was modified moments ago, so it is read again
    // (see the next test); the eight old files are reused.
    assert_eq!((stats.files, stats.reused), (10, 8), "{stats:?}");
}

#[test]
fn a_same_size_rewrite_within_one_timestamp_tick_is_not_missed() {
    // On filesystems with coarse timestamps (ext4 before Linux 6.13 ticks per
    // jiffy, FAT every 2 s), two writes of the same size in one tick leave
    // size, mtime and inode unchanged. Setting the old mtime back reproduces
    // that deterministically.
    let dir = write_dir(&[("m.yaml", machine("web1", "5m"))]);
    let path = dir.path().join("m.yaml");
    let mut source = Source::new(dir.path());
    assert_eq!(interval_of(&mut source, "web1"), "5m");
    let before = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(&path, machine("web1", "7m")).expect("rewrite in place");
    set_mtime(&path, before);
    assert_eq!(interval_of(&mut source, "web1"), "7m");
}
