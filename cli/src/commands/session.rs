//! `cim login`, `cim context ls|use` and `cim whoami`.

use std::io::{IsTerminal, Read};

use base64::Engine;
use serde_json::{json, Value};

use crate::client::Api;
use crate::config::{ConfigFile, Context};
use crate::error::{failed, Result};
use crate::output::{table, Output};

/// `cim login --url URL [--name NAME]` (`--url` is the global flag).
#[derive(clap::Args)]
pub struct LoginArgs {
    /// The context's name (default: the URL's host and port).
    #[arg(long)]
    name: Option<String>,
}

/// Reads the token (stdin, or a prompt that does not echo), checks it against the master, and saves
/// it as a context that becomes the current one.
pub async fn login(url: Option<&str>, args: LoginArgs) -> Result<()> {
    let url = url.ok_or_else(|| failed("give the master's URL: `cim login --url http://host:port`"))?;
    let token = read_token()?;
    let api = Api::new(url, Some(token.clone()))?;
    api.get("/runs?limit=1").await?;
    let name = args.name.unwrap_or_else(|| {
        url.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').to_owned()
    });
    let mut saved = ConfigFile::load()?;
    saved.contexts.insert(name.clone(), Context { url: api.base.clone(), token });
    saved.current = Some(name.clone());
    saved.save()?;
    println!("signed in to {} as context `{name}` (now current)", api.base);
    Ok(())
}

fn read_token() -> Result<String> {
    let token = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Token: ").map_err(|err| failed(format!("cannot read the token: {err}")))?
    } else {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|err| failed(format!("cannot read stdin: {err}")))?;
        text
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(failed("no token given (pipe it in, or type it at the prompt)"));
    }
    Ok(token)
}

#[derive(clap::Subcommand)]
pub enum ContextCommand {
    /// List the saved contexts; `*` marks the current one.
    Ls,
    /// Make a saved context the current one.
    Use { name: String },
}

pub fn context(command: ContextCommand) -> Result<()> {
    let mut saved = ConfigFile::load()?;
    match command {
        ContextCommand::Ls => {
            let rows: Vec<Vec<String>> = saved
                .contexts
                .iter()
                .map(|(name, context)| {
                    let mark = if saved.current.as_deref() == Some(name) { "*" } else { "" };
                    vec![mark.to_owned(), name.clone(), context.url.clone()]
                })
                .collect();
            table(&["", "NAME", "URL"], &rows);
        }
        ContextCommand::Use { name } => {
            if !saved.contexts.contains_key(&name) {
                return Err(failed(format!("no context `{name}`: `cim context ls` lists them")));
            }
            saved.current = Some(name.clone());
            saved.save()?;
            println!("current context: {name}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    output: Output,
}

/// What the token says (read, not verified: the master verifies it on every request).
pub fn whoami(token: &str, args: &WhoamiArgs) -> Result<()> {
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|payload| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .ok_or_else(|| failed("the token is not a JWT"))?;
    let expires = claims
        .get("exp")
        .and_then(Value::as_i64)
        .and_then(|exp| chrono::DateTime::from_timestamp(exp, 0))
        .map(|at| at.to_rfc3339());
    let view = json!({
        "subject": claims.get("sub"),
        "roles": claims.get("roles"),
        "audience": claims.get("aud"),
        "expiresAt": expires,
    });
    args.output.print(&view, |view| {
        let roles: Vec<&str> =
            view["roles"].as_array().map(|roles| roles.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        println!("subject:  {}", view["subject"].as_str().unwrap_or("?"));
        println!("roles:    {}", roles.join(", "));
        match view["expiresAt"].as_str() {
            Some(at) if chrono::DateTime::parse_from_rfc3339(at).is_ok_and(|at| at < chrono::Utc::now()) => {
                println!("expires:  {at} (expired)")
            }
            Some(at) => println!("expires:  {at}"),
            None => println!("expires:  never"),
        }
    });
    Ok(())
}
