//! An HTTP server of the test's own that records every request it receives (its request line and
//! `Authorization` header) and answers each with a fixed reply: a registry that wants a login, a
//! git server that has nothing, a metadata service.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Recorder {
    pub host: String,
    pub port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    /// Listens on `host` (loopback, or the Docker bridge's gateway for containers to reach) and
    /// answers every request with `reply`, a whole HTTP response.
    pub fn start(host: &str, reply: &'static str) -> Self {
        let listener = TcpListener::bind((host, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let record = record.clone();
                std::thread::spawn(move || answer(stream, &record, reply));
            }
        });
        Self { host: host.to_owned(), port, seen }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Every request line received, followed by ` | ` and its Authorization header when it had one.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(mut stream: TcpStream, record: &Mutex<Vec<String>>, reply: &str) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let request = lines.next().unwrap_or_default().to_owned();
    if !request.starts_with(|c: char| c.is_ascii_uppercase()) {
        // A TLS hello: answer in plain HTTP, so a client that tries https first falls back.
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let auth = lines.find(|line| line.to_ascii_lowercase().starts_with("authorization:"));
    record.lock().unwrap().push(match auth {
        Some(auth) => format!("{request} | {}", auth.trim()),
        None => request,
    });
    let _ = stream.write_all(reply.as_bytes());
}
