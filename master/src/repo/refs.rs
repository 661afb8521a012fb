//! A branch's tip asked of the server itself, in git's wire protocol: `ls-refs` of protocol
//! version 2 with one `ref-prefix`, over `git://` (one connection to the daemon) or smart
//! `http(s)://` (two requests on the replica's kept connections). That is one round trip to the
//! server instead of starting a `git` process, which costs tens of milliseconds on every trigger.
//! A server that answers in protocol version 0 is read too (its advertisement lists the refs).
//!
//! Everything this does not speak (`ssh`, `file`, dumb HTTP, a server that answers unexpectedly, a
//! refused or failed request) is [`NotAsked`]: the caller then asks `git ls-remote`, which knows
//! every transport and says in its own words what went wrong.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Why the tip was not asked here; `git ls-remote` is asked instead.
#[derive(Debug)]
pub struct NotAsked(pub String);

/// The commit `reference` (a full ref name) points at, or `None` when the server has no such ref.
pub async fn tip(
    http: &reqwest::Client,
    url: &str,
    reference: &str,
    token: Option<&SecretString>,
    timeout: Duration,
) -> Result<Option<String>, NotAsked> {
    let asked = async {
        if let Some(rest) = url.strip_prefix("git://") {
            over_git(rest, reference).await
        } else if url.starts_with("https://") || url.starts_with("http://") {
            over_http(http, url, reference, token).await
        } else {
            Err(NotAsked("not a git:// or http(s):// repository".to_owned()))
        }
    };
    tokio::time::timeout(timeout, asked).await.map_err(|_| NotAsked(format!("no answer within {timeout:?}")))?
}

/// One packet of git's pkt-line framing.
#[derive(Debug, PartialEq)]
enum Packet {
    Data(Vec<u8>),
    /// `0000`: the end of a message.
    Flush,
    /// `0001`: between a command's capabilities and its arguments.
    Delim,
    /// `0002`: the end of a stateless response.
    ResponseEnd,
}

fn pkt(text: &str) -> Vec<u8> {
    let mut out = format!("{:04x}", text.len() + 4).into_bytes();
    out.extend_from_slice(text.as_bytes());
    out
}

/// The `ls-refs` request for one ref name: the server lists only refs that start with it.
fn ls_refs_request(reference: &str) -> Vec<u8> {
    let mut out = pkt("command=ls-refs\n");
    out.extend_from_slice(b"0001");
    out.extend(pkt(&format!("ref-prefix {reference}\n")));
    out.extend_from_slice(b"0000");
    out
}

async fn read_packet(input: &mut (impl AsyncRead + Unpin)) -> Result<Packet, NotAsked> {
    let mut length = [0u8; 4];
    input.read_exact(&mut length).await.map_err(|err| NotAsked(format!("the answer ended early: {err}")))?;
    let length = std::str::from_utf8(&length)
        .ok()
        .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        .ok_or_else(|| NotAsked("the answer is not in pkt-line framing".to_owned()))?;
    match length {
        0 => Ok(Packet::Flush),
        1 => Ok(Packet::Delim),
        2 => Ok(Packet::ResponseEnd),
        3 => Err(NotAsked("a pkt-line of length 3".to_owned())),
        _ => {
            let mut data = vec![0u8; length - 4];
            input.read_exact(&mut data).await.map_err(|err| NotAsked(format!("the answer ended early: {err}")))?;
            if let Some(message) = data.strip_prefix(b"ERR ") {
                return Err(NotAsked(format!("the server says: {}", String::from_utf8_lossy(message).trim())));
            }
            Ok(Packet::Data(data))
        }
    }
}

/// The lines of one message, up to its flush.
async fn read_message(input: &mut (impl AsyncRead + Unpin)) -> Result<Vec<Vec<u8>>, NotAsked> {
    let mut lines = Vec::new();
    loop {
        match read_packet(input).await? {
            Packet::Data(data) => lines.push(data),
            Packet::Flush | Packet::ResponseEnd => return Ok(lines),
            Packet::Delim => {}
        }
    }
}

/// `<oid> <name>` (v2 `ls-refs`, with attributes after) or `<oid> <name>\0<capabilities>` (v0).
fn find_ref(lines: &[Vec<u8>], reference: &str) -> Option<String> {
    lines.iter().find_map(|line| {
        let line = line.split(|byte| *byte == 0).next().unwrap_or_default();
        let line = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
        let mut parts = line.split(' ');
        let (oid, name) = (parts.next()?, parts.next()?);
        (name == reference && oid.len() >= 40 && oid.bytes().all(|b| b.is_ascii_hexdigit())).then(|| oid.to_owned())
    })
}

/// Whether a capability advertisement is protocol version 2's (it starts `version 2`).
fn is_v2(lines: &[Vec<u8>]) -> bool {
    lines.first().is_some_and(|line| line.as_slice() == b"version 2\n" || line.as_slice() == b"version 2")
}

/// `git://host[:port]/path`: the daemon's request line asks for version 2; a daemon that speaks only
/// version 0 answers with its advertisement, which lists the refs.
async fn over_git(rest: &str, reference: &str) -> Result<Option<String>, NotAsked> {
    let (authority, path) = rest.split_once('/').ok_or_else(|| NotAsked("no path in the URL".to_owned()))?;
    let address = daemon_address(authority);
    let mut stream = TcpStream::connect(&address).await.map_err(|err| NotAsked(format!("connect {address}: {err}")))?;
    let request = format!("git-upload-pack /{path}\0host={authority}\0\0version=2\0");
    stream.write_all(&pkt(&request)).await.map_err(|err| NotAsked(err.to_string()))?;
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::new(reader);
    let advertised = read_message(&mut reader).await?;
    if !is_v2(&advertised) {
        let _ = writer.write_all(b"0000").await;
        return Ok(find_ref(&advertised, reference));
    }
    writer.write_all(&ls_refs_request(reference)).await.map_err(|err| NotAsked(err.to_string()))?;
    let listed = read_message(&mut reader).await?;
    Ok(find_ref(&listed, reference))
}

/// Where a `git://` URL's daemon listens: `host`, `host:port`, `[v6]` or `[v6]:port`, port 9418 unless
/// given.
fn daemon_address(authority: &str) -> String {
    let has_port = authority.rsplit_once(']').map_or(authority, |(_, after)| after).contains(':');
    if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:9418")
    }
}

/// Smart HTTP: the advertisement (`info/refs`), then, from a version 2 server, `ls-refs` posted to
/// `git-upload-pack`.
async fn over_http(
    http: &reqwest::Client,
    url: &str,
    reference: &str,
    token: Option<&SecretString>,
) -> Result<Option<String>, NotAsked> {
    let base = url.trim_end_matches('/');
    let authorized = |request: reqwest::RequestBuilder| match token {
        Some(token) => request.basic_auth("x-access-token", Some(token.expose_secret())),
        None => request,
    };
    let advertisement = authorized(http.get(format!("{base}/info/refs?service=git-upload-pack")))
        .header("Git-Protocol", "version=2")
        .send()
        .await
        .map_err(|err| NotAsked(err.to_string()))?;
    let body = smart_body(advertisement, "application/x-git-upload-pack-advertisement").await?;
    let mut input = body.as_slice();
    let mut advertised = read_message(&mut input).await?;
    if advertised.first().is_some_and(|line| line.starts_with(b"# service=")) {
        advertised = read_message(&mut input).await?;
    }
    if !is_v2(&advertised) {
        return Ok(find_ref(&advertised, reference));
    }
    let listing = authorized(http.post(format!("{base}/git-upload-pack")))
        .header("Git-Protocol", "version=2")
        .header("Content-Type", "application/x-git-upload-pack-request")
        .header("Accept", "application/x-git-upload-pack-result")
        .body(ls_refs_request(reference))
        .send()
        .await
        .map_err(|err| NotAsked(err.to_string()))?;
    let body = smart_body(listing, "application/x-git-upload-pack-result").await?;
    Ok(find_ref(&read_message(&mut body.as_slice()).await?, reference))
}

/// The body of a smart-protocol answer; any other answer (an error, dumb HTTP, a login page) is not
/// read here.
async fn smart_body(response: reqwest::Response, content_type: &str) -> Result<Vec<u8>, NotAsked> {
    if !response.status().is_success() {
        return Err(NotAsked(format!("the server answered {}", response.status())));
    }
    let got = response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
    if got != Some(content_type) {
        return Err(NotAsked(format!("the server answered {got:?}, not {content_type}")));
    }
    let body = response.bytes().await.map_err(|err| NotAsked(err.to_string()))?;
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_refs_from_version_0_and_2_messages() {
        let oid = "a".repeat(40);
        let v0 = [format!("{oid} HEAD\0multi_ack side-band-64k\n"), format!("{oid} refs/heads/main\n")]
            .concat()
            .split_inclusive('\n')
            .map(pkt)
            .collect::<Vec<_>>()
            .concat();
        let mut framed = v0.clone();
        framed.extend_from_slice(b"0000");
        let lines = read_message(&mut framed.as_slice()).await.unwrap();
        assert!(!is_v2(&lines));
        assert_eq!(find_ref(&lines, "refs/heads/main"), Some(oid.clone()));
        assert_eq!(find_ref(&lines, "refs/heads/mai"), None);

        let v2 = [pkt(&format!("{oid} refs/heads/main symref-target:x\n")), b"0000".to_vec()].concat();
        let lines = read_message(&mut v2.as_slice()).await.unwrap();
        assert_eq!(find_ref(&lines, "refs/heads/main"), Some(oid));

        let refused = [pkt("ERR access denied or repository not exported: /x"), b"0000".to_vec()].concat();
        let err = read_message(&mut refused.as_slice()).await.unwrap_err();
        assert!(err.0.contains("access denied"), "{err:?}");
        assert!(read_message(&mut &b"00"[..]).await.is_err());
        assert!(read_message(&mut &b"zzzz"[..]).await.is_err());
    }

    #[test]
    fn a_daemon_listens_on_the_url_s_port_or_git_s() {
        assert_eq!(daemon_address("git.example"), "git.example:9418");
        assert_eq!(daemon_address("git.example:9000"), "git.example:9000");
        assert_eq!(daemon_address("[::1]"), "[::1]:9418");
        assert_eq!(daemon_address("[::1]:9000"), "[::1]:9000");
    }

    /// A repository with `main` and `feature`; their commits.
    fn repository(dir: &std::path::Path) -> (String, String) {
        let script = "git init -q -b main repo && cd repo && git config user.email t@e && git config user.name t \
             && git commit -q --allow-empty -m one && git checkout -qb feature && git commit -q --allow-empty -m two \
             && git rev-parse main feature";
        let out = std::process::Command::new("sh").args(["-c", script]).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines().map(str::to_owned);
        (lines.next().unwrap(), lines.next().unwrap())
    }

    #[tokio::test]
    async fn asks_git_daemon_for_a_tip() {
        let dir = tempfile::tempdir().unwrap();
        let (main, feature) = repository(dir.path());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut daemon = std::process::Command::new("git")
            .args(["daemon", "--reuseaddr", "--export-all", "--informative-errors", "--listen=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "git daemon did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let http = reqwest::Client::new();
        let url = format!("git://127.0.0.1:{port}/repo");
        let ask = |reference: &'static str| tip(&http, &url, reference, None, Duration::from_secs(10));
        assert_eq!(ask("refs/heads/main").await.unwrap(), Some(main));
        assert_eq!(ask("refs/heads/feature").await.unwrap(), Some(feature));
        assert_eq!(ask("refs/heads/feat").await.unwrap(), None);
        let nope = format!("git://127.0.0.1:{port}/nope");
        let missing = tip(&http, &nope, "refs/heads/main", None, Duration::from_secs(10)).await.unwrap_err();
        assert!(missing.0.contains("no such repository"), "{missing:?}");
        let _ = daemon.kill();
        let _ = daemon.wait();
    }

    /// `git http-backend` behind a test server that wants `token` as GitHub's basic auth.
    async fn smart_http(root: std::path::PathBuf, token: &'static str) -> String {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::IntoResponse;
        use base64::Engine;
        let expected =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}")));
        let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (root, expected) = (root.clone(), expected.clone());
            async move {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                if header("authorization") != expected {
                    return (StatusCode::UNAUTHORIZED, "credentials, please").into_response();
                }
                let mut cgi = tokio::process::Command::new("git")
                    .arg("http-backend")
                    .env("GIT_PROJECT_ROOT", &root)
                    .env("GIT_HTTP_EXPORT_ALL", "1")
                    .env("REQUEST_METHOD", method.as_str())
                    .env("PATH_INFO", uri.path())
                    .env("QUERY_STRING", uri.query().unwrap_or(""))
                    .env("CONTENT_TYPE", header("content-type"))
                    .env("GIT_PROTOCOL", header("git-protocol"))
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = cgi.stdin.take().unwrap();
                stdin.write_all(&body).await.unwrap();
                drop(stdin);
                let out = cgi.wait_with_output().await.unwrap().stdout;
                let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let (head, body) = (String::from_utf8_lossy(&out[..split]).into_owned(), out[split + 4..].to_vec());
                let mut status = StatusCode::OK;
                let mut content_type = String::new();
                for line in head.lines() {
                    if let Some(code) = line.strip_prefix("Status: ") {
                        status = StatusCode::from_u16(code[..3].parse().unwrap()).unwrap();
                    }
                    if let Some(value) = line.strip_prefix("Content-Type: ") {
                        content_type = value.to_owned();
                    }
                }
                (status, [("content-type", content_type)], body).into_response()
            }
        };
        let app = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn asks_a_smart_http_server_for_a_tip_with_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let (main, feature) = repository(dir.path());
        let base = smart_http(dir.path().to_owned(), "s3cret").await;
        let http = reqwest::Client::new();
        let url = format!("{base}/repo");
        let token = SecretString::from("s3cret");
        let ask = |reference: &'static str| tip(&http, &url, reference, Some(&token), Duration::from_secs(10));
        assert_eq!(ask("refs/heads/main").await.unwrap(), Some(main));
        assert_eq!(ask("refs/heads/feature").await.unwrap(), Some(feature));
        assert_eq!(ask("refs/heads/nope").await.unwrap(), None);
        let refused = tip(&http, &url, "refs/heads/main", None, Duration::from_secs(10)).await.unwrap_err();
        assert!(refused.0.contains("401"), "{refused:?}");
        let ssh = tip(&http, "ssh://git@example.invalid/r.git", "refs/heads/main", None, Duration::from_secs(1));
        assert!(ssh.await.is_err());
    }
}
