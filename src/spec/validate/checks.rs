//! Checks of one object on its own: ranges of sizes and durations, fields
//! that exclude or need each other, paths that climb out of the
//! desired-state directory (checked lexically: nothing is read), the order
//! of a service's roles. Each check appends every diagnostic it finds rather
//! than stopping at the first. They must not look at any other object: the
//! checks across objects are in `references`, `resolution` and `assemble`.

use std::collections::BTreeMap;
use std::path::Path;

use super::cycle::find_cycle;
use crate::spec::at::{At, Loc};
use crate::spec::diagnostic::{Diagnostic, Origin};
use crate::spec::fields::SpecPath;
use crate::spec::model::{
    BuildOn, Document, MachineSpec, NetworkMode, Protocol, ServiceSpec, VmSpec,
};
use crate::spec::names::Name;
use crate::spec::quantity::{ByteSize, HumanDuration};

/// Name no Machine may take: `host: local` of a VM means the controller's host.
const RESERVED_MACHINE_NAME: &str = "local";

/// An error at the value's location unless `min <= value <= max`.
fn check_range<T: PartialOrd + std::fmt::Display>(
    origin: &Origin,
    v: &At<T>,
    field: &str,
    min: T,
    max: T,
    diags: &mut Vec<Diagnostic>,
) {
    if v.value < min || v.value > max {
        diags.push(origin.error(
            v.loc,
            format!("{field} {} is out of range: use {min} to {max}", v.value),
        ));
    }
}

fn check_path(
    root: &Path,
    origin: &Origin,
    path: &At<SpecPath>,
    field: &str,
    diags: &mut Vec<Diagnostic>,
) {
    if path.value.resolve(root).is_none() {
        diags.push(origin.error(
            path.loc,
            format!(
                "{field} `{}` climbs out of the desired-state directory: keep relative paths inside it, or write an absolute path",
                path.value
            ),
        ));
    }
}

pub(super) fn check_machine(
    root: &Path,
    doc: &Document<MachineSpec>,
    origin: &Origin,
    diags: &mut Vec<Diagnostic>,
) {
    let name = &doc.metadata.name;
    if name.value.as_str() == RESERVED_MACHINE_NAME {
        diags.push(origin.error(
            name.loc,
            "machine name `local` is reserved (a VM's `host: local` means the controller's host): choose another name",
        ));
    }
    let spec = &doc.spec;
    let t = &spec.target;
    match (&t.local, &t.host) {
        (Some(local), Some(host)) if local.value => diags.push(origin.error(
            host.loc,
            "target sets both `local: true` and `host`: a machine is either the controller's own host or an SSH host",
        )),
        (Some(local), None) if !local.value => diags.push(origin.error(
            local.loc,
            "target has `local: false` and no `host`: give the SSH `host`, or set `local: true`",
        )),
        (None, None) => diags.push(origin.error(
            doc.metadata.name.loc,
            "target has neither `host` nor `local: true`: set `host: …` for an SSH host or `local: true` for the controller's own host",
        )),
        _ => {}
    }
    if t.is_local() {
        let ssh_only = [
            t.user.as_ref().map(|v| v.loc),
            t.port.as_ref().map(|v| v.loc),
            t.host_key.as_ref().map(|v| v.loc),
            t.known_hosts.as_ref().map(|v| v.loc),
            t.identity_file.as_ref().map(|v| v.loc),
            t.sudo.as_ref().map(|v| v.loc),
        ];
        for loc in ssh_only.into_iter().flatten() {
            diags.push(origin.error(
                loc,
                "SSH settings (user, port, hostKey, knownHosts, identityFile, sudo) do not apply to a `local: true` target: remove them",
            ));
        }
    }
    if let Some(sudo) = t.sudo.as_ref().filter(|s| s.value) {
        if !t.is_local() && t.user.as_ref().is_none_or(|u| u.value.as_str() == "root") {
            diags.push(origin.error(
                sudo.loc,
                "`sudo: true` with the root login does nothing: set `user` to the login that uses sudo, or remove `sudo`",
            ));
        }
    }
    for path in [&t.known_hosts, &t.identity_file].into_iter().flatten() {
        check_path(root, origin, path, "path", diags);
    }

    let build = &spec.build;
    match (&build.command, &build.nix) {
        (Some(_), Some(nix)) => diags.push(origin.error(
            nix.loc,
            "build sets both `command` and `nix`: choose one",
        )),
        (None, None) => diags.push(origin.error(
            doc.metadata.name.loc,
            "build has neither `command` nor `nix`: set `command: [\"./build.sh\"]` or `nix: {flake: \".#name\"}`",
        )),
        _ => {}
    }
    if let Some(command) = &build.command {
        match command.value.first() {
            None => diags.push(origin.error(
                command.loc,
                "build command is empty: give an argv like [\"./build.sh\"]",
            )),
            Some(program) if program.is_empty() => {
                diags.push(origin.error(command.loc, "build command's program is an empty string"));
            }
            Some(program) if program.contains('/') => {
                let as_path = SpecPath::new(program);
                if let Ok(p) = as_path {
                    check_path(
                        root,
                        origin,
                        &At::new(p, command.loc),
                        "build program",
                        diags,
                    );
                }
            }
            Some(_) => {}
        }
    }
    if let Some(nix) = &build.nix {
        if nix.value.flake.trim().is_empty() {
            diags.push(origin.error(nix.loc, "nix build has an empty `flake` reference"));
        }
        let flake =
            crate::spec::flake::resolve(&nix.value.flake, doc.metadata.name.value.as_str(), root);
        if !nix.value.flake.trim().is_empty() && !flake.in_directory {
            diags.push(origin.error(
                nix.loc,
                format!(
                    "nix flake `{}` is outside the desired-state directory, which is not supported by this converge yet: evaluation is cached by the directory's content, so a change of that flake would never be seen; refer to a flake in the directory (`.#name`) and pin other flakes as its inputs (flake.lock)",
                    flake.flake
                ),
            ));
        }
        if nix.value.build_on == BuildOn::Target {
            diags.push(origin.error(
                nix.loc,
                "nix builds with `buildOn: target` are not supported by this converge yet: use `buildOn: controller` (the default), which builds here and copies the closure",
            ));
        }
        if let Some(sudo) = spec.target.sudo.as_ref().filter(|s| s.value) {
            diags.push(origin.error(
                sudo.loc,
                "a NixOS machine with `sudo: true` is not supported by this converge yet: its closure is copied with `nix copy` as the login, which a target's Nix accepts only from root or a trusted user; log in as root, or without sudo as a user in the target's `trusted-users`",
            ));
        }
    }
    let day = HumanDuration::from_secs(86_400);
    check_range(
        origin,
        &build.timeout,
        "build timeout",
        HumanDuration::from_secs(1),
        day,
        diags,
    );
    let act = &spec.activation;
    check_range(
        origin,
        &act.timeout,
        "activation timeout",
        HumanDuration::from_secs(1),
        day,
        diags,
    );
    check_range(
        origin,
        &act.confirm_timeout,
        "confirm timeout",
        HumanDuration::from_secs(1),
        HumanDuration::from_secs(3600),
        diags,
    );
    for check in &act.health_checks {
        if check.exec.value.first().is_none_or(String::is_empty) {
            diags.push(origin.error(check.exec.loc, "health check `exec` is empty: give an argv like [\"systemctl\", \"is-system-running\"]"));
        }
        check_range(
            origin,
            &check.timeout,
            "health check timeout",
            HumanDuration::from_millis(100),
            HumanDuration::from_secs(3600),
            diags,
        );
    }
    check_range(
        origin,
        &spec.interval,
        "interval",
        HumanDuration::from_secs(1),
        HumanDuration::from_secs(30 * 86_400),
        diags,
    );
}

pub(super) fn check_vm(
    root: &Path,
    doc: &Document<VmSpec>,
    origin: &Origin,
    diags: &mut Vec<Diagnostic>,
) {
    let spec = &doc.spec;
    if spec.cpus.value == 0 || spec.cpus.value > 256 {
        diags.push(origin.error(
            spec.cpus.loc,
            format!("cpus {} is out of range: use 1 to 256", spec.cpus.value),
        ));
    }
    check_range(
        origin,
        &spec.memory,
        "memory",
        ByteSize::from_bytes(16 * ByteSize::MIB),
        ByteSize::from_bytes(4 * ByteSize::TIB),
        diags,
    );
    let mut disk_names: BTreeMap<&Name, Loc> = BTreeMap::new();
    for disk in &spec.disks {
        if let Some(first) = disk_names.insert(&disk.name.value, disk.name.loc) {
            diags.push(
                origin
                    .error(
                        disk.name.loc,
                        format!("duplicate disk name `{}` in this VM", disk.name.value),
                    )
                    .with_related(origin.related(first, "first defined")),
            );
        }
        check_range(
            origin,
            &disk.size,
            "disk size",
            ByteSize::from_bytes(ByteSize::MIB),
            ByteSize::from_bytes(64 * ByteSize::TIB),
            diags,
        );
        if let Some(image) = &disk.backing_image {
            check_path(root, origin, image, "backing image", diags);
        }
    }
    if let Some(boot) = &spec.boot {
        check_path(root, origin, &boot.kernel, "kernel", diags);
        if let Some(initrd) = &boot.initrd {
            check_path(root, origin, initrd, "initrd", diags);
        }
    }
    let net = &spec.network;
    match net.mode.value {
        NetworkMode::User => {
            if let Some(bridge) = &net.bridge {
                diags.push(origin.error(
                    bridge.loc,
                    "`bridge` needs `mode: bridge`: remove it or set the mode",
                ));
            }
        }
        NetworkMode::Bridge => {
            if net.bridge.is_none() {
                diags.push(origin.error(
                    net.mode.loc,
                    "network mode `bridge` needs `bridge: <interface>`",
                ));
            }
            if let Some(forward) = net.forwards.first() {
                diags.push(origin.error(
                    forward.host.loc,
                    "`forwards` need `mode: user`: a bridged VM is reached at its own address",
                ));
            }
        }
    }
    let mut seen: BTreeMap<(u16, Protocol), Loc> = BTreeMap::new();
    for forward in &net.forwards {
        if let Some(first) = seen.insert(
            (forward.host.value.get(), forward.protocol),
            forward.host.loc,
        ) {
            diags.push(
                origin
                    .error(
                        forward.host.loc,
                        format!(
                            "host port {} is forwarded twice in this VM",
                            forward.host.value
                        ),
                    )
                    .with_related(origin.related(first, "first forwarded")),
            );
        }
    }
    for arg in &spec.extra_args {
        if arg.value.contains('\0') {
            diags.push(origin.error(arg.loc, "extra argument contains a NUL byte"));
        }
    }
}

pub(super) fn check_service(
    doc: &Document<ServiceSpec>,
    origin: &Origin,
    diags: &mut Vec<Diagnostic>,
) {
    let spec = &doc.spec;
    if spec.roles.is_empty() {
        diags.push(origin.error(
            doc.metadata.name.loc,
            "service has no roles: give at least one, like `roles: {server: {machines: [nas]}}`",
        ));
    }
    for (role_name, role) in &spec.roles {
        if role.machines.is_empty() && role.tags.is_empty() {
            diags.push(origin.warning(
                role_name.loc,
                format!(
                    "role `{}` selects no machines: give `machines` or `tags`",
                    role_name.value
                ),
            ));
        }
        for earlier in &role.after {
            if earlier.value == role_name.value {
                diags.push(origin.error(
                    earlier.loc,
                    format!("role `{}` cannot come after itself", role_name.value),
                ));
            } else if !spec.roles.contains_key(&earlier.value) {
                diags.push(origin.error(
                    earlier.loc,
                    format!(
                        "role `{}` comes after `{}`, which is not a role of this service",
                        role_name.value, earlier.value
                    ),
                ));
            }
        }
    }
    // Cycles among roles of this service (self-loops are reported above).
    if let Some(cycle) = find_cycle(spec.roles.iter().map(|(name, role)| {
        (
            name.value.clone(),
            role.after
                .iter()
                .map(|a| a.value.clone())
                .filter(|a| *a != name.value)
                .collect(),
        )
    })) {
        let first = &cycle[0];
        let loc = spec
            .roles
            .get(first)
            .and_then(|r| r.after.first().map(|a| a.loc))
            .unwrap_or(Loc::UNKNOWN);
        let path: Vec<&str> = cycle
            .iter()
            .map(Name::as_str)
            .chain([first.as_str()])
            .collect();
        diags.push(origin.error(
            loc,
            format!(
                "roles wait for each other in a cycle: {}; remove one `after`",
                path.join(" -> ")
            ),
        ));
    }
}
