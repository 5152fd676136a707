//! QGA, the QEMU guest agent: JSON commands to `qemu-ga` inside the guest, through a
//! virtio-serial port that QEMU exposes as a unix socket on the host.
//!
//! The agent may never answer (guest hung, agent not installed or restarting), so every
//! call takes a timeout. The agent answers requests strictly in order and its replies
//! carry no id, so after a timeout a late reply would look like the answer to the next
//! request. This client therefore **resynchronises** instead of giving up: after a
//! timeout or a malformed reply it marks itself unsynchronised, and the next call first
//! runs the agent's guest-sync-delimited handshake (within that call's timeout):
//!
//! 1. write a raw 0xFF byte: never valid in JSON, it resets the agent's parser in case a
//!    half-written request is pending (the agent answers it with a parse error);
//! 2. send `{"execute":"guest-sync-delimited","arguments":{"id":R}}` with a fresh random
//!    R; the agent answers with a 0xFF byte followed by `{"return":R}`;
//! 3. discard input up to a 0xFF sentinel, then skip replies until the one returning R.
//!    Late replies to earlier commands, the parse-error reply and answers to earlier
//!    syncs (another sentinel, another R) all come before it and are dropped.
//!
//! If that handshake itself times out the client stays unsynchronised and tries again on
//! the next call. Only an I/O error (socket closed, write refused) makes the [`Qga`]
//! unusable ([`Error::Broken`]): reconnect then.
//!
//! Regular commands are sent without an "id" member: qemu-ga 10 echoes one, but agents
//! in long-lived guests can be many releases older and QEMU's dispatcher has rejected
//! unknown request members in the past; the synchronisation above already guarantees
//! that the next reply is the answer.
//!
//! A caution for callers: a `guest-fsfreeze-freeze` that timed out may still complete
//! inside the guest. After such a timeout, thaw (which resynchronises first) before
//! giving up, or the guest's file systems stay frozen.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::conn::{LineConn, deadline_after, excerpt};
use crate::{Error, Result, fmt_duration};

/// Sentinel the agent writes before the reply to guest-sync-delimited, and the byte the
/// client writes to reset the agent's JSON parser. Never part of valid UTF-8 JSON.
const SENTINEL: u8 = 0xFF;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Synced,
    /// The stream position is unknown; resynchronise before the next command.
    NeedsSync,
    /// The socket failed; the text says how.
    Broken(String),
}

/// A guest-agent connection.
pub struct Qga {
    conn: LineConn,
    state: State,
}

impl Qga {
    /// Connects and synchronises: writes a raw 0xFF byte, then
    /// {"execute":"guest-sync-delimited","arguments":{"id":RANDOM}}, discards input up to
    /// the 0xFF sentinel and reads replies until the one carrying that id (stale replies
    /// from an earlier session are skipped). All within `timeout`.
    ///
    /// The connect itself is not retried: QEMU creates the agent's socket when it starts,
    /// so a refused or missing socket means no VM (an [`Error::Io`] at once), while a
    /// missing agent inside the guest shows as [`Error::Timeout`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qga> {
        let label = path.display().to_string();
        let deadline = deadline_after(timeout);
        let stream = UnixStream::connect(path).map_err(|source| Error::Io {
            what: format!("{label}: connect"),
            source,
        })?;
        let mut qga = Qga {
            conn: LineConn::new(stream, label),
            state: State::NeedsSync,
        };
        qga.sync_before(deadline, timeout)?;
        Ok(qga)
    }

    /// Resynchronises now (guest-sync-delimited, as in [`Qga::connect`]). Normally not
    /// needed: calls resynchronise by themselves after a timeout.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        if let State::Broken(why) = &self.state {
            return Err(Error::Broken(why.clone()));
        }
        self.state = State::NeedsSync;
        self.sync_before(deadline_after(timeout), timeout)
    }

    /// True once an I/O error made this connection unusable.
    pub fn is_broken(&self) -> bool {
        matches!(self.state, State::Broken(_))
    }

    /// Runs `cmd` and returns its "return" value; an agent error becomes
    /// [`Error::Command`]. `args` [`Value::Null`] sends no arguments. Resynchronises
    /// first if an earlier call timed out; `timeout` covers both.
    ///
    /// Commands that never reply (guest-shutdown, guest-suspend-*) would time out here.
    pub fn execute(&mut self, cmd: &str, args: Value, timeout: Duration) -> Result<Value> {
        let deadline = deadline_after(timeout);
        match &self.state {
            State::Broken(why) => return Err(Error::Broken(why.clone())),
            State::NeedsSync => self.sync_before(deadline, timeout)?,
            State::Synced => {}
        }
        let result = self.round_trip(cmd, args, deadline, timeout);
        if let Err(e) = &result {
            self.after_error(e);
        }
        result
    }

    /// `guest-ping`: succeeds when the agent answers.
    pub fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.execute("guest-ping", Value::Null, timeout).map(drop)
    }

    /// `guest-fsfreeze-status`: "thawed" or "frozen".
    pub fn fsfreeze_status(&mut self, timeout: Duration) -> Result<String> {
        let cmd = "guest-fsfreeze-status";
        match self.execute(cmd, Value::Null, timeout)? {
            Value::String(s) => Ok(s),
            other => Err(unexpected(cmd, &other)),
        }
    }

    /// `guest-fsfreeze-freeze`: freezes the guest's file systems; returns how many.
    pub fn fsfreeze_freeze(&mut self, timeout: Duration) -> Result<u64> {
        self.count_command("guest-fsfreeze-freeze", timeout)
    }

    /// `guest-fsfreeze-thaw`: thaws them; returns how many (0 when none was frozen).
    pub fn fsfreeze_thaw(&mut self, timeout: Duration) -> Result<u64> {
        self.count_command("guest-fsfreeze-thaw", timeout)
    }

    fn count_command(&mut self, cmd: &str, timeout: Duration) -> Result<u64> {
        let v = self.execute(cmd, Value::Null, timeout)?;
        v.as_u64().ok_or_else(|| unexpected(cmd, &v))
    }

    /// Records what an error means for the stream position.
    fn after_error(&mut self, e: &Error) {
        match e {
            Error::Io { .. } => self.state = State::Broken(e.to_string()),
            Error::Timeout(_) | Error::Protocol(_) => {
                // Whatever is buffered is stale now; the next sync skips to a sentinel.
                self.conn.discard_buffered();
                self.state = State::NeedsSync;
            }
            _ => {}
        }
    }

    fn sync_before(&mut self, deadline: Instant, timeout: Duration) -> Result<()> {
        let result = self.sync_exchange(deadline, timeout);
        match &result {
            Ok(()) => self.state = State::Synced,
            Err(e) => self.after_error(e),
        }
        result
    }

    fn sync_exchange(&mut self, deadline: Instant, timeout: Duration) -> Result<()> {
        let id = random_id();
        let mut request = vec![SENTINEL];
        request.extend_from_slice(&encode_request("guest-sync-delimited", json!({"id": id}))?);
        self.conn
            .write_all(&request, deadline, "sending guest-sync-delimited")?;
        let waiting = format!(
            "no reply to guest-sync-delimited within {} (is the guest agent running?)",
            fmt_duration(timeout)
        );
        let mut seen_sentinel = false;
        loop {
            let line = self.conn.read_line(deadline, &waiting)?;
            if sync_reply_matches(&line, id, &mut seen_sentinel) {
                return Ok(());
            }
        }
    }

    fn round_trip(
        &mut self,
        cmd: &str,
        args: Value,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value> {
        let request = encode_request(cmd, args)?;
        self.conn
            .write_all(&request, deadline, &format!("sending '{cmd}'"))?;
        let waiting = format!(
            "no reply to '{cmd}' from the guest agent within {}",
            fmt_duration(timeout)
        );
        let line = self.conn.read_line(deadline, &waiting)?;
        parse_reply(cmd, &line, self.conn.label())
    }
}

/// `{"execute":cmd[,"arguments":args]}\n`, "execute" first as in QEMU's documentation.
fn encode_request(cmd: &str, args: Value) -> Result<Vec<u8>> {
    let encode = |v: &Value| {
        serde_json::to_string(v).map_err(|e| Error::Protocol(format!("cannot encode '{cmd}': {e}")))
    };
    let name = encode(&Value::String(cmd.into()))?;
    let line = if args.is_null() {
        format!("{{\"execute\":{name}}}\n")
    } else {
        format!("{{\"execute\":{name},\"arguments\":{}}}\n", encode(&args)?)
    };
    Ok(line.into_bytes())
}

/// One line read while synchronising: true if it is the reply to sync `id` and follows
/// a sentinel. Only the text after the line's last 0xFF counts, so a partial stale line
/// glued to the sentinel cannot hide the reply.
fn sync_reply_matches(line: &[u8], id: u64, seen_sentinel: &mut bool) -> bool {
    let tail = match line.iter().rposition(|&b| b == SENTINEL) {
        Some(pos) => {
            *seen_sentinel = true;
            line.get(pos.saturating_add(1)..).unwrap_or_default()
        }
        None => line,
    };
    if !*seen_sentinel {
        return false;
    }
    serde_json::from_slice::<Value>(tail)
        .ok()
        .and_then(|v| v.get("return").and_then(Value::as_u64))
        == Some(id)
}

/// Interprets the agent's reply to `cmd`.
fn parse_reply(cmd: &str, line: &[u8], label: &str) -> Result<Value> {
    let protocol = |m: &str| {
        Error::Protocol(format!(
            "{label}: {m} (reply to '{cmd}'): {}",
            excerpt(line)
        ))
    };
    let v: Value =
        serde_json::from_slice(line).map_err(|e| protocol(&format!("malformed JSON ({e})")))?;
    let Value::Object(mut obj) = v else {
        return Err(protocol("reply is not a JSON object"));
    };
    if let Some(ret) = obj.remove("return") {
        return Ok(ret);
    }
    if let Some(err) = obj.get("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        if let (Some(class), Some(desc)) = (class, desc) {
            return Err(Error::Command {
                command: cmd.to_string(),
                class: class.to_string(),
                desc: desc.to_string(),
            });
        }
        return Err(protocol("error reply without string class and desc"));
    }
    Err(protocol("reply has neither \"return\" nor \"error\""))
}

fn unexpected(cmd: &str, v: &Value) -> Error {
    let text = serde_json::to_vec(v).unwrap_or_default();
    Error::Protocol(format!(
        "unexpected return value of '{cmd}': {}",
        excerpt(&text)
    ))
}

/// A random sync id in 1..2^53 (exact in any JSON implementation; the agent takes an
/// int64). Random so that a reply to an earlier session's sync cannot match.
fn random_id() -> u64 {
    // RandomState is seeded from the OS once per thread and advanced per instance.
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    (h.finish() & ((1u64 << 53) - 1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_no_id() {
        assert_eq!(
            encode_request("guest-ping", Value::Null).unwrap(),
            b"{\"execute\":\"guest-ping\"}\n"
        );
        assert_eq!(
            encode_request("guest-sync-delimited", json!({"id": 5})).unwrap(),
            b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":5}}\n"
        );
    }

    #[test]
    fn sync_needs_the_sentinel_and_the_id() {
        let mut seen = false;
        // The right id before any sentinel is not accepted (cannot be ours).
        assert!(!sync_reply_matches(b"{\"return\": 42}", 42, &mut seen));
        // Parse error for our 0xFF, then a stale sync reply, then ours.
        assert!(!sync_reply_matches(
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\xef\xbf\xbd'\"}}",
            42,
            &mut seen
        ));
        assert!(!sync_reply_matches(b"\xff{\"return\": 41}", 42, &mut seen));
        assert!(seen);
        assert!(!sync_reply_matches(b"{\"return\": 2}", 42, &mut seen));
        assert!(sync_reply_matches(b"\xff{\"return\": 42}", 42, &mut seen));
        // A partial stale line glued before the sentinel.
        let mut seen = false;
        assert!(sync_reply_matches(
            b"{\"retu\xff{\"return\": 7}\r",
            7,
            &mut seen
        ));
        let mut seen = false;
        assert!(!sync_reply_matches(b"\xff{\"return\": -7}", 7, &mut seen));
        assert!(!sync_reply_matches(b"\xffgarbage", 7, &mut seen));
    }

    #[test]
    fn replies_and_errors() {
        assert_eq!(
            parse_reply("c", b"{\"return\": {}}", "l").unwrap(),
            json!({})
        );
        assert_eq!(
            parse_reply("c", b"{\"return\": \"thawed\", \"id\": \"x\"}\n", "l").unwrap(),
            json!("thawed")
        );
        match parse_reply(
            "guest-fsfreeze-freeze",
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed\"}}",
            "l",
        ) {
            Err(Error::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "guest-fsfreeze-freeze");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "failed");
            }
            other => panic!("expected Command, got {other:?}"),
        }
        for bad in [
            &b"{\"return\": "[..],
            b"[]",
            b"{}",
            b"{\"error\": {}}",
            b"\xff{\"return\": 1}",
        ] {
            let err = parse_reply("c", bad, "qga.sock").unwrap_err();
            assert!(
                matches!(&err, Error::Protocol(m) if m.contains("qga.sock")),
                "{err}"
            );
        }
    }

    #[test]
    fn random_ids_differ_and_fit_53_bits() {
        let a = random_id();
        let b = random_id();
        assert_ne!(a, b);
        assert!(a > 0 && a < (1 << 53));
    }

    #[test]
    fn scripted_agent_resync_skips_stale_replies() {
        use std::io::{Read, Write};
        use std::thread;
        let (a, mut b) = UnixStream::pair().unwrap();
        // The peer answers syncs by echoing the id in the request it reads, after first
        // sending a stale sentinel + stale reply, exactly like a late agent would.
        let peer = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let n = b.read(&mut buf).unwrap();
            let req = &buf[..n];
            assert_eq!(req[0], 0xff);
            let v: Value = serde_json::from_slice(&req[1..]).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            b.write_all(
                b"{\"return\": 3}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\n",
            )
            .unwrap();
            b.write_all(b"\xff{\"return\": 12345}\n").unwrap();
            b.write_all(b"\x00\xff").unwrap();
            b.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .unwrap();
            let n = b.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"{\"execute\":\"guest-ping\"}\n");
            b.write_all(b"{\"return\": {}}\n").unwrap();
        });
        let mut q = Qga {
            conn: LineConn::new(a, "pair".into()),
            state: State::NeedsSync,
        };
        q.sync(Duration::from_secs(5)).unwrap();
        q.ping(Duration::from_secs(5)).unwrap();
        peer.join().unwrap();
    }
}
