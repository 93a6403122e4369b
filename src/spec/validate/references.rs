//! Checks of the VMs against the rest of the directory: a VM's host and its
//! machine must be Machines of the directory, a machine lives in at most one
//! VM and does not host the VM it runs in, and a host port is forwarded by
//! at most one VM per host. It must not check a VM alone (that is `checks`)
//! or the roles of services (`resolution`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::spec::at::Loc;
use crate::spec::desired::Object;
use crate::spec::diagnostic::Diagnostic;
use crate::spec::model::{MachineSpec, Protocol, VmHost, VmSpec};
use crate::spec::names::Name;

pub(super) fn check_vm_references(
    machines: &BTreeMap<Name, Arc<Object<MachineSpec>>>,
    vms: &BTreeMap<Name, Arc<Object<VmSpec>>>,
    diags: &mut Vec<Diagnostic>,
) {
    let mut hosted: BTreeMap<&Name, (&Object<VmSpec>, Loc)> = BTreeMap::new();
    // (hypervisor, host port, protocol) -> the VM that forwards it first.
    type Slot<'a> = (Option<&'a Name>, u16, Protocol);
    let mut forwards: BTreeMap<Slot<'_>, (&Object<VmSpec>, Loc)> = BTreeMap::new();
    for vm in vms.values().map(Arc::as_ref) {
        let spec = &vm.spec;
        if let VmHost::Machine(host) = &spec.host.value {
            match machines.get(host) {
                None => diags.push(vm.origin.error(spec.host.loc, format!("VM host `{host}` is not a Machine in this directory: name a Machine, or use `local`"))),
                // The agent and a VM's files live under the state
                // directory, named by absolute paths on the hypervisor.
                Some(machine) if machine.spec.target.state_dir().starts_with("~/") => {
                    diags.push(vm.origin.error(spec.host.loc, format!("VM host `{host}` logs in without root and keeps its state in its home by default: give Machine `{host}` an absolute `stateDir` it can write, or `sudo: true`")));
                }
                Some(_) => {}
            }
        }
        if let Some(inner) = &spec.machine {
            if !machines.contains_key(&inner.value) {
                diags.push(vm.origin.error(
                    inner.loc,
                    format!(
                        "VM's machine `{}` is not a Machine in this directory",
                        inner.value
                    ),
                ));
            } else if let Some((other, other_loc)) = hosted.insert(&inner.value, (vm, inner.loc)) {
                diags.push(
                    vm.origin
                        .error(inner.loc, format!("machine `{}` is already the machine of VM `{}`: a machine lives in one VM", inner.value, other.key.name))
                        .with_related(other.origin.related(other_loc, "claimed")),
                );
            }
            if let VmHost::Machine(host) = &spec.host.value {
                if *host == inner.value {
                    diags.push(
                        vm.origin
                            .error(inner.loc, "a VM cannot host the machine it runs on"),
                    );
                }
            }
        }
        let host_key = match &spec.host.value {
            VmHost::Local => None,
            VmHost::Machine(m) => Some(m),
        };
        for forward in &spec.network.forwards {
            let slot = (host_key, forward.host.value.get(), forward.protocol);
            if let Some((other, other_loc)) = forwards.get(&slot) {
                if other.key != vm.key {
                    diags.push(
                        vm.origin
                            .error(forward.host.loc, format!("host port {} is already forwarded by VM `{}` on the same host: choose another port", forward.host.value, other.key.name))
                            .with_related(other.origin.related(*other_loc, "first forwarded")),
                    );
                }
            } else {
                forwards.insert(slot, (vm, forward.host.loc));
            }
        }
    }
}
