//! A VM's serial console, client side: the connection to the socket QEMU
//! serves it on, an interactive session (the terminal in raw mode, a detach
//! key) and a piped exchange (send input, read until the guest is quiet).
//! The caller gives where input comes from and where output goes; this file
//! decides nothing about what to print.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How an interactive session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The user pressed the detach key, or input ended.
    Detached,
    /// The VM's side closed (QEMU exited).
    Closed,
}

/// A connection to a VM's serial console.
#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
}

impl Console {
    /// Connects to the console socket; fails when the VM does not run here.
    pub fn connect(socket: &Path) -> io::Result<Console> {
        Ok(Console {
            stream: UnixStream::connect(socket)?,
        })
    }

    /// Copies `input` to the guest and the guest's output to `output` until
    /// `detach` is read from input, input ends, or the guest's side closes.
    /// Put the terminal in raw mode first ([`RawTerminal`]).
    pub fn attach(
        self,
        input: impl Read + Send + 'static,
        output: impl Write + Send + 'static,
        detach: u8,
    ) -> io::Result<SessionEnd> {
        let to = self.stream.try_clone()?;
        let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
        let from = self.stream;
        std::thread::spawn(move || {
            copy_until_closed(from, output);
            let _ = closed_tx.send(());
        });
        let sender = std::thread::spawn(move || -> io::Result<()> {
            let mut to = to;
            let mut input = input;
            let mut buf = [0u8; 1024];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                let chunk = &buf[..n];
                if let Some(at) = chunk.iter().position(|&b| b == detach) {
                    let _ = to.write_all(&chunk[..at]);
                    let _ = to.shutdown(Shutdown::Both);
                    return Ok(());
                }
                to.write_all(chunk)?;
            }
        });
        loop {
            if sender.is_finished() {
                return sender
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the input thread panicked")))
                    .map(|()| SessionEnd::Detached);
            }
            if closed.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(SessionEnd::Closed);
            }
        }
    }

    /// Sends all of `input` to the guest and copies the guest's output to
    /// `output`; returns once input ended and the guest was quiet for
    /// `quiet_for`, or its side closed.
    pub fn exchange(
        self,
        input: impl Read + Send + 'static,
        output: &mut impl Write,
        quiet_for: Duration,
    ) -> io::Result<()> {
        let mut to = self.stream.try_clone()?;
        let sender = std::thread::spawn(move || {
            let mut input = input;
            let _ = io::copy(&mut input, &mut to);
        });
        let mut from = self.stream;
        from.set_read_timeout(Some(quiet_for.max(Duration::from_millis(10))))?;
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    output.write_all(&buf[..n])?;
                    output.flush()?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if sender.is_finished() {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        Ok(())
    }
}

/// Copies the socket to `output` until it closes.
fn copy_until_closed(mut from: UnixStream, mut output: impl Write) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if output
                    .write_all(&buf[..n])
                    .and_then(|()| output.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

/// The terminal on stdin in raw mode; its settings before are restored when
/// dropped, on every path out of the session.
#[derive(Debug)]
pub struct RawTerminal {
    saved: String,
}

impl RawTerminal {
    pub fn enter() -> io::Result<RawTerminal> {
        let saved = stty(&["-g"])?;
        stty(&["raw", "-echo"])?;
        Ok(RawTerminal {
            saved: saved.trim().to_owned(),
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = stty(&[&self.saved]);
    }
}

fn stty(args: &[&str]) -> io::Result<String> {
    let out = Command::new("stty")
        .args(args)
        .stdin(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "stty {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
