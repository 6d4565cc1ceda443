//! A plain HTTP/1.1 client over a `TcpStream` (requests to 127.0.0.1
//! only), and a `tend run --listen 127.0.0.1:0` whose port is read from its
//! log: shared by the tests of the HTTP endpoints and of the dashboard.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous: the machine may be busy with other test binaries.
pub const LIMIT: Duration = Duration::from_secs(60);

/// One answer: status code, content type, body.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    pub content_type: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` (the path sent exactly as given, percent escapes included).
pub fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path)
}

pub fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let mut content_type = String::new();
    let mut chunked = false;
    for l in lines {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        match k.to_ascii_lowercase().as_str() {
            "content-type" => content_type = v.trim().to_string(),
            "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        code,
        content_type,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("a chunk size");
        let n = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// A running `tend run --listen 127.0.0.1:0 -v`, killed if the test did
/// not stop it. Its log lives outside the desired-state dir.
pub struct Server {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(mut cmd: Command) -> Server {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = cmd
            .env_remove("TEND_DISPATCH")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start tend run");
        let mut s = Server {
            child: Some(child),
            log,
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        // Port 0: the kernel picks a free one, and the log says which.
        let deadline = Instant::now() + LIMIT;
        loop {
            let found = s.log().lines().find_map(|l| {
                let l = l.split("http endpoints listening").nth(1)?;
                let a = l.split("addr=").nth(1)?.split_whitespace().next()?;
                a.parse::<SocketAddr>().ok()
            });
            if let Some(a) = found {
                s.addr = a;
                return s;
            }
            assert!(!s.exited(), "tend run exited:\n{}", s.log());
            assert!(
                Instant::now() < deadline,
                "no listening address in the log:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_some())
    }

    pub fn metrics(&self) -> String {
        let a = get(self.addr, "/metrics");
        assert_eq!(a.code, 200, "{a:?}");
        a.body
    }

    /// SIGTERM, then the exit code.
    pub fn stop(&mut self) -> i32 {
        let mut c = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "tend run did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
