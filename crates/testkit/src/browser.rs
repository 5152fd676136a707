//! A real browser for the console's tests: Debian's `chromedriver` started on a free
//! port, headless Chromium driven through it over WebDriver (`fantoccini`). Calls are
//! synchronous (the browser owns a small runtime) and each has a deadline. A missing
//! `chromium` or `chromedriver` fails the test and names the package: never a skip.

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one WebDriver call (a page load included) may take.
const CALL: Duration = Duration::from_secs(30);
/// How long chromedriver may take to listen.
const DRIVER_UP: Duration = Duration::from_secs(20);

/// One line of the browser's console (`goog:loggingPrefs` browser ALL).
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// `SEVERE` (errors, failed loads), `WARNING`, `INFO`, `DEBUG`.
    pub level: String,
    pub message: String,
}

/// Chromium through chromedriver; the session is closed and the driver killed on drop.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
}

/// chromedriver's log endpoint (`POST /session/{id}/se/log`), which fantoccini does not
/// wrap: it returns the browser console's entries since the last call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("a bound port").port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium at `width` x `height`. The server's
    /// self-signed chain is accepted with `--ignore-certificate-errors` (and the
    /// WebDriver `acceptInsecureCerts`): trusting its CA would need an NSS database
    /// per profile, and the tests check TLS elsewhere.
    pub fn start(width: u32, height: u32) -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium chromium-driver)"
        );
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver did not start ({e}): install Debian's chromium-driver package (apt-get install chromium chromium-driver)")
            });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut b = Browser {
            rt,
            client: None,
            driver,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = b.driver.try_wait() {
                panic!("chromedriver exited at start: {st}");
            }
            assert!(
                start.elapsed() < DRIVER_UP,
                "chromedriver did not listen on {addr} within {DRIVER_UP:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--ignore-certificate-errors",
                         "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                         format!("--window-size={width},{height}")],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let url = format!("http://{addr}");
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = b.block("opening a WebDriver session", async {
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url)
                .await
        });
        b.client = Some(client);
        // --window-size counts the window's frame: grow the window so the page itself
        // (and so each screenshot) is width x height.
        let frame = b.execute("return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]");
        let extra = |i: usize| {
            frame[i]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0)
        };
        let (w, h) = (width + extra(0), height + extra(1));
        b.block("sizing the window", b.c().set_window_size(w, h));
        b
    }

    fn block<T, E: std::fmt::Debug>(&self, what: &str, f: impl Future<Output = Result<T, E>>) -> T {
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL, f).await })
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("{what}: {e:?}"),
            Err(_) => panic!("{what}: no answer within {CALL:?}"),
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("an open session")
    }

    pub fn goto(&self, url: &str) {
        self.block(&format!("loading {url}"), self.c().goto(url));
    }

    pub fn current_url(&self) -> String {
        self.block("reading the URL", self.c().current_url())
            .to_string()
    }

    /// Whether an element matches `css` now.
    pub fn exists(&self, css: &str) -> bool {
        !self
            .block(
                &format!("finding {css}"),
                self.c().find_all(Locator::Css(css)),
            )
            .is_empty()
    }

    /// The rendered text of the first element matching `css`.
    pub fn text(&self, css: &str) -> String {
        let c = self.c();
        self.block(&format!("text of {css}"), async {
            c.find(Locator::Css(css)).await?.text().await
        })
    }

    /// The rendered texts of every element matching `css`.
    pub fn texts(&self, css: &str) -> Vec<String> {
        let c = self.c();
        self.block(&format!("texts of {css}"), async {
            let mut out = Vec::new();
            for e in c.find_all(Locator::Css(css)).await? {
                out.push(e.text().await?);
            }
            Ok::<_, fantoccini::error::CmdError>(out)
        })
    }

    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        let c = self.c();
        self.block(&format!("{name} of {css}"), async {
            c.find(Locator::Css(css)).await?.attr(name).await
        })
    }

    pub fn click(&self, css: &str) {
        let c = self.c();
        self.block(&format!("clicking {css}"), async {
            c.find(Locator::Css(css)).await?.click().await
        });
    }

    /// Types `text` into the field matching `css`.
    pub fn fill(&self, css: &str, text: &str) {
        let c = self.c();
        self.block(&format!("filling {css}"), async {
            c.find(Locator::Css(css)).await?.send_keys(text).await
        });
    }

    /// Presses Tab where the keyboard focus is.
    pub fn press_tab(&self) {
        let c = self.c();
        let tab = char::from(fantoccini::key::Key::Tab).to_string();
        self.block("pressing Tab", async {
            c.active_element().await?.send_keys(&tab).await
        });
    }

    /// Runs `script` in the page and returns what it returns.
    pub fn execute(&self, script: &str) -> Value {
        self.block("running a script", self.c().execute(script, Vec::new()))
    }

    /// The page's screenshot, PNG.
    pub fn screenshot(&self) -> Vec<u8> {
        self.block("taking a screenshot", self.c().screenshot())
    }

    /// The browser console's entries since the last call (chromedriver hands each once).
    pub fn console_log(&self) -> Vec<LogEntry> {
        let v = self.block("reading the console log", self.c().issue_cmd(BrowserLog));
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| LogEntry {
                        level: e["level"].as_str().unwrap_or_default().to_string(),
                        message: e["message"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The console's errors since the last call (level SEVERE: script errors, failed
    /// loads, CSP violations).
    pub fn console_errors(&self) -> Vec<LogEntry> {
        self.console_log()
            .into_iter()
            .filter(|e| e.level == "SEVERE")
            .collect()
    }

    /// Waits until `css` matches, for at most `limit`.
    pub fn wait_for(&self, css: &str, limit: Duration) {
        let start = Instant::now();
        while !self.exists(css) {
            assert!(
                start.elapsed() < limit,
                "{css} did not appear within {limit:?} at {}",
                self.current_url()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session lets chromedriver end Chromium; then the driver goes.
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
