//! The web UI in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven over
//! WebDriver) against a real master and agent: sign in, trigger from a job's page, watch the console
//! grow while the run runs, read the JUnit failures, filter the runs list, abort from the page, and
//! what a read-only token and a forged form cannot do. Each test saves screenshots under the build
//! directory (`target/<profile>/ui-screenshots`).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cimaster_master::auth::{Role, Signer};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use sqlx::PgPool;
use support::{busybox_job, free_port, run_id, AgentOptions, Stack, SECRET};
use tokio::process::{Child, Command};

/// A headless Chromium under its own chromedriver; both stop when it is dropped.
struct Browser {
    client: Client,
    _driver: Child,
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed by scripts/dev");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                            "--window-size=1280,1000", "--lang=en"]}),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            // Plain HTTP to the local driver: no TLS stack needed.
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let attempt = ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await;
            match attempt {
                Ok(client) => break client,
                Err(err) => {
                    assert!(Instant::now() < deadline, "chromedriver never answered: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self { client, _driver: driver }
    }

    /// Saves what the browser shows as `ui-screenshots/<name>.png` in the build directory.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshots();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn sign_in(&self, base: &str, token: &str) {
        self.client.goto(&format!("{base}/ui/runs")).await.unwrap();
        // Not signed in: the login form, which comes back to the runs.
        let url = self.client.current_url().await.unwrap();
        assert_eq!(url.path(), "/ui/login", "{url}");
        self.client.find(Locator::Id("token")).await.unwrap().send_keys(token).await.unwrap();
        self.client.find(Locator::Id("sign-in")).await.unwrap().click().await.unwrap();
        self.wait_path(|path| path == "/ui/runs").await;
    }

    /// Waits (bounded) until the browser is at a page whose path satisfies `done`: a click that
    /// submits a form returns before the next page has loaded.
    async fn wait_path(&self, done: impl Fn(&str) -> bool) -> reqwest::Url {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = self.client.current_url().await.unwrap();
            let ready = self.script("return document.readyState").await == "complete";
            if done(url.path()) && ready {
                return url;
            }
            assert!(Instant::now() < deadline, "the browser stayed at {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    async fn script(&self, code: &str) -> Value {
        self.client.execute(code, Vec::new()).await.unwrap()
    }

    /// Waits (bounded) for an element, and returns its text. A page that replaces the element
    /// while it is read (the live parts do) is read again.
    async fn wait_text(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.text().await,
                Err(err) => Err(err),
            };
            match found {
                Ok(text) => return text,
                Err(err) => assert!(Instant::now() < deadline, "`{css}` never showed: {err}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The session cookie the browser holds.
    async fn session_cookie(&self) -> String {
        let cookies = self.client.get_all_cookies().await.unwrap();
        let cookie = cookies.iter().find(|cookie| cookie.name() == "cimaster_session").expect("signed in");
        assert_eq!(cookie.http_only(), Some(true), "the session cookie is HttpOnly");
        format!("cimaster_session={}", cookie.value())
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

fn screenshots() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("ui-screenshots")
}

fn token(subject: &str, role: Role) -> String {
    Signer::hs256(SECRET).unwrap().mint(subject, &[role], Duration::from_secs(3600))
}

const REPORT: &str = r#"<testsuite name="calc" tests="3"><testcase classname="calc" name="adds" time="0.01"/><testcase classname="calc" name="carries" time="0.02"><failure message="expected 10, got 9">calc_test.go:42: carry lost
want 10</failure><system-out>computing 9+1</system-out></testcase><testcase classname="calc" name="later"><skipped/></testcase></testsuite>"#;

fn live_job() -> Value {
    let script = format!(
        "printf '\\033[31mred alert\\033[0m\\n'; echo '<script>window.injected=1</script>'; \
         for i in $(seq 1 16); do echo \"step $i\"; sleep 0.5; done; \
         mkdir -p out && echo '{REPORT}' > out/junit.xml; exit 1"
    );
    json!({"kind": "freestyle", "image": "busybox:latest", "script": script, "workingDir": "/build",
           "results": {"junit": ["out/*.xml"]}, "parameters": {"GREETING": "hello"},
           "resources": {"cpus": 0.5, "memory": "64Mi"}})
}

/// Polls an API resource (bounded) until it satisfies `done`.
async fn poll_api(stack: &Stack, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply =
            stack.api.request(reqwest::Method::GET, path).header("accept", "application/json").send().await.unwrap();
        let body: Value = reply.json().await.unwrap();
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never got there: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the API until the run's status satisfies `done`.
async fn wait_status(stack: &Stack, path: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Value {
    stack.wait_for(path, timeout, done).await
}

#[sqlx::test(migrations = "../migrations")]
async fn a_run_triggered_from_its_page_is_followed_live_to_its_test_failures(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    stack.add_agent(AgentOptions::default()).await;
    stack.put_job("ui-live", live_job()).await;
    stack.put_job("ui-other", busybox_job("echo other")).await;
    let base = stack.api.base.clone();
    let browser = Browser::start().await;
    browser.sign_in(&base, &token("alice", Role::Trigger)).await;
    browser.screenshot("login-then-runs").await;

    // Trigger from the job's page, with a parameter changed: the browser lands on the new run.
    browser.client.goto(&format!("{base}/ui/jobs/ui-live")).await.unwrap();
    let greeting = browser.client.find(Locator::Css("input[name='param.GREETING']")).await.unwrap();
    greeting.clear().await.unwrap();
    greeting.send_keys("bonjour").await.unwrap();
    browser.client.find(Locator::Id("trigger")).await.unwrap().click().await.unwrap();
    let url = browser.wait_path(|path| path.starts_with("/ui/jobs/ui-live/runs/")).await;
    let path = url.path().trim_start_matches("/ui").to_owned();
    let run = stack.api.get(&path).await.body;
    assert_eq!(run["parameters"]["GREETING"], "bonjour", "{run}");
    assert_eq!(run["triggeredBy"], "alice");

    // Lines appear while the run runs.
    wait_status(&stack, &path, Duration::from_secs(60), |status| status == "running").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser.count("#console .line").await < 4 {
        assert!(Instant::now() < deadline, "the console showed no lines while the run ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = browser.count("#console .line").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = browser.count("#console .line").await;
    let status = stack.api.get(&path).await.body["status"].clone();
    assert!(later > first, "no new lines in 1.5 s of a running run ({first} then {later})");
    assert_eq!(status, "running", "the lines must arrive while the run runs");
    browser.screenshot("run-live").await;

    // The coloured line in colour, the markup as text.
    let red = browser
        .script(
            "const span = document.querySelector('#console .a-f1');
             if (!span) return null;
             return [span.textContent, getComputedStyle(span).color, getComputedStyle(span.parentElement).color];",
        )
        .await;
    assert_eq!(red[0], "red alert", "{red}");
    assert_ne!(red[1], red[2], "the red line is drawn in its own colour: {red}");
    let markup = browser
        .script(
            "return [Array.from(document.querySelectorAll('#console .tx')).some(e => e.textContent === '<script>window.injected=1</script>'),
                     document.querySelectorAll('#console script').length, typeof window.injected];",
        )
        .await;
    assert_eq!(markup, json!([true, 0, "undefined"]), "a <script> line is text, never markup");
    assert_eq!(browser.script("return document.querySelector('#L3 a.ln').getAttribute('href')").await, "#L3");

    // When the run ends, its page shows the failure summary without a reload.
    let failure = browser.wait_text("#junit .failure", Duration::from_secs(60)).await;
    assert!(failure.contains("calc › carries") && failure.contains("expected 10, got 9"), "{failure}");
    assert!(failure.contains("calc_test.go:42"), "the failure's place and text show: {failure}");
    let tally = browser.wait_text("#junit .tally", Duration::from_secs(5)).await;
    assert!(tally.contains("3 tests") && tally.contains("1 passed, 1 failed, 0 errored, 1 skipped"), "{tally}");
    let summary = browser.wait_text("#summary h1 .status", Duration::from_secs(10)).await;
    assert!(summary.contains("failed"), "{summary}");
    assert_eq!(browser.count("#abort").await, 0, "an ended run has no abort button");
    browser.script("document.getElementById('follow').checked = false; window.scrollTo(0, 0); return true").await;
    browser.screenshot("run-failed").await;

    // The raw log downloads through the page's session; the console's stream resumes where a
    // reconnect says it was, without repeating lines.
    let cookie = browser.session_cookie().await;
    let http = reqwest::Client::new();
    let raw = http.get(format!("{base}/ui{path}/results/console")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(raw.status(), 200);
    let raw = raw.text().await.unwrap();
    assert!(raw.contains("step 16"), "{raw}");
    let events = sse(&http, &format!("{base}/ui{path}/console"), &cookie, None).await;
    let lines: usize = events
        .iter()
        .filter(|(kind, _, _)| kind == "lines")
        .map(|(_, _, data)| data.matches("class=\"line\"").count())
        .sum();
    assert_eq!(lines, raw.lines().count(), "every line once");
    assert_eq!(events.last().unwrap().0, "end");
    // A browser that had the first five lines comes back for the sixth and what follows.
    let had: usize = raw.split_inclusive('\n').take(5).map(str::len).sum();
    let resumed = sse(&http, &format!("{base}/ui{path}/console"), &cookie, Some(&format!("{had}.5"))).await;
    let first = &resumed[0].2;
    assert!(first.starts_with("<span class=\"line\" id=\"L6\">"), "resumed: {first}");
    let sixth = raw.lines().nth(5).unwrap().split_once(' ').unwrap().1;
    assert!(first.contains(&sixth.replace('<', "&lt;").replace('>', "&gt;")), "line 6 is `{sixth}`: {first}");
    let again: usize = resumed.iter().map(|(_, _, data)| data.matches("class=\"line\"").count()).sum();
    assert_eq!(again, lines - 5, "nothing repeated, nothing missed");

    // The runs list: filtered by job with its form, by status with a link.
    let other = stack.trigger("ui-other").await;
    stack.wait_finished(&other, Duration::from_secs(60)).await;
    browser.client.goto(&format!("{base}/ui/runs")).await.unwrap();
    assert_eq!(browser.count("#runs tbody tr").await, 2);
    let form = browser.client.form(Locator::Css("form.filters")).await.unwrap();
    form.set_by_name("job", "ui-other").await.unwrap();
    form.submit().await.unwrap();
    browser.wait_path(|path| path == "/ui/runs").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !browser.client.current_url().await.unwrap().query().unwrap_or("").contains("job=ui-other") {
        assert!(Instant::now() < deadline, "the filter form was not submitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser.wait_path(|path| path == "/ui/runs").await;
    let jobs =
        browser.script("return Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.dataset.job)").await;
    assert_eq!(jobs, json!(["ui-other"]), "filtered by job");
    browser.client.goto(&format!("{base}/ui/runs?status=failed")).await.unwrap();
    let statuses = browser
        .script("return Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.dataset.status)")
        .await;
    assert_eq!(statuses, json!(["failed"]), "filtered by status");
    browser.client.goto(&format!("{base}/ui/runs")).await.unwrap();
    browser.screenshot("runs").await;
    assert!(run_id(&path).len() > 8);
    browser.close().await;
}

/// Reads a console stream to its end: (event, id, data) each.
async fn sse(http: &reqwest::Client, url: &str, cookie: &str, last_id: Option<&str>) -> Vec<(String, String, String)> {
    let mut request = http.get(url).header("cookie", cookie).header("accept", "text/event-stream");
    if let Some(id) = last_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the stream of an ended run ends")
        .unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .filter_map(|line| line.strip_prefix(name))
                    .map(|v| v.trim_start())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            (field("event:"), field("id:"), field("data:"))
        })
        .collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_run_is_aborted_from_its_page_and_read_only_or_forged_requests_change_nothing(pool: PgPool) {
    let mut stack = Stack::start(pool).await;
    let agent = stack.add_agent(AgentOptions::default()).await;
    stack.put_job("ui-long", busybox_job("echo started; sleep 120")).await;
    let base = stack.api.base.clone();
    let browser = Browser::start().await;

    // A refused token shows the form again with why.
    browser.client.goto(&format!("{base}/ui/login")).await.unwrap();
    browser.client.find(Locator::Id("token")).await.unwrap().send_keys("not-a-token").await.unwrap();
    browser.client.find(Locator::Id("sign-in")).await.unwrap().click().await.unwrap();
    browser.wait_path(|path| path == "/ui/login").await;
    let refusal = browser.wait_text(".problem", Duration::from_secs(5)).await;
    assert!(refusal.contains("not valid"), "{refusal}");

    browser.sign_in(&base, &token("ops", Role::Admin)).await;
    browser.client.goto(&format!("{base}/ui/jobs/ui-long")).await.unwrap();
    browser.client.find(Locator::Id("trigger")).await.unwrap().click().await.unwrap();
    let url = browser.wait_path(|path| path.starts_with("/ui/jobs/ui-long/runs/")).await;
    let path = url.path().trim_start_matches("/ui").to_owned();
    browser.wait_text("#console .line", Duration::from_secs(60)).await;
    wait_status(&stack, &path, Duration::from_secs(30), |status| status == "running").await;
    browser.client.find(Locator::Id("abort")).await.unwrap().click().await.unwrap();
    let ended = wait_status(&stack, &path, Duration::from_secs(60), |status| status != "running").await;
    assert_eq!(ended["status"], "aborted", "{ended}");
    assert!(ended["message"].as_str().unwrap_or("").contains("ops"), "the message names who aborted: {ended}");
    browser.client.goto(&format!("{base}/ui{path}")).await.unwrap();
    let shown = browser.wait_text("#summary h1 .status", Duration::from_secs(10)).await;
    assert!(shown.contains("aborted"), "{shown}");
    browser.screenshot("run-aborted").await;

    // The agents and pool pages show what the master knows; an admin holds, releases, disables
    // and enables a cluster from the pool's page.
    browser.client.goto(&format!("{base}/ui/agents")).await.unwrap();
    let agents = browser.wait_text("#agents", Duration::from_secs(5)).await;
    assert!(agents.contains(&stack.agents[agent].id), "{agents}");
    let cluster = stack.api.put("/pool/clusters/ui-c1", json!({"region": "eu"})).await;
    assert_eq!(cluster.status, 201, "{}", cluster.body);
    browser.client.goto(&format!("{base}/ui/pool")).await.unwrap();
    let hold = browser.client.form(Locator::Css("form[action='/ui/pool/clusters/ui-c1/hold']")).await.unwrap();
    hold.set_by_name("reason", "debugging <flaky> test").await.unwrap();
    hold.set_by_name("hours", "2").await.unwrap();
    hold.submit().await.unwrap();
    let held = poll_api(&stack, "/pool/clusters/ui-c1", |c| c["hold"]["by"] == "ops").await;
    assert_eq!(held["hold"]["reason"], "debugging <flaky> test", "{held}");
    browser.wait_path(|path| path == "/ui/pool").await;
    let row = browser.wait_text("#clusters", Duration::from_secs(5)).await;
    assert!(row.contains("held by ops (debugging <flaky> test)"), "{row}");
    browser.screenshot("pool").await;
    browser
        .client
        .find(Locator::Css("form[action='/ui/pool/clusters/ui-c1/release'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    poll_api(&stack, "/pool/clusters/ui-c1", |c| c["hold"].is_null()).await;
    browser.wait_path(|path| path == "/ui/pool").await;
    let disable = browser.client.form(Locator::Css("form[action='/ui/pool/clusters/ui-c1/disable']")).await.unwrap();
    disable.set_by_name("reason", "broken network").await.unwrap();
    disable.submit().await.unwrap();
    poll_api(&stack, "/pool/clusters/ui-c1", |c| c["disabled"]["reason"] == "broken network").await;
    browser.wait_path(|path| path == "/ui/pool").await;
    browser
        .client
        .find(Locator::Css("form[action='/ui/pool/clusters/ui-c1/enable'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    poll_api(&stack, "/pool/clusters/ui-c1", |c| c["disabled"].is_null()).await;

    // A form posted without the session's CSRF token (as another site would) is refused, even
    // with the admin's cookie, and the run keeps running.
    let running = stack.trigger("ui-long").await;
    wait_status(&stack, &running, Duration::from_secs(60), |status| status == "running").await;
    let admin_cookie = browser.session_cookie().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let abort_url = format!("{base}/ui{running}/abort");
    for form in [vec![], vec![("csrf", "0123456789abcdef0123456789abcdef")]] {
        let forged = http.post(&abort_url).header("cookie", &admin_cookie).form(&form).send().await.unwrap();
        assert_eq!(forged.status(), 403, "forged form {form:?}");
        assert!(forged.text().await.unwrap().contains("CSRF"));
    }
    assert_eq!(stack.api.get(&running).await.body["status"], "running");

    // Sign out: the next page asks to sign in again.
    browser.client.find(Locator::Css("form.who button")).await.unwrap().click().await.unwrap();
    browser.wait_path(|path| path == "/ui/login").await;
    browser.client.goto(&format!("{base}/ui/runs")).await.unwrap();
    assert_eq!(browser.client.current_url().await.unwrap().path(), "/ui/login");

    // A read-only token sees no trigger, abort or rerun; its own forms' token does not give it the
    // role it lacks.
    browser.sign_in(&base, &token("viewer", Role::Read)).await;
    browser.client.goto(&format!("{base}/ui/jobs/ui-long")).await.unwrap();
    browser.wait_text("h1", Duration::from_secs(5)).await;
    assert_eq!(browser.count("#trigger-form").await, 0, "a reader sees no trigger form");
    browser.client.goto(&format!("{base}/ui{running}")).await.unwrap();
    browser.wait_text("#console .line", Duration::from_secs(30)).await;
    assert_eq!(browser.count("#abort").await + browser.count("#rerun").await, 0, "a reader sees no abort or rerun");
    browser.client.goto(&format!("{base}/ui/pool")).await.unwrap();
    browser.wait_text("#clusters", Duration::from_secs(5)).await;
    assert_eq!(browser.count("td.admin form").await, 0, "a reader sees no pool actions");
    browser.client.goto(&format!("{base}/ui{running}")).await.unwrap();
    browser.wait_text("#console .line", Duration::from_secs(30)).await;
    browser.screenshot("read-only").await;
    let reader_cookie = browser.session_cookie().await;
    let csrf = browser.script("return document.querySelector('form.who input[name=csrf]').value").await;
    let refused = http
        .post(&abort_url)
        .header("cookie", &reader_cookie)
        .form(&[("csrf", csrf.as_str().unwrap())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("trigger"), "refused for the role");
    assert_eq!(stack.api.get(&running).await.body["status"], "running");

    // The runs list updates itself while a run is active: the abort shows without a reload.
    browser.client.goto(&format!("{base}/ui/runs")).await.unwrap();
    let row = format!("#runs tr[data-job='ui-long'] a[href='/ui{running}']");
    browser.wait_text(&row, Duration::from_secs(5)).await;
    browser.script("document.body.dataset.marker = 'same page'; return true").await;
    let reply = stack.api.post(&format!("{running}/abort"), json!({})).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let shown = browser
            .script(&format!(
                "const link = document.querySelector(\"{row}\"); return link && link.closest('tr').dataset.status"
            ))
            .await;
        if shown == "aborted" {
            break;
        }
        assert!(Instant::now() < deadline, "the list never showed the abort (it shows {shown})");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        browser.script("return document.body.dataset.marker").await,
        "same page",
        "updated in place, not reloaded"
    );

    // On a phone-sized screen the pages fit its width.
    browser.client.set_window_size(390, 844).await.unwrap();
    for page in ["/ui/runs", "/ui/jobs/ui-long"] {
        browser.client.goto(&format!("{base}{page}")).await.unwrap();
        browser.wait_text("h1", Duration::from_secs(5)).await;
        let overflow = browser.script("return document.documentElement.scrollWidth - window.innerWidth").await;
        assert!(overflow.as_i64().unwrap() <= 0, "{page} is wider than a phone by {overflow} px");
    }
    browser.screenshot("runs-phone").await;
    browser.close().await;
}
