//! `converge vm ...`: operator verbs on VirtualMachines.
//!
//! `list`, `snapshots`, `snapshot` and `revert` ask a running daemon (which
//! serializes them with the VM's reconcile); without one they open the
//! store themselves, which proves nothing else reconciles meanwhile.
//! `console` attaches to the VM's serial port socket directly; `history` is
//! `converge history vm/NAME`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::Value;

use super::args::{DirArg, EXIT_FATAL, EXIT_OK, ONE_SHOT_SSH_PERSIST, Output, SshArgs, StateArg};
use crate::controller::context::VmLocks;
use crate::controller::vmops::{self, VmOp, VmOpOutcome};
use crate::driver::console::{Console, RawTerminal, SessionEnd};
use crate::spec::{HumanDuration, Name, ObjectKey};

/// Operate VMs: list them, attach to a console, snapshot and revert, stop,
/// start, restart and delete, show history.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge vm list\n  converge vm console builder\n  converge vm snapshot builder before-upgrade\n  converge vm revert builder before-upgrade\n  converge vm stop builder      # and keep it stopped\n  converge vm start builder\n  converge vm restart builder\n  converge vm delete builder\n  converge vm history builder"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Each VM: desired and observed state, resources, forwards, condition.
    #[command(
        after_help = "Examples:\n  converge vm list\n  converge vm list --output json | jq '.[] | select(.running)'"
    )]
    List(ListArgs),
    /// Attach to a running VM's serial console (detach with Ctrl-]).
    ///
    /// On a terminal the session is raw; with stdin from a pipe, what it
    /// reads is sent and the output printed until the guest is quiet for
    /// --quiet-for. `--log` prints what the guest wrote since it started.
    #[command(
        after_help = "Examples:\n  converge vm console builder          # Ctrl-] detaches\n  converge vm console builder --log    # what the guest printed since it started\n  echo uname -a | converge vm console builder"
    )]
    Console(ConsoleArgs),
    /// Take snapshot SNAP of every disk (with RAM and devices when running).
    #[command(after_help = "Examples:\n  converge vm snapshot builder before-upgrade")]
    Snapshot(SnapArgs),
    /// Revert every disk (and RAM when running) to snapshot SNAP.
    ///
    /// A running VM is only reverted to a snapshot taken while it ran.
    #[command(after_help = "Examples:\n  converge vm revert builder before-upgrade")]
    Revert(SnapArgs),
    /// List a VM's snapshots.
    #[command(
        after_help = "Examples:\n  converge vm snapshots builder\n  converge vm snapshots builder --output json"
    )]
    Snapshots(NameArgs),
    /// A VM's reconcile attempts, newest first (`converge history vm/NAME`).
    #[command(
        after_help = "Examples:\n  converge vm history builder\n  converge vm history builder --steps --limit 3"
    )]
    History(HistoryArgs),
    /// Stop a VM and keep it stopped: the VM object is suspended, so the
    /// loop does not start it again until `converge vm start NAME`.
    #[command(
        after_help = "Examples:\n  converge vm stop builder     # stays stopped until `converge vm start builder`"
    )]
    Stop(NameArgs),
    /// Let a stopped VM run again: resumes the VM object, and its reconcile
    /// starts it (at once with a daemon; at the next `reconcile --once`
    /// without).
    #[command(after_help = "Examples:\n  converge vm start builder")]
    Start(NameArgs),
    /// Restart a running VM: its next reconcile plans and records a
    /// `restart-vm` step (needs the daemon).
    #[command(
        after_help = "Examples:\n  converge vm restart builder\n  converge history vm/builder   # the restart-vm step"
    )]
    Restart(NameArgs),
    /// Stop a VM and delete its files, and its disks when its `onDelete`
    /// says `delete`, as removing its YAML would; the VM object is
    /// suspended so it is not created again while its YAML remains.
    #[command(
        after_help = "Examples:\n  converge vm delete builder   # then remove builder's YAML"
    )]
    Delete(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub state: StateArg,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The VM's name (metadata.name).
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
    /// Where relative `identityFile`/`knownHosts` of a hypervisor Machine
    /// resolve (used only without a daemon, for a VM on a hypervisor).
    #[command(flatten)]
    pub dir: DirArg,
    #[command(flatten)]
    pub ssh: SshArgs,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct SnapArgs {
    #[command(flatten)]
    pub vm: NameArgs,
    /// The snapshot's name: letters, digits, `.`, `_`, `-`; not all digits.
    pub snap: String,
}

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// The VM's name (metadata.name).
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
    /// Print the serial output since the VM started, then exit.
    #[arg(long)]
    pub log: bool,
    /// With stdin from a pipe: after it ends, exit once the guest has been
    /// quiet this long.
    #[arg(long, default_value = "2s")]
    pub quiet_for: HumanDuration,
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The VM's name (metadata.name).
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
    /// How many attempts.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Show each step's captured output.
    #[arg(long)]
    pub steps: bool,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    match args.command {
        VmCommand::List(a) => list(a),
        VmCommand::Console(a) => console(a),
        VmCommand::Snapshot(a) => operate(&a.vm, VmOp::Snapshot(a.snap)),
        VmCommand::Revert(a) => operate(&a.vm, VmOp::Revert(a.snap)),
        VmCommand::Snapshots(a) => operate(&a, VmOp::Snapshots),
        VmCommand::Stop(a) => operate(&a, VmOp::Stop),
        VmCommand::Start(a) => operate(&a, VmOp::Start),
        VmCommand::Restart(a) => operate(&a, VmOp::Restart),
        VmCommand::Delete(a) => operate(&a, VmOp::Delete),
        VmCommand::History(a) => {
            let name = parse_name(&a.name)?;
            super::inspect::history(super::inspect::HistoryArgs {
                key: ObjectKey::vm(name),
                state: a.state,
                limit: a.limit,
                steps: a.steps,
                output: a.output,
            })
        }
    }
}

fn parse_name(name: &str) -> anyhow::Result<Name> {
    Name::new(name).with_context(|| format!("VM name {name:?}"))
}

fn list(args: ListArgs) -> anyhow::Result<u8> {
    let rows: Vec<Value> = match super::args::ask(&args.state.state, "GET", "/v1/vm")? {
        Some((200, body)) => serde_json::from_str(&body).context("parse the daemon's answer")?,
        Some((status, body)) => anyhow::bail!("the daemon answered {status}: {}", body.trim()),
        None => crate::api::vm_rows(&super::inspect::open_existing_store(&args.state)?)?,
    };
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(EXIT_OK);
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let observed = match (r["running"].as_bool(), r["qmpStatus"].as_str()) {
                (Some(true), Some(q)) => q.to_owned(),
                (Some(true), None) => "running".to_owned(),
                (Some(false), _) => "stopped".to_owned(),
                (None, _) => "-".to_owned(),
            };
            let forwards = r["forwards"]
                .as_array()
                .map(|fs| {
                    fs.iter()
                        .map(|f| format!("{}->{}", text(&f["host"]), text(&f["guest"])))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "-".to_owned());
            let ready = match r["ready"].as_bool() {
                Some(true) => "True".to_owned(),
                Some(false) => format!("False ({})", text(&r["reason"])),
                None => "-".to_owned(),
            };
            vec![
                text(&r["name"]),
                text(&r["host"]),
                text(&r["state"]),
                observed,
                text(&r["pid"]),
                text(&r["cpus"]),
                text(&r["memory"]),
                forwards,
                ready,
            ]
        })
        .collect();
    super::table::write(
        &mut out,
        &[
            "NAME", "HOST", "DESIRED", "OBSERVED", "PID", "CPUS", "MEMORY", "FORWARDS", "READY",
        ],
        &table,
    )?;
    Ok(EXIT_OK)
}

/// How long a verb waits for the daemon: the VM's lock (a start or stop,
/// bounded by their timeouts) plus a QMP snapshot call (60 s), with margin.
const VERB_TIMEOUT: Duration = Duration::from_secs(180);

fn operate(args: &NameArgs, op: VmOp) -> anyhow::Result<u8> {
    let NameArgs {
        name,
        state,
        dir,
        ssh,
        output,
    } = args;
    let name = parse_name(name)?;
    if let VmOp::Snapshot(snap) | VmOp::Revert(snap) = &op {
        if let Err(e) = crate::driver::qemu::check_snapshot_name(snap) {
            eprintln!("error: {e}");
            return Ok(EXIT_FATAL);
        }
    }
    let path = match &op {
        VmOp::Snapshots => ("GET", format!("/v1/vm/{name}/snapshots")),
        VmOp::Snapshot(snap) => ("POST", format!("/v1/vm/{name}/snapshot/{snap}")),
        VmOp::Revert(snap) => ("POST", format!("/v1/vm/{name}/revert/{snap}")),
        VmOp::Stop => ("POST", format!("/v1/vm/{name}/power/stop")),
        VmOp::Start => ("POST", format!("/v1/vm/{name}/power/start")),
        VmOp::Restart => ("POST", format!("/v1/vm/{name}/power/restart")),
        VmOp::Delete => ("POST", format!("/v1/vm/{name}/power/delete")),
    };
    // Waiting for the VM's lock (a reconcile may be starting or stopping
    // it) and a `savevm`/`loadvm` of a large guest both take a while.
    let outcome: VmOpOutcome =
        match super::args::ask_within(&state.state, path.0, &path.1, VERB_TIMEOUT)? {
            Some((200, body)) => {
                serde_json::from_str(&body).context("parse the daemon's answer")?
            }
            Some((_, body)) => {
                eprintln!("error: {}", body.trim());
                return Ok(EXIT_FATAL);
            }
            None => {
                let store = super::inspect::open_existing_store(state)?;
                let vm_root = crate::controller::context::vm_root(&state.state);
                let runtime = super::args::runtime()?;
                let driver = ssh.driver(&state.state, &dir.dir, ONE_SHOT_SSH_PERSIST);
                let done = runtime.block_on(vmops::operate(
                    &driver,
                    &store,
                    &VmLocks::default(),
                    &vm_root,
                    None,
                    &name,
                    &op,
                ));
                store.flush().context("flush the store")?;
                match done {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        eprintln!("error: {:#}", anyhow::Error::new(e));
                        return Ok(EXIT_FATAL);
                    }
                }
            }
        };
    let mut out = std::io::stdout().lock();
    if *output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&outcome)?)?;
        return Ok(EXIT_OK);
    }
    if op != VmOp::Snapshots {
        writeln!(out, "{}", outcome.message)?;
    }
    if matches!(op, VmOp::Stop | VmOp::Start | VmOp::Restart | VmOp::Delete) {
        return Ok(EXIT_OK);
    }
    let rows: Vec<Vec<String>> = outcome
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                if s.with_ram { "disks+RAM" } else { "disks" }.to_owned(),
                s.disks.join(","),
                super::inspect::ms_ago(Some(s.taken_ms)),
            ]
        })
        .collect();
    if rows.is_empty() {
        writeln!(out, "vm/{name} has no snapshots")?;
    } else {
        super::table::write(&mut out, &["SNAPSHOT", "HOLDS", "DISKS", "TAKEN"], &rows)?;
    }
    Ok(EXIT_OK)
}

/// Ctrl-]: detaches a terminal session, as telnet does.
const DETACH: u8 = 0x1d;

/// The hypervisor Machine a VM runs on, when converge knows it and it is
/// not this host.
fn hypervisor_of(state: &StateArg, name: &Name) -> Option<String> {
    let rows: Vec<Value> = match super::args::ask(&state.state, "GET", "/v1/vm").ok()? {
        Some((200, body)) => serde_json::from_str(&body).ok()?,
        Some(_) => return None,
        None => crate::api::vm_rows(&super::inspect::open_existing_store(state).ok()?).ok()?,
    };
    rows.iter()
        .find(|r| r["name"] == name.as_str())
        .and_then(|r| r["host"].as_str())
        .filter(|h| *h != "local")
        .map(str::to_owned)
}

fn console(args: ConsoleArgs) -> anyhow::Result<u8> {
    let name = parse_name(&args.name)?;
    if let Some(host) = hypervisor_of(&args.state, &name) {
        eprintln!(
            "error: vm/{name} runs on hypervisor machine {host}, and `converge vm console` attaches to VMs of this host only; on {host}, its serial console is the socket STATEDIR/vms/{name}/console.sock and its output STATEDIR/vms/{name}/serial.log (STATEDIR is {host}'s stateDir), e.g. `ssh -t {host} socat -,raw,echo=0 UNIX-CONNECT:/var/lib/converge/vms/{name}/console.sock`"
        );
        return Ok(EXIT_FATAL);
    }
    let dir = crate::controller::context::vm_root(&args.state.state).join(name.as_str());
    let paths = crate::driver::qemu::launch::VmPaths::new(&dir);
    if args.log {
        let log = std::fs::read(&paths.serial_log).with_context(|| {
            format!(
                "read {} (has vm/{name} ever started here?)",
                paths.serial_log.display()
            )
        })?;
        std::io::stdout().lock().write_all(&log)?;
        return Ok(EXIT_OK);
    }
    let console = match Console::connect(&paths.console_socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "error: vm/{name} has no console to attach to at {} ({e}): it is not running here; `converge vm list` shows its state",
                paths.console_socket.display()
            );
            return Ok(EXIT_FATAL);
        }
    };
    if !std::io::stdin().is_terminal() {
        console
            .exchange(
                std::io::stdin(),
                &mut std::io::stdout().lock(),
                args.quiet_for.get(),
            )
            .context("the console connection")?;
        return Ok(EXIT_OK);
    }
    eprintln!("converge: attached to vm/{name}'s serial console; Ctrl-] detaches");
    let raw = RawTerminal::enter().context("put the terminal in raw mode (stty)")?;
    let end = console.attach(std::io::stdin(), std::io::stdout(), DETACH);
    drop(raw);
    match end.context("the console connection")? {
        SessionEnd::Closed => eprintln!("\nconverge: vm/{name}'s console closed (the VM stopped?)"),
        SessionEnd::Detached => eprintln!("\nconverge: detached from vm/{name}"),
    }
    Ok(EXIT_OK)
}
