//! The egress policy, tried from inside jobs: a run reaches a public address and its job's allowed
//! ranges, and not the engine's host (a port of the test's own, the agent's port), link-local and
//! metadata addresses, or private ranges. The "rest of the network" is a namespace of the test's
//! own behind a veth pair, holding a private, a link-local and a public-looking (TEST-NET-2)
//! address; a web server answers on all three. Master and agent processes, real Postgres,
//! RabbitMQ, s3s-fs and Docker; needs root (as `scripts/test` runs).
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use support::recorder::Recorder;
use support::{free_port, leftovers, run_id, AgentOptions, Stack};

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
const PUBLIC: &str = "198.51.100.2";
const LINK_LOCAL: &str = "169.254.99.99";

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("iproute2 (scripts/dev installs it)");
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A namespace joined to this machine by a veth pair, with a web server on port 8000 of each of its
/// addresses, removed on drop.
struct Beyond {
    namespace: String,
    host_veth: String,
    private: String,
    _server: std::process::Child,
}

impl Beyond {
    fn create() -> Self {
        sweep();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let (namespace, host_veth, ns_veth) = (format!("cimeg-{id}"), format!("cimeg{id}h"), format!("cimeg{id}n"));
        let third = u8::from_str_radix(&id[..2], 16).unwrap();
        let (host_ip, private) = (format!("10.214.{third}.1"), format!("10.214.{third}.2"));
        ip(&["netns", "add", &namespace]);
        ip(&["link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth]);
        ip(&["link", "set", &ns_veth, "netns", &namespace]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth]);
        ip(&["link", "set", &host_veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", namespace.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{private}/30"), "dev", &ns_veth]);
        inside(&["addr", "add", &format!("{PUBLIC}/32"), "dev", &ns_veth]);
        inside(&["addr", "add", &format!("{LINK_LOCAL}/32"), "dev", &ns_veth]);
        inside(&["link", "set", &ns_veth, "up"]);
        inside(&["route", "add", "default", "via", &host_ip]);
        ip(&["route", "replace", &format!("{PUBLIC}/32"), "via", &private]);
        ip(&["route", "replace", &format!("{LINK_LOCAL}/32"), "via", &private]);
        let dir = std::env::temp_dir();
        let server = Command::new("ip")
            .args(["netns", "exec", &namespace, "python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"])
            .arg("--directory")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((private.as_str(), 8000)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the namespace's web server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { namespace, host_veth, private, _server: server }
    }
}

/// Removes what an earlier run of this test left when it was killed before its drop.
fn sweep() {
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&namespaces.stdout).lines() {
        if let Some(name) = line.split_whitespace().next().filter(|name| name.starts_with("cimeg-")) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    let links = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        let name = line.split(": ").nth(1).and_then(|name| name.split('@').next()).unwrap_or_default();
        if name.starts_with("cimeg") {
            let _ = Command::new("ip").args(["link", "del", name]).status();
        }
    }
}

impl Drop for Beyond {
    fn drop(&mut self) {
        let _ = self._server.kill();
        let _ = Command::new("ip").args(["link", "del", &self.host_veth]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.namespace]).status();
    }
}

/// Tries each address from the job; prints `NAME reached` or `NAME blocked` for each.
fn probes(targets: &[(&str, String)]) -> String {
    let mut script = String::from(
        "gw=$(ip route | awk '/default/ {print $3}')\n\
         probe() {\n\
           if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 \"${2%:*}\" \"${2##*:}\" 2>/dev/null | grep -q '^HTTP/1'; \
           then echo \"$1 reached\"; else echo \"$1 blocked\"; fi\n\
         }\n",
    );
    for (name, target) in targets {
        script.push_str(&format!("probe {name} {target}\n"));
    }
    script.push_str("echo probes done\n");
    script
}

/// The run's console once it holds the probes' last line (bounded).
async fn console_of(stack: &Stack, path: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let console = stack.console(path).await;
        if console.contains("probes done") || std::time::Instant::now() > deadline {
            return console;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_reaches_the_internet_and_its_allowed_ranges_but_not_the_host_metadata_or_private_ranges(pool: PgPool) {
    let beyond = Beyond::create();
    let on_host = Recorder::start("0.0.0.0", OK);
    let agent_port = free_port();
    let mut stack = Stack::start(pool).await;
    let env = vec![("CIMASTER_AGENT_LISTEN", format!("0.0.0.0:{agent_port}"))];
    stack.add_agent(AgentOptions { env, ..AgentOptions::default() }).await;
    let targets = [
        ("public", format!("{PUBLIC}:8000")),
        ("private", format!("{}:8000", beyond.private)),
        ("link-local", format!("{LINK_LOCAL}:8000")),
        ("metadata", "169.254.169.254:80".to_owned()),
        ("host", format!("$gw:{}", on_host.port)),
        ("agent", format!("$gw:{agent_port}")),
    ];
    let job = |allow: Vec<String>| {
        json!({"kind": "freestyle", "image": "busybox:latest", "script": probes(&targets),
               "resources": {"cpus": 0.5, "memory": "64Mi"}, "egress": {"allow": allow}})
    };
    stack.put_job("closed", job(Vec::new())).await;
    stack.put_job("allowed", job(vec![format!("{}/32", beyond.private)])).await;

    // The agent says how its engine isolates runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let agents = loop {
        let agents = stack.api.get("/agents").await.body;
        if agents["agents"].as_array().is_some_and(|listed| !listed.is_empty()) {
            break agents;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not report itself: {agents}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let agent = &agents["agents"][0];
    assert_eq!(agent["egressRules"], true, "{agents}");
    let remapped = support::docker(&["info", "-f", "{{json .SecurityOptions}}"]).contains("name=userns");
    assert_eq!(agent["usernsRemap"], remapped, "{agents}");

    let path = stack.trigger("closed").await;
    let run = stack.wait_finished(&path, Duration::from_secs(90)).await;
    let console = console_of(&stack, &path).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{console}");
    assert!(console.contains("public reached"), "a public address is reached: {console}");
    for name in ["private", "link-local", "metadata", "host", "agent"] {
        assert!(console.contains(&format!("{name} blocked")), "{name}: {console}");
    }
    assert!(on_host.requests().is_empty(), "the job reached the engine's host: {:?}", on_host.requests());
    assert_eq!(leftovers(&run_id(&path)).await, (0, 0));

    let path = stack.trigger("allowed").await;
    let run = stack.wait_finished(&path, Duration::from_secs(90)).await;
    let console = console_of(&stack, &path).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{console}");
    assert!(console.contains(&format!("the job's runs reach {}/32 (egress.allow)", beyond.private)), "{console}");
    assert!(console.contains("private reached") && console.contains("public reached"), "{console}");
    for name in ["link-local", "metadata", "host", "agent"] {
        assert!(console.contains(&format!("{name} blocked")), "{name}: {console}");
    }

    // The exception ends with its run: the network lent next blocks the range again.
    let path = stack.trigger("closed").await;
    stack.wait_finished(&path, Duration::from_secs(90)).await;
    let console = console_of(&stack, &path).await;
    assert!(console.contains("private blocked") && console.contains("public reached"), "{console}");
}
