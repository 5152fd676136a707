//! Real storage servers for the object-storage tests: Azurite (Microsoft's Azure
//! Storage emulator) and moto's S3 server, each on a free loopback port with its data
//! in a temporary folder, killed when dropped. A missing tool fails the test by name:
//! tests never skip.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account and key (public, the same everywhere).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How long a server may take to open its port.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A child server, killed (and reaped) on drop; its output goes to files in `dir`.
struct Server {
    child: Option<Child>,
    tool: String,
    args: Vec<String>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(tool: &str, args: impl Fn(u16, &std::path::Path) -> Vec<String>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let mut s = Server {
            child: None,
            tool: tool.into(),
            args: args(port, &data),
            port,
            dir,
        };
        s.spawn();
        s
    }

    /// Starts the server (again) with the same arguments: same port, same data folder.
    fn spawn(&mut self) {
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout"))
            .unwrap();
        let err = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr"))
            .unwrap();
        let child = Command::new(&self.tool)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): scripts/install-deps installs it",
                    self.tool
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    /// Kills the server (SIGKILL, as a crash) and reaps it; the data folder stays.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait().unwrap(),
                None => None,
            };
            if exited.is_some() || Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} did not open port {} within {} s ({}): {}{}",
                    self.tool,
                    self.port,
                    START_DEADLINE.as_secs(),
                    exited.map_or("still running".into(), |s| s.to_string()),
                    self.output("stdout"),
                    self.output("stderr"),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    // The port is free now; the server binds it a moment later (a race the tests
    // accept: nothing else on the machine picks random ports in that window).
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Azurite's blob service (`azurite-blob`), loopback only, telemetry off.
pub struct Azurite {
    server: Server,
}

impl Azurite {
    pub fn start() -> Azurite {
        let server = Server::start("azurite-blob", |port, data| {
            [
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--location",
                &data.display().to_string(),
                "--disableTelemetry",
                "--skipApiVersionCheck",
            ]
            .map(String::from)
            .to_vec()
        });
        Azurite { server }
    }

    /// The account's blob endpoint (path-style, as Azurite serves it).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.server.port)
    }

    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// Kills Azurite at once (SIGKILL, as a crash or a power cut of the storage
    /// server); its data folder stays for [`Azurite::restart`].
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts Azurite again (killing it first if it runs) on the same port with the
    /// same `--location`, and waits until it listens.
    pub fn restart(&mut self) {
        self.server.kill();
        self.server.spawn();
    }

    /// Creates a container. `object_store` cannot, Azurite creates none by itself, and
    /// it refuses unsigned requests even with `--loose` (403), so this sends the one
    /// REST call, signed with the account key (Shared Key).
    pub fn create_container(&self, name: &str) {
        let date = http_date();
        let version = "2021-08-06";
        // Path-style endpoints sign the account twice: once as the account, once as
        // the first segment of the URL's path.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{a}/{a}/{name}\nrestype:container",
            a = AZURITE_ACCOUNT
        );
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &b64_decode(AZURITE_KEY));
        let sig = b64_encode(aws_lc_rs::hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let req = format!(
            "PUT /{AZURITE_ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
             Authorization: SharedKey {AZURITE_ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            port = self.server.port
        );
        let status = http_status(self.server.port, &req);
        assert_eq!(status, 201, "Azurite refused to create container {name}");
    }
}

/// moto's S3 server (`moto_server`), loopback only.
pub struct Moto {
    server: Server,
}

impl Moto {
    pub fn start() -> Moto {
        let server = Server::start("moto_server", |port, _| {
            ["-H", "127.0.0.1", "-p", &port.to_string()]
                .map(String::from)
                .to_vec()
        });
        Moto { server }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// Creates a bucket (moto does not check request signatures).
    pub fn create_bucket(&self, name: &str) {
        let req = format!(
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.server.port
        );
        let status = http_status(self.server.port, &req);
        assert_eq!(status, 200, "moto refused to create bucket {name}");
    }
}

/// Sends one HTTP/1.1 request and returns the answer's status code.
fn http_status(port: u16, req: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"))
}

/// Now as an RFC 1123 date (`Mon, 07 Dec 2026 19:03:09 GMT`).
fn http_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // 1970-01-01 was a Thursday.
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for b in s.bytes().filter(|&b| b != b'=') {
        let v = B64.iter().position(|&x| x == b).unwrap() as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let e = b64_encode(s.as_bytes());
            assert_eq!(b64_decode(&e), s.as_bytes(), "{e}");
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert_eq!(b64_decode(AZURITE_KEY).len(), 64);
    }

    #[test]
    fn http_dates() {
        let d = http_date();
        assert!(d.ends_with(" GMT") && d.len() == 29, "{d}");
    }
}
