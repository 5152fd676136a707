//! QMP, QEMU's machine protocol: JSON commands and replies plus asynchronous events on
//! one unix socket (`-qmp unix:PATH,server=on,wait=off`).
//!
//! Every command carries a fresh numeric `id` and its reply is matched by that id, so
//! events (which QEMU may send before, between or after replies) are never mistaken for
//! a reply; they are queued for [`Qmp::take_events`] / [`Qmp::wait_event`].
//!
//! A timeout while a reply is outstanding, an I/O error or a malformed reply marks the
//! connection broken: later calls fail with [`Error::Broken`]. The command that timed
//! out may still run (or be running) inside QEMU, so its effect is unknown; reconnecting
//! (QEMU accepts a new client once the old socket is closed) and re-querying state is
//! the only safe way on. A [`Qmp::wait_event`] timeout does not break the connection:
//! no reply was outstanding.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::conn::{LineConn, deadline_after, excerpt, remaining};
use crate::{Error, Result, fmt_duration};

/// Per-command timeout until [`Qmp::set_timeout`] changes it. QMP commands run in
/// QEMU's main loop and normally answer in milliseconds; 30 s only trips when QEMU is
/// stuck (e.g. on hung storage).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Events kept for [`Qmp::take_events`]; older ones are dropped first (and counted in
/// [`Qmp::dropped_events`]) so that a caller that never looks at events cannot make the
/// queue grow without bound (a running backup job emits several events per second).
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// Pause between connection attempts while the socket does not exist yet or refuses,
/// and between polls in the `*_and_wait` helpers.
const POLL: Duration = Duration::from_millis(10);

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunState {
    /// True while the guest CPUs run.
    pub running: bool,
    /// QEMU's run state: "running", "paused", "prelaunch", "shutdown", ...
    pub status: String,
}

/// One `query-block` entry with a medium inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// BlockBackend name: the `id` of `-drive`; "" for a device attached to a
    /// `-blockdev` node.
    pub device: String,
    /// The guest device's qdev id or QOM path; `None` when no device uses the drive
    /// (`-drive if=none` without `-device`).
    pub qdev: Option<String>,
    /// Node name of the BlockBackend's root. While a backup job runs this is QEMU's
    /// copy-before-write filter (an auto-generated `#blockNNN`), not the disk's node.
    pub node_name: String,
    /// Image file name as QEMU reports it.
    pub file: String,
    /// Driver of the root node ("qcow2", "raw", "copy-before-write", ...).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    pub read_only: bool,
}

/// A named dirty bitmap of a block node (`query-named-block-nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Bitmap {
    pub name: String,
    /// Bytes covered by one bit.
    pub granularity: u32,
    /// Dirty bytes.
    pub count: u64,
    /// True while writes are recorded (false once disabled).
    pub recording: bool,
    /// True while an operation (e.g. a backup job or an export) uses the bitmap.
    pub busy: bool,
    /// Stored in the qcow2 image when QEMU closes it.
    pub persistent: bool,
    /// Loaded from an image that was not closed cleanly: its content cannot be trusted
    /// (QEMU omits the field when false).
    #[serde(default)]
    pub inconsistent: bool,
}

/// A QMP connection.
pub struct Qmp {
    conn: LineConn,
    version: (u32, u32, u32),
    next_id: u64,
    timeout: Duration,
    events: VecDeque<Value>,
    dropped_events: u64,
    /// Why the connection may no longer be used.
    broken: Option<String>,
}

/// What one line from QEMU is.
#[derive(Debug, PartialEq)]
enum Message {
    /// A (repeated) greeting. QEMU can send its greeting twice to a client that
    /// connects while the monitor is still starting up (seen under load in CI): the
    /// copy carries nothing new and is skipped.
    Greeting,
    Event(Value),
    Reply {
        id: Option<Value>,
        result: std::result::Result<Value, (String, String)>,
    },
}

impl Qmp {
    /// Connects (retrying ENOENT/ECONNREFUSED until `timeout`), reads the greeting, sends
    /// qmp_capabilities. All of it must finish within `timeout`.
    ///
    /// Retrying lets a caller start QEMU and connect right away, without racing QEMU's
    /// creation of the socket. QEMU serves one client per QMP socket: while another
    /// client is connected the kernel still accepts the connection but no greeting comes,
    /// which is reported as [`Error::Timeout`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = deadline_after(timeout);
        let label = path.display().to_string();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    match remaining(deadline) {
                        Some(left) => thread::sleep(left.min(POLL)),
                        None => {
                            return Err(Error::Io {
                                what: format!(
                                    "{label}: connect (retried for {})",
                                    fmt_duration(timeout)
                                ),
                                source: e,
                            });
                        }
                    }
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: format!("{label}: connect"),
                        source: e,
                    });
                }
            }
        };
        Self::handshake(LineConn::new(stream, label), deadline, timeout)
    }

    /// Reads the greeting and leaves capabilities negotiation mode.
    fn handshake(mut conn: LineConn, deadline: Instant, timeout: Duration) -> Result<Qmp> {
        let waiting = format!(
            "no QMP greeting within {} (QEMU serves one client per QMP socket: is another one connected?)",
            fmt_duration(timeout)
        );
        // QEMU can write an event (a RESUME as the guest starts) to a client that
        // connects while the monitor is still starting up, before its greeting (seen in
        // CI): such events are kept, in order, and the greeting is still required.
        let mut early = Vec::new();
        let (line, greeting) = loop {
            let line = conn.read_line(deadline, &waiting)?;
            let v = parse_line(&line, conn.label())?;
            if v.get("event").is_some_and(Value::is_string) && early.len() < MAX_QUEUED_EVENTS {
                early.push(v);
                continue;
            }
            break (line, v);
        };
        let version = parse_greeting(&greeting).map_err(|m| {
            Error::Protocol(format!(
                "{}: not a QMP greeting ({m}): {}",
                conn.label(),
                excerpt(&line)
            ))
        })?;
        let mut qmp = Qmp {
            conn,
            version,
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            events: VecDeque::from(early),
            dropped_events: 0,
            broken: None,
        };
        qmp.execute_before("qmp_capabilities", Value::Null, deadline, timeout)?;
        Ok(qmp)
    }

    /// QEMU's version (major, minor, micro) from the greeting.
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    /// The pid of the QEMU process serving this monitor (`SO_PEERCRED`), e.g. to wait
    /// for it to exit after `quit` or to read how it was started from `/proc`.
    pub fn peer_pid(&self) -> Result<u32> {
        self.conn.peer_pid().map_err(|source| Error::Io {
            what: format!("{}: SO_PEERCRED", self.conn.label()),
            source,
        })
    }

    /// `quit`: QEMU flushes and closes its images and exits. Its reply may be lost
    /// when QEMU closes the socket first, so a broken connection afterwards is not a
    /// failure: callers wait for the process to exit instead.
    pub fn quit(&mut self) -> Result<()> {
        match self.execute("quit", Value::Null) {
            Ok(_) => Ok(()),
            Err(Error::Io { .. } | Error::Broken(_) | Error::Protocol(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets the per-command timeout of [`Qmp::execute`] and the typed helpers.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Whether an earlier failure made the connection unusable, and why.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Sends {"execute":cmd,"arguments":args,"id":N}; waits for the reply with that id
    /// (each command gets a fresh id); asynchronous events arriving meanwhile are queued
    /// (see `take_events`). Per-call timeout (default 30 s, `set_timeout`).
    ///
    /// `args` [`Value::Null`] sends no arguments. Returns the reply's "return" value; a
    /// QMP error reply becomes [`Error::Command`] (and leaves the connection usable).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let timeout = self.timeout;
        self.execute_before(cmd, args, deadline_after(timeout), timeout)
    }

    fn execute_before(
        &mut self,
        cmd: &str,
        args: Value,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value> {
        if let Some(why) = &self.broken {
            return Err(Error::Broken(why.clone()));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let result = self.round_trip(cmd, args, id, deadline, timeout);
        if let Err(e) = &result
            && e.desynchronises()
        {
            self.broken = Some(e.to_string());
        }
        result
    }

    fn round_trip(
        &mut self,
        cmd: &str,
        args: Value,
        id: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value> {
        let request = encode_request(cmd, args, id)?;
        self.conn
            .write_all(&request, deadline, &format!("sending '{cmd}'"))?;
        let waiting = format!("no reply to '{cmd}' within {}", fmt_duration(timeout));
        loop {
            let line = self.conn.read_line(deadline, &waiting)?;
            match classify(parse_line(&line, self.conn.label())?) {
                Err(m) => {
                    return Err(Error::Protocol(format!(
                        "{}: {m} (waiting for '{cmd}'): {}",
                        self.conn.label(),
                        excerpt(&line)
                    )));
                }
                Ok(Message::Event(ev)) => self.queue_event(ev),
                Ok(Message::Greeting) => {}
                // Not ours: a reply to an earlier request. Cannot happen while every
                // desynchronising failure breaks the connection, but a stale reply must
                // never be taken for this one.
                Ok(Message::Reply { id: Some(got), .. }) if got != json!(id) => {}
                // Ours, or (no id) QEMU rejected the request before reading its id;
                // commands are answered in order, so that reply is ours too.
                Ok(Message::Reply { result, .. }) => {
                    return result.map_err(|(class, desc)| Error::Command {
                        command: cmd.to_string(),
                        class,
                        desc,
                    });
                }
            }
        }
    }

    fn queue_event(&mut self, ev: Value) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_events = self.dropped_events.saturating_add(1);
        }
        self.events.push_back(ev);
    }

    /// Returns (and forgets) the events received so far, oldest first. Each is QEMU's
    /// whole event object: {"event":NAME,"data":{..},"timestamp":{..}}.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Events dropped because the queue was full ([`MAX_QUEUED_EVENTS`]).
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Waits up to `timeout` for an event named `name` (checking queued ones first) whose
    /// "data" satisfies `pred` (an event without data is passed [`Value::Null`]).
    /// Returns the whole event and removes it from the queue; other events stay queued.
    ///
    /// Polls nothing: only reads what QEMU sends. A timeout here leaves the connection
    /// usable, since no reply was outstanding.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(why) = &self.broken {
            return Err(Error::Broken(why.clone()));
        }
        let matches = |ev: &Value| {
            ev.get("event").and_then(Value::as_str) == Some(name)
                && pred(ev.get("data").unwrap_or(&Value::Null))
        };
        if let Some(pos) = self.events.iter().position(&matches)
            && let Some(ev) = self.events.remove(pos)
        {
            return Ok(ev);
        }
        let deadline = deadline_after(timeout);
        let waiting = format!("no {name} event within {}", fmt_duration(timeout));
        loop {
            let line = match self.conn.read_line(deadline, &waiting) {
                Ok(line) => line,
                Err(e @ Error::Timeout(_)) => return Err(e),
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            };
            let msg = parse_line(&line, self.conn.label()).and_then(|v| {
                classify(v).map_err(|m| {
                    Error::Protocol(format!(
                        "{}: {m} (waiting for event {name}): {}",
                        self.conn.label(),
                        excerpt(&line)
                    ))
                })
            });
            match msg {
                Ok(Message::Event(ev)) if matches(&ev) => return Ok(ev),
                Ok(Message::Event(ev)) => self.queue_event(ev),
                Ok(Message::Greeting) | Ok(Message::Reply { .. }) => {} // stale; no command is outstanding
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// `query-status`.
    pub fn status(&mut self) -> Result<RunState> {
        let v = self.execute("query-status", Value::Null)?;
        decode("query-status", v)
    }

    /// `stop`: pauses the guest CPUs (QEMU emits a STOP event).
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", Value::Null).map(drop)
    }

    /// `cont`: resumes the guest CPUs (QEMU emits a RESUME event).
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", Value::Null).map(drop)
    }

    /// `query-name`: the `-name` given to QEMU, if any.
    pub fn name(&mut self) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct Name {
            name: Option<String>,
        }
        let v = self.execute("query-name", Value::Null)?;
        decode::<Name>("query-name", v).map(|n| n.name)
    }

    /// `query-uuid`: the `-uuid` given to QEMU (all zeros when none was).
    pub fn uuid(&mut self) -> Result<String> {
        #[derive(Deserialize)]
        struct Uuid {
            #[serde(rename = "UUID")]
            uuid: String,
        }
        let v = self.execute("query-uuid", Value::Null)?;
        decode::<Uuid>("query-uuid", v).map(|u| u.uuid)
    }

    /// query-block, keeping entries with an inserted medium (empty CD-ROM drives and
    /// floppies are left out: there is nothing to back up).
    pub fn block_devices(&mut self) -> Result<Vec<BlockDevice>> {
        let v = self.execute("query-block", Value::Null)?;
        parse_block_devices(v)
    }

    /// Named dirty bitmaps of block node `node` (from query-named-block-nodes
    /// {flat:true}). QEMU's internal anonymous bitmaps (e.g. of a backup job's filter)
    /// are left out. [`Error::NotFound`] if no node has that name.
    pub fn bitmaps(&mut self, node: &str) -> Result<Vec<Bitmap>> {
        let v = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        parse_bitmaps(v, node)
    }

    /// Names of all block nodes (query-named-block-nodes {flat:true}), including the
    /// ones QEMU generates (`#blockNNN`) for nodes given no name.
    pub fn node_names(&mut self) -> Result<Vec<String>> {
        let v = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        Ok(decode::<Vec<RawNode>>("query-named-block-nodes", v)?
            .into_iter()
            .map(|n| n.node_name)
            .collect())
    }

    /// Ids of the block jobs (query-block-jobs; QEMU reports the job id as "device").
    pub fn block_jobs(&mut self) -> Result<Vec<String>> {
        Ok(self.raw_block_jobs()?.into_iter().map(|j| j.id).collect())
    }

    fn raw_block_jobs(&mut self) -> Result<Vec<RawJob>> {
        let v = self.execute("query-block-jobs", Value::Null)?;
        decode("query-block-jobs", v)
    }

    /// Ids of the block exports (query-block-exports), including ones shutting down.
    pub fn block_exports(&mut self) -> Result<Vec<String>> {
        Ok(self
            .raw_block_exports()?
            .into_iter()
            .map(|e| e.id)
            .collect())
    }

    fn raw_block_exports(&mut self) -> Result<Vec<RawExport>> {
        let v = self.execute("query-block-exports", Value::Null)?;
        decode("query-block-exports", v)
    }

    /// Cancels a block job (block-job-cancel {device: id, force: true}) and waits until
    /// it is gone from query-block-jobs (poll, with timeout).
    ///
    /// Cancelling is asynchronous in QEMU, and the job's nodes stay in use until it is
    /// gone, so a following `blockdev-del` of its target would fail without the wait.
    /// Idempotent: a job that is already gone is success. A job created with
    /// auto-dismiss=false that reaches "concluded" is dismissed (job-dismiss).
    pub fn cancel_job_and_wait(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let deadline = deadline_after(timeout);
        let status = |q: &mut Qmp| -> Result<Option<String>> {
            Ok(q.raw_block_jobs()?
                .into_iter()
                .find(|j| j.id == id)
                .map(|j| j.status))
        };
        if status(self)?.is_none() {
            return Ok(());
        }
        if let Err(e) = self.execute("block-job-cancel", json!({"device": id, "force": true})) {
            // The job may have finished, or concluded, between the query and the cancel.
            match (&e, status(self)?) {
                (Error::Command { .. }, None) => return Ok(()),
                (Error::Command { .. }, Some(s)) if s == "concluded" => {}
                _ => return Err(e),
            }
        }
        loop {
            match status(self)? {
                None => return Ok(()),
                Some(s) if s == "concluded" => {
                    self.execute("job-dismiss", json!({"id": id}))?;
                }
                Some(_) => {}
            }
            match remaining(deadline) {
                Some(left) => thread::sleep(left.min(POLL)),
                None => {
                    return Err(Error::Timeout(format!(
                        "{}: block job '{id}' still present {} after block-job-cancel",
                        self.conn.label(),
                        fmt_duration(timeout)
                    )));
                }
            }
        }
    }

    /// Deletes an export (block-export-del {id, mode:"hard"}) and waits until it is gone
    /// from query-block-exports.
    ///
    /// "hard" disconnects NBD clients instead of waiting for them, and the wait matters
    /// because the export holds its node until it is gone. Idempotent: an export already
    /// gone is success; one already shutting down is only waited for.
    pub fn delete_export_and_wait(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let deadline = deadline_after(timeout);
        let shutting_down = |q: &mut Qmp| -> Result<Option<bool>> {
            Ok(q.raw_block_exports()?
                .into_iter()
                .find(|e| e.id == id)
                .map(|e| e.shutting_down))
        };
        match shutting_down(self)? {
            None => return Ok(()),
            Some(true) => {}
            Some(false) => {
                if let Err(e) = self.execute("block-export-del", json!({"id": id, "mode": "hard"}))
                {
                    match (&e, shutting_down(self)?) {
                        (Error::Command { .. }, None | Some(true)) => {}
                        _ => return Err(e),
                    }
                }
            }
        }
        loop {
            if shutting_down(self)?.is_none() {
                return Ok(());
            }
            match remaining(deadline) {
                Some(left) => thread::sleep(left.min(POLL)),
                None => {
                    return Err(Error::Timeout(format!(
                        "{}: block export '{id}' still present {} after block-export-del",
                        self.conn.label(),
                        fmt_duration(timeout)
                    )));
                }
            }
        }
    }

    /// HMP through human-monitor-command; returns the reply text (HMP reports errors
    /// only as text: return it, the caller decides).
    ///
    /// Some HMP commands print to QEMU's stdout instead (qemu-io's "wrote ..." lines):
    /// a successful `qemu-io` returns "".
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let v = self.execute(
            "human-monitor-command",
            json!({"command-line": command_line}),
        )?;
        decode("human-monitor-command", v)
    }
}

/// A request line: {"execute":cmd,"arguments":args,"id":id}\n. Written by hand to keep
/// "execute" first (serde_json's map would sort the keys), which reads better in traces.
fn encode_request(cmd: &str, args: Value, id: u64) -> Result<Vec<u8>> {
    let encode = |v: &Value| {
        serde_json::to_string(v).map_err(|e| Error::Protocol(format!("cannot encode '{cmd}': {e}")))
    };
    let name = encode(&Value::String(cmd.into()))?;
    let line = if args.is_null() {
        format!("{{\"execute\":{name},\"id\":{id}}}\n")
    } else {
        format!(
            "{{\"execute\":{name},\"arguments\":{},\"id\":{id}}}\n",
            encode(&args)?
        )
    };
    Ok(line.into_bytes())
}

/// Parses one line as JSON.
fn parse_line(line: &[u8], label: &str) -> Result<Value> {
    serde_json::from_slice(line)
        .map_err(|e| Error::Protocol(format!("{label}: malformed JSON ({e}): {}", excerpt(line))))
}

/// Tells events from replies; `Err` describes a message that is neither.
fn classify(v: Value) -> std::result::Result<Message, String> {
    let Value::Object(mut obj) = v else {
        return Err("message is not a JSON object".into());
    };
    if obj.get("event").is_some_and(Value::is_string) {
        return Ok(Message::Event(Value::Object(obj)));
    }
    if obj.get("QMP").is_some_and(Value::is_object) {
        return Ok(Message::Greeting);
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(Message::Reply {
            id,
            result: Ok(ret),
        });
    }
    if let Some(err) = obj.remove("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        return match (class, desc) {
            (Some(c), Some(d)) => Ok(Message::Reply {
                id,
                result: Err((c.to_string(), d.to_string())),
            }),
            _ => Err("error reply without string class and desc".into()),
        };
    }
    Err("message is neither an event nor a reply".into())
}

/// (major, minor, micro) from {"QMP":{"version":{"qemu":{..}},..}}.
fn parse_greeting(v: &Value) -> std::result::Result<(u32, u32, u32), String> {
    let qemu = v
        .get("QMP")
        .and_then(|q| q.get("version"))
        .and_then(|q| q.get("qemu"))
        .ok_or("no QMP.version.qemu")?;
    let part = |k: &str| -> std::result::Result<u32, String> {
        qemu.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("version.qemu.{k} is not a small unsigned integer"))
    };
    Ok((part("major")?, part("minor")?, part("micro")?))
}

/// Deserialises a command's return value, naming the command and quoting the value on
/// a mismatch.
fn decode<T: serde::de::DeserializeOwned>(cmd: &str, v: Value) -> Result<T> {
    T::deserialize(&v).map_err(|e| {
        let text = serde_json::to_vec(&v).unwrap_or_default();
        Error::Protocol(format!(
            "unexpected reply to '{cmd}' ({e}): {}",
            excerpt(&text)
        ))
    })
}

#[derive(Deserialize)]
struct RawBlockInfo {
    device: String,
    qdev: Option<String>,
    inserted: Option<RawInserted>,
}

#[derive(Deserialize)]
struct RawInserted {
    #[serde(rename = "node-name")]
    node_name: String,
    file: String,
    drv: String,
    ro: bool,
    image: RawImage,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "node-name")]
    node_name: String,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<RawBitmap>,
}

/// A bitmap as QEMU reports it: internal bitmaps have no name.
#[derive(Deserialize)]
struct RawBitmap {
    name: Option<String>,
    granularity: u32,
    count: u64,
    recording: bool,
    busy: bool,
    persistent: bool,
    #[serde(default)]
    inconsistent: bool,
}

#[derive(Deserialize)]
struct RawJob {
    #[serde(rename = "device")]
    id: String,
    status: String,
}

#[derive(Deserialize)]
struct RawExport {
    id: String,
    #[serde(rename = "shutting-down")]
    shutting_down: bool,
}

fn parse_block_devices(v: Value) -> Result<Vec<BlockDevice>> {
    let raw: Vec<RawBlockInfo> = decode("query-block", v)?;
    Ok(raw
        .into_iter()
        .filter_map(|b| {
            let ins = b.inserted?;
            Some(BlockDevice {
                device: b.device,
                qdev: b.qdev,
                node_name: ins.node_name,
                file: ins.file,
                format: ins.drv,
                virtual_size: ins.image.virtual_size,
                read_only: ins.ro,
            })
        })
        .collect())
}

fn parse_bitmaps(v: Value, node: &str) -> Result<Vec<Bitmap>> {
    let nodes: Vec<RawNode> = decode("query-named-block-nodes", v)?;
    let found = nodes
        .into_iter()
        .find(|n| n.node_name == node)
        .ok_or_else(|| Error::NotFound(format!("block node '{node}'")))?;
    Ok(found
        .dirty_bitmaps
        .into_iter()
        .filter_map(|b| {
            Some(Bitmap {
                name: b.name?,
                granularity: b.granularity,
                count: b.count,
                recording: b.recording,
                busy: b.busy,
                persistent: b.persistent,
                inconsistent: b.inconsistent,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    #[test]
    fn request_has_fresh_id_and_omits_null_arguments() {
        let r = encode_request("query-status", Value::Null, 7).unwrap();
        assert_eq!(r, b"{\"execute\":\"query-status\",\"id\":7}\n");
        let r = encode_request("stop", json!({"a": "x\ny"}), 8).unwrap();
        assert_eq!(
            r,
            b"{\"execute\":\"stop\",\"arguments\":{\"a\":\"x\\ny\"},\"id\":8}\n"
        );
    }

    #[test]
    fn classify_events_replies_and_errors() {
        let ev = json!({"event":"STOP","timestamp":{"seconds":1,"microseconds":2}});
        assert_eq!(classify(ev.clone()), Ok(Message::Event(ev)));
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": ["oob"]}});
        assert_eq!(classify(greeting), Ok(Message::Greeting));
        assert_eq!(
            classify(json!({"return":{}, "id": 3})),
            Ok(Message::Reply {
                id: Some(json!(3)),
                result: Ok(json!({}))
            })
        );
        assert_eq!(
            classify(json!({"id": 4, "error":{"class":"GenericError","desc":"no"}})),
            Ok(Message::Reply {
                id: Some(json!(4)),
                result: Err(("GenericError".into(), "no".into()))
            })
        );
        // QEMU's answer to input it could not parse carries no id.
        assert_eq!(
            classify(
                json!({"error":{"class":"GenericError","desc":"QMP input must be a JSON object"}})
            ),
            Ok(Message::Reply {
                id: None,
                result: Err((
                    "GenericError".into(),
                    "QMP input must be a JSON object".into()
                ))
            })
        );
        // "return" may be any JSON value, including null and a string.
        assert_eq!(
            classify(json!({"return": "", "id": 1})),
            Ok(Message::Reply {
                id: Some(json!(1)),
                result: Ok(json!(""))
            })
        );
        assert!(classify(json!([1, 2])).is_err());
        assert!(classify(json!({"id": 1})).is_err());
        assert!(classify(json!({"error": "x"})).is_err());
        assert!(classify(json!({"error": {"class": 1, "desc": "d"}})).is_err());
        // An "event" that is not a string is not an event.
        assert!(classify(json!({"event": 5})).is_err());
    }

    #[test]
    fn greeting_version() {
        let g = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
                      "package": "Debian"}, "capabilities": ["oob"]}});
        assert_eq!(parse_greeting(&g), Ok((10, 0, 2)));
        assert!(parse_greeting(&json!({"return": {}})).is_err());
        let big = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 5_000_000_000u64}}}});
        assert!(parse_greeting(&big).is_err());
        let neg = json!({"QMP": {"version": {"qemu": {"micro": -1, "minor": 0, "major": 10}}}});
        assert!(parse_greeting(&neg).is_err());
    }

    #[test]
    fn malformed_json_is_quoted() {
        let err = parse_line(b"{\"return\": tru", "q.sock").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("q.sock: malformed JSON"), "{msg}");
        assert!(msg.contains("tru"), "{msg}");
        // serde_json's recursion limit turns deep nesting into an error, not a crash.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_line(deep.as_bytes(), "q").is_err());
        assert!(parse_line(&[0xff, b'{', b'}'], "q").is_err());
    }

    #[test]
    fn block_devices_keep_inserted_media_only() {
        let v = json!([
            {"device": "drive0", "locked": false, "removable": true, "type": "unknown",
             "inserted": {"node-name": "disk0", "file": "/x/d.qcow2", "drv": "qcow2", "ro": false,
                          "image": {"virtual-size": 67108864, "filename": "/x/d.qcow2"}}},
            {"device": "ide1-cd0", "locked": false, "removable": true, "type": "unknown",
             "qdev": "/machine/unattached/device[23]"},
            {"device": "", "qdev": "vda", "locked": false, "removable": false, "type": "unknown",
             "inserted": {"node-name": "n1", "file": "/x/e.raw", "drv": "raw", "ro": true,
                          "image": {"virtual-size": 1024}}}
        ]);
        let d = parse_block_devices(v).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0],
            BlockDevice {
                device: "drive0".into(),
                qdev: None,
                node_name: "disk0".into(),
                file: "/x/d.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 64 << 20,
                read_only: false,
            }
        );
        assert_eq!(d[1].qdev.as_deref(), Some("vda"));
        assert!(d[1].read_only);
    }

    #[test]
    fn block_devices_reject_bad_sizes() {
        let v = json!([{"device": "d", "inserted": {"node-name": "n", "file": "f", "drv": "raw",
                        "ro": false, "image": {"virtual-size": -1}}}]);
        let err = parse_block_devices(v).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("query-block")),
            "{err}"
        );
        let v = json!({"not": "a list"});
        assert!(matches!(parse_block_devices(v), Err(Error::Protocol(_))));
    }

    #[test]
    fn bitmaps_of_one_node_skip_anonymous_ones() {
        let v = json!([
            {"node-name": "#block283", "dirty-bitmaps": [
                {"recording": false, "persistent": false, "busy": false, "granularity": 65536, "count": 67108864}]},
            {"node-name": "disk0", "dirty-bitmaps": [
                {"name": "b0", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 65536},
                {"name": "b1", "recording": false, "persistent": false, "busy": true, "granularity": 4096,
                 "count": 0, "inconsistent": true}]},
            {"node-name": "#block076"}
        ]);
        let b = parse_bitmaps(v.clone(), "disk0").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0],
            Bitmap {
                name: "b0".into(),
                granularity: 65536,
                count: 65536,
                recording: true,
                busy: false,
                persistent: true,
                inconsistent: false
            }
        );
        assert!(b[1].inconsistent && b[1].busy);
        assert!(parse_bitmaps(v.clone(), "#block283").unwrap().is_empty());
        assert!(parse_bitmaps(v.clone(), "#block076").unwrap().is_empty());
        assert!(matches!(parse_bitmaps(v, "nope"), Err(Error::NotFound(_))));
        let too_big = json!([{"node-name": "n", "dirty-bitmaps": [
            {"name": "b", "recording": true, "persistent": true, "busy": false,
             "granularity": 4294967296u64, "count": 0}]}]);
        assert!(matches!(
            parse_bitmaps(too_big, "n"),
            Err(Error::Protocol(_))
        ));
    }

    /// A scripted peer on a socketpair: reads request lines and answers with whatever
    /// `script` returns for each (several lines allowed). Exercises the reply matching
    /// without QEMU; the integration tests cover real QEMU.
    fn scripted(
        greeting: &'static str,
        script: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> (Qmp, thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            w.write_all(greeting.as_bytes()).unwrap();
            for line in BufReader::new(b).lines() {
                let Ok(line) = line else { return };
                let req: Value = serde_json::from_str(&line).unwrap();
                for out in script(&req) {
                    if w.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        let conn = LineConn::new(a, "pair".into());
        let t = Duration::from_secs(5);
        let qmp = Qmp::handshake(conn, deadline_after(t), t).unwrap();
        (qmp, peer)
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\r\n";

    fn id_of(req: &Value) -> u64 {
        req["id"].as_u64().unwrap()
    }

    #[test]
    fn events_before_between_and_after_replies_are_queued() {
        let (mut q, peer) = scripted(GREETING, |req| {
            let id = id_of(req);
            vec![
                "{\"event\": \"A\", \"data\": {\"n\": 1}}\r\n".into(),
                format!("{{\"return\": {{\"n\": {id}}}, \"id\": {id}}}\r\n"),
                "{\"event\": \"B\"}\r\n".into(),
            ]
        });
        assert_eq!(q.version(), (10, 0, 2));
        // The qmp_capabilities exchange already queued A and left B in flight.
        assert_eq!(q.execute("x", Value::Null).unwrap(), json!({"n": 2}));
        let got = q.wait_event("B", Duration::from_secs(5), |_| true).unwrap();
        assert_eq!(got["event"], "B");
        let names: Vec<String> = q
            .take_events()
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect();
        // wait_event took the B queued while reading x's reply; the A events of both
        // exchanges remain, and the second B has not been read yet.
        assert_eq!(names, ["A", "A"]);
        assert!(q.take_events().is_empty());
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn peer_pid_is_the_peer_and_a_silent_quit_times_out() {
        // The peer never answers quit (QEMU answers or closes the socket: both fine).
        let (mut q, peer) = scripted(GREETING, |req| {
            let id = id_of(req);
            if req["execute"] == "quit" {
                vec![]
            } else {
                vec![format!("{{\"return\": {{}}, \"id\": {id}}}\r\n")]
            }
        });
        // A socketpair made in this process: the peer is this process.
        assert_eq!(q.peer_pid().unwrap(), std::process::id());
        q.set_timeout(Duration::from_millis(200));
        // No reply within the timeout: that is a failure, not a quit.
        assert!(q.quit().is_err());
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn a_repeated_greeting_is_skipped() {
        // QEMU sent its greeting twice to an early client (seen in CI under load).
        let twice: &'static str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\r\n{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\r\n";
        let (mut q, peer) = scripted(twice, |req| {
            let id = id_of(req);
            vec![format!("{{\"return\": {{}}, \"id\": {id}}}\r\n")]
        });
        assert_eq!(q.execute("x", Value::Null).unwrap(), json!({}));
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn stale_ids_are_skipped_and_errors_become_command_errors() {
        let (mut q, peer) = scripted(GREETING, |req| {
            let id = id_of(req);
            if req["execute"] == "bad" {
                return vec![format!(
                    "{{\"id\": {id}, \"error\": {{\"class\": \"GenericError\", \"desc\": \"nope\"}}}}\n"
                )];
            }
            vec![
                "{\"return\": \"stale\", \"id\": 99999}\n".into(),
                "{\"return\": \"stale\", \"id\": \"other\"}\n".into(),
                format!("{{\"return\": \"mine\", \"id\": {id}}}\n"),
            ]
        });
        assert_eq!(q.execute("x", Value::Null).unwrap(), json!("mine"));
        match q.execute("bad", json!({})) {
            Err(Error::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("bad", "GenericError", "nope")
                );
            }
            other => panic!("expected Command, got {other:?}"),
        }
        // A command error leaves the connection usable.
        assert_eq!(q.execute("x", Value::Null).unwrap(), json!("mine"));
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn timeout_breaks_the_connection() {
        let (mut q, peer) = scripted(GREETING, |req| {
            let id = id_of(req);
            if req["execute"] == "slow" {
                thread::sleep(Duration::from_millis(300));
            }
            vec![format!("{{\"return\": {{}}, \"id\": {id}}}\n")]
        });
        q.set_timeout(Duration::from_millis(100));
        let t0 = Instant::now();
        let err = q.execute("slow", Value::Null).unwrap_err();
        assert!(
            matches!(&err, Error::Timeout(m) if m.contains("'slow'")),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(q.broken().is_some());
        let err = q.execute("fast", Value::Null).unwrap_err();
        assert!(
            matches!(&err, Error::Broken(m) if m.contains("slow")),
            "{err}"
        );
        assert!(matches!(
            q.wait_event("X", Duration::from_millis(10), |_| true),
            Err(Error::Broken(_))
        ));
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn wait_event_timeout_keeps_the_connection() {
        let (mut q, peer) = scripted(GREETING, |req| {
            let id = id_of(req);
            vec![
                format!("{{\"return\": {{}}, \"id\": {id}}}\n"),
                "{\"event\": \"JOB\", \"data\": {\"id\": \"j1\"}}\n".into(),
            ]
        });
        let err = q
            .wait_event("JOB", Duration::from_millis(100), |d| d["id"] == "j2")
            .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(q.broken().is_none());
        q.execute("x", Value::Null).unwrap();
        let ev = q
            .wait_event("JOB", Duration::from_secs(5), |d| d["id"] == "j1")
            .unwrap();
        assert_eq!(ev["data"]["id"], "j1");
        // That was the j1 queued during the first wait; x's j1 has not been read yet.
        assert!(q.take_events().is_empty());
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn malformed_reply_breaks_the_connection() {
        let (mut q, peer) = scripted(GREETING, |req| {
            if req["execute"] == "qmp_capabilities" {
                return vec![format!("{{\"return\": {{}}, \"id\": {}}}\n", id_of(req))];
            }
            vec!["{\"return\": oops}\n".into()]
        });
        let err = q.execute("x", Value::Null).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("oops")),
            "{err}"
        );
        assert!(matches!(q.execute("x", Value::Null), Err(Error::Broken(_))));
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn a_non_qmp_greeting_is_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"return\": 5}\n").unwrap();
        let t = Duration::from_secs(1);
        let err = Qmp::handshake(LineConn::new(a, "qga.sock".into()), deadline_after(t), t)
            .err()
            .unwrap();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("not a QMP greeting")),
            "{err}"
        );
    }

    #[test]
    fn events_before_the_greeting_are_kept_and_the_greeting_still_required() {
        // Regression (CI): QEMU wrote a RESUME event before its greeting.
        let (a, mut b) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            b.write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESUME\"}\r\n")
                .unwrap();
            b.write_all(GREETING.as_bytes()).unwrap();
            let mut r = io::BufReader::new(b.try_clone().unwrap());
            let mut req = String::new();
            io::BufRead::read_line(&mut r, &mut req).unwrap();
            let req: Value = serde_json::from_str(&req).unwrap();
            assert_eq!(req["execute"], "qmp_capabilities");
            b.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", id_of(&req)).as_bytes())
                .unwrap();
        });
        let t = Duration::from_secs(5);
        let mut q =
            Qmp::handshake(LineConn::new(a, "vm.qmp".into()), deadline_after(t), t).unwrap();
        let evs = q.take_events();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0]["event"], "RESUME");
        peer.join().unwrap();

        // Events alone, then something that is no greeting: still refused.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"event\": \"RESUME\"}\n{\"return\": 5}\n")
            .unwrap();
        let t = Duration::from_secs(1);
        let err = Qmp::handshake(LineConn::new(a, "vm.qmp".into()), deadline_after(t), t)
            .err()
            .unwrap();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("not a QMP greeting")),
            "{err}"
        );
    }

    #[test]
    fn the_event_queue_is_bounded() {
        let (mut q, peer) = scripted(GREETING, |req| {
            let id = id_of(req);
            let mut out: Vec<String> = (0..MAX_QUEUED_EVENTS + 10)
                .map(|i| format!("{{\"event\": \"E\", \"data\": {{\"i\": {i}}}}}\n"))
                .collect();
            out.push(format!("{{\"return\": {{}}, \"id\": {id}}}\n"));
            out
        });
        q.execute("x", Value::Null).unwrap();
        assert_eq!(
            q.dropped_events(),
            2 * (MAX_QUEUED_EVENTS as u64 + 10) - MAX_QUEUED_EVENTS as u64
        );
        let evs = q.take_events();
        assert_eq!(evs.len(), MAX_QUEUED_EVENTS);
        assert_eq!(
            evs.last().unwrap()["data"]["i"],
            MAX_QUEUED_EVENTS as u64 + 9
        );
        drop(q);
        peer.join().unwrap();
    }
}
