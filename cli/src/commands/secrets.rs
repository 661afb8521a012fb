//! `cim secrets set|ls|rm`: a secret's value is read from stdin (or a prompt that does not echo),
//! never from the command line, and never printed.

use std::io::{IsTerminal, Read};

use reqwest::Method;
use serde_json::json;

use crate::client::{encode, Api};
use crate::error::{failed, Result};
use crate::output::{ago, table, text, Output};

#[derive(clap::Subcommand)]
pub enum SecretsCommand {
    /// Set a secret; its value is read from stdin (`cim secrets set JOB KEY < file`).
    Set { job: String, key: String },
    /// A job's secrets, by name only.
    Ls {
        job: String,
        #[command(flatten)]
        output: Output,
    },
    /// Delete a secret.
    Rm { job: String, key: String },
}

pub async fn secrets(api: &Api, command: SecretsCommand) -> Result<()> {
    match command {
        SecretsCommand::Set { job, key } => {
            let value = read_value(&key)?;
            let path = format!("/jobs/{}/secrets/{}", encode(&job), encode(&key));
            let answer = api.json(api.request(Method::PUT, &path).json(&json!({ "value": value }))).await?;
            println!("secret {} of job {job} set (by {})", text(&answer, "name"), text(&answer, "updatedBy"));
        }
        SecretsCommand::Ls { job, output } => {
            let list = api.get(&format!("/jobs/{}/secrets", encode(&job))).await?;
            output.print(&list, |list| {
                let rows: Vec<Vec<String>> = list["secrets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|secret| {
                        vec![text(secret, "name"), text(secret, "updatedBy"), ago(&text(secret, "updatedAt"))]
                    })
                    .collect();
                table(&["NAME", "UPDATED BY", "UPDATED"], &rows);
            });
        }
        SecretsCommand::Rm { job, key } => {
            let path = format!("/jobs/{}/secrets/{}", encode(&job), encode(&key));
            api.send(api.request(Method::DELETE, &path)).await?;
            println!("secret {key} of job {job} deleted");
        }
    }
    Ok(())
}

/// The value: typed at a prompt without echo, or all of stdin less one final newline.
fn read_value(key: &str) -> Result<String> {
    let value = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("Value of {key}: ")).map_err(|err| failed(format!("cannot read: {err}")))?
    } else {
        let mut value = String::new();
        std::io::stdin().read_to_string(&mut value).map_err(|err| failed(format!("cannot read stdin: {err}")))?;
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        value
    };
    if value.is_empty() {
        return Err(failed("the value is empty: pipe it in, e.g. `cim secrets set JOB KEY < file`"));
    }
    Ok(value)
}
