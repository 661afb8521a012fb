//! `cim jobs apply|ls|show|delete`: job definitions kept in files, applied idempotently.

use std::path::{Path, PathBuf};

use cimaster_common::{JobName, JobSpec};
use reqwest::Method;
use serde_json::Value;

use crate::client::{encode, Api};
use crate::error::{failed, Result};
use crate::output::{ago, paint, table, text, Output, Style};

#[derive(clap::Subcommand)]
pub enum JobsCommand {
    /// Create or update jobs from YAML or JSON files: the fields of `PUT /jobs/{name}` plus `name`,
    /// one job per document (or a list of them); a directory applies its *.yaml, *.yml and *.json.
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR", required = true)]
        files: Vec<PathBuf>,
        /// Change nothing: say what would change, with the difference.
        #[arg(long)]
        dry_run: bool,
    },
    /// Every job.
    Ls {
        #[command(flatten)]
        output: Output,
    },
    /// One job's definition.
    Show {
        name: String,
        #[command(flatten)]
        output: Output,
    },
    /// Delete a job (its runs stay).
    Delete { name: String },
}

pub async fn jobs(api: &Api, command: JobsCommand) -> Result<()> {
    match command {
        JobsCommand::Apply { files, dry_run } => apply(api, &files, dry_run).await,
        JobsCommand::Ls { output } => {
            let list = api.get("/jobs").await?;
            output.print(&list, |list| {
                let rows: Vec<Vec<String>> = list["jobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|job| {
                        vec![
                            text(job, "name"),
                            text(job, "kind"),
                            text(job, "queue"),
                            text(job, "version"),
                            ago(&text(job, "updatedAt")),
                        ]
                    })
                    .collect();
                table(&["NAME", "KIND", "QUEUE", "VERSION", "UPDATED"], &rows);
            });
            Ok(())
        }
        JobsCommand::Show { name, output } => {
            let job = api.get(&format!("/jobs/{}", encode(&name))).await?;
            output.print(&job, |job| print!("{}", serde_yaml::to_string(job).unwrap_or_default()));
            Ok(())
        }
        JobsCommand::Delete { name } => {
            api.send(api.request(Method::DELETE, &format!("/jobs/{}", encode(&name)))).await?;
            println!("job {name} deleted");
            Ok(())
        }
    }
}

/// A job definition from a file: its name and its spec, checked before anything is sent.
struct Definition {
    name: JobName,
    spec: JobSpec,
    from: String,
}

async fn apply(api: &Api, files: &[PathBuf], dry_run: bool) -> Result<()> {
    let mut definitions = Vec::new();
    for file in expand(files)? {
        definitions.extend(read(&file)?);
    }
    if definitions.is_empty() {
        return Err(failed("no job definitions found"));
    }
    for definition in &definitions {
        if dry_run {
            preview(api, definition).await?;
        } else {
            let body = serde_json::to_value(&definition.spec).map_err(|err| failed(err.to_string()))?;
            let path = format!("/jobs/{}", definition.name);
            let answer = api.json(api.request(Method::PUT, &path).json(&body)).await?;
            println!("job {}: {}", definition.name, text(&answer, "change"));
        }
    }
    Ok(())
}

/// Files named, and the definition files of directories named, in name order.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|err| failed(format!("{}: {err}", path.display())))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|file| {
                    file.is_file()
                        && file
                            .extension()
                            .and_then(|ext| ext.to_str())
                            .is_some_and(|ext| matches!(ext, "yaml" | "yml" | "json"))
                })
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Every job in a file: YAML documents (JSON is YAML too), each one job or a list of jobs.
fn read(file: &Path) -> Result<Vec<Definition>> {
    let shown = file.display().to_string();
    let content = std::fs::read_to_string(file).map_err(|err| failed(format!("{shown}: {err}")))?;
    let mut definitions = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&content) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|err| failed(format!("{shown}: {err}")))?;
        let jobs = match value {
            Value::Array(jobs) => jobs,
            Value::Null => continue,
            job => vec![job],
        };
        for job in jobs {
            definitions.push(definition(job, &shown)?);
        }
    }
    Ok(definitions)
}

fn definition(mut job: Value, from: &str) -> Result<Definition> {
    let fields = job.as_object_mut().ok_or_else(|| failed(format!("{from}: a job is a mapping of its fields")))?;
    let name = fields
        .remove("name")
        .and_then(|name| name.as_str().map(str::to_owned))
        .ok_or_else(|| failed(format!("{from}: a job needs `name`")))?;
    let name = JobName::parse(&name).map_err(|err| failed(format!("{from}: {err}")))?;
    let spec: JobSpec = serde_json::from_value(job).map_err(|err| failed(format!("{from}: job `{name}`: {err}")))?;
    Ok(Definition { name, spec, from: from.to_owned() })
}

/// What applying would do, with the difference for an update.
async fn preview(api: &Api, definition: &Definition) -> Result<()> {
    let name = &definition.name;
    let wanted = pretty(&definition.spec)?;
    let current = match api.send(api.request(Method::GET, &format!("/jobs/{name}"))).await {
        Ok(response) => response.json::<Value>().await.map_err(|err| failed(err.to_string()))?,
        Err(crate::error::CliError::Failed(message)) if message.starts_with("404") => {
            println!("job {name}: would be created (from {})", definition.from);
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    let mut spec = current;
    if let Some(fields) = spec.as_object_mut() {
        for meta in ["name", "version", "createdAt", "updatedAt", "change"] {
            fields.remove(meta);
        }
    }
    let current: JobSpec =
        serde_json::from_value(spec).map_err(|err| failed(format!("job `{name}` as the master has it: {err}")))?;
    let current = pretty(&current)?;
    if current == wanted {
        println!("job {name}: unchanged");
    } else {
        println!("job {name}: would be updated");
        for line in diff(&current, &wanted) {
            println!("{line}");
        }
    }
    Ok(())
}

fn pretty(spec: &JobSpec) -> Result<String> {
    serde_yaml::to_string(spec).map_err(|err| failed(err.to_string()))
}

/// A line diff (longest common subsequence): `-` lines only in `old`, `+` lines only in `new`.
fn diff(old: &str, new: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let mut common = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            common[i][j] = if a[i] == b[j] { common[i + 1][j + 1] + 1 } else { common[i + 1][j].max(common[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push(format!("  {}", a[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || common[i + 1][j] >= common[i][j + 1]) {
            lines.push(paint(Style::Red, &format!("- {}", a[i])));
            i += 1;
        } else {
            lines.push(paint(Style::Green, &format!("+ {}", b[j])));
            j += 1;
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_keeps_common_lines_and_marks_the_rest() {
        let lines = diff("a\nb\nc\n", "a\nc\nd\n");
        assert_eq!(lines, vec!["  a", "- b", "  c", "+ d"]);
    }

    #[test]
    fn a_file_holds_one_job_or_many() {
        let dir = std::env::temp_dir().join(format!("cim-jobs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let file = dir.join("jobs.yaml");
        std::fs::write(
            &file,
            "name: one\nkind: freestyle\nimage: busybox\nscript: 'true'\n---\n- name: two\n  kind: freestyle\n  image: busybox\n  script: [echo a, echo b]\n",
        )
        .unwrap_or_default();
        let definitions = read(&file).unwrap_or_default();
        let names: Vec<&str> = definitions.iter().map(|definition| definition.name.as_str()).collect();
        assert_eq!(names, vec!["one", "two"]);
        std::fs::write(&file, "kind: freestyle\nimage: busybox\nscript: 'true'\n").unwrap_or_default();
        assert!(read(&file).is_err_and(|err| err.to_string().contains("needs `name`")));
        std::fs::write(&file, "name: x\nkind: freestyle\nimage: busybox\nscript: 'true'\nimgae: typo\n")
            .unwrap_or_default();
        assert!(read(&file).is_err_and(|err| err.to_string().contains("imgae")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
