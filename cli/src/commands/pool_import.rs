//! `cim pool import`: the original CIMaster's inventory (its `clusters` ConfigMap's `cluster.json`)
//! into the pool, idempotently: inventory, holds and disabled flags as the file has them; clusters
//! `testing` there come in vacant, or leased again with `--keep-leases`.

use std::io::Read;
use std::path::PathBuf;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{encode, Api};
use crate::error::{failed, CliError, Result};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The `cluster.json` file, or `-` for stdin
    /// (`kubectl get configmap clusters -n ci -o jsonpath='{.data.cluster\.json}' | cim pool import -`).
    file: PathBuf,
    /// Say what would change, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Lease clusters that are `testing` in the file again (for their `lastJob`/`lastBuild`),
    /// instead of importing them vacant.
    #[arg(long)]
    keep_leases: bool,
}

/// One cluster as the original CIMaster kept it; fields it may add are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    name: String,
    region: String,
    #[serde(default)]
    status: Option<String>,
    last_job: Option<String>,
    last_build: Option<String>,
    last_trigger_name: Option<String>,
    #[serde(default)]
    hold: bool,
    #[serde(default)]
    disabled: bool,
    purpose: Option<String>,
    osimage: Option<String>,
}

pub async fn import(api: &Api, args: ImportArgs) -> Result<()> {
    let entries = read(&args.file)?;
    for entry in &entries {
        let done = one(api, entry, &args).await?;
        let verb = if args.dry_run { "would be " } else { "" };
        let what = if done.steps.is_empty() { String::new() } else { format!(" ({})", done.steps.join(", ")) };
        println!("cluster {}: {verb}{}{what}", entry.name, done.change);
    }
    Ok(())
}

fn read(file: &PathBuf) -> Result<Vec<Entry>> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map_err(|err| failed(format!("cannot read stdin: {err}")))?;
    } else {
        text = std::fs::read_to_string(file).map_err(|err| failed(format!("{}: {err}", file.display())))?;
    }
    serde_json::from_str(&text).map_err(|err| {
        failed(format!("{}: not the original CIMaster's cluster.json (an array of clusters): {err}", file.display()))
    })
}

/// What importing one cluster did (or would do).
struct Done {
    change: &'static str,
    steps: Vec<&'static str>,
}

async fn one(api: &Api, entry: &Entry, args: &ImportArgs) -> Result<Done> {
    let name = encode(&entry.name);
    let current = existing(api, &name).await?;
    let purpose = entry.purpose.clone().unwrap_or_else(|| "tess-ci".to_owned());
    let mut change = inventory(api, entry, &purpose, current.as_ref(), args.dry_run).await?;
    let mut steps = Vec::new();
    let has = |field: &str| current.as_ref().is_some_and(|cluster| !cluster[field].is_null());

    if entry.disabled != has("disabled") {
        steps.push(if entry.disabled { "disabled" } else { "enabled" });
        if !args.dry_run {
            let path = if entry.disabled {
                format!("/disablecluster?cluster={name}&reason={}", encode("disabled in the imported inventory"))
            } else {
                format!("/enablecluster?cluster={name}")
            };
            legacy(api, &path).await?;
        }
    }
    if entry.hold != has("hold") {
        steps.push(if entry.hold { "held" } else { "hold ended" });
        if !args.dry_run {
            let path = if entry.hold {
                let by = entry.last_trigger_name.as_deref().unwrap_or("someone");
                format!("/holdcluster?cluster={name}&desc={}", encode(&format!("held by {by} before the import")))
            } else {
                format!("/releasecluster?cluster={name}")
            };
            legacy(api, &path).await?;
        }
    }
    if args.keep_leases && entry.status.as_deref() == Some("testing") && !has("lease") {
        steps.push("leased");
        if !args.dry_run {
            lease(api, entry, &purpose).await?;
        }
    }
    if change == "unchanged" && !steps.is_empty() {
        change = "updated";
    }
    Ok(Done { change, steps })
}

async fn existing(api: &Api, name: &str) -> Result<Option<Value>> {
    match api.get(&format!("/pool/clusters/{name}")).await {
        Ok(cluster) => Ok(Some(cluster)),
        Err(CliError::Failed(message)) if message.starts_with("404") => Ok(None),
        Err(err) => Err(err),
    }
}

/// Region, purpose and OS image: `PUT /pool/clusters/{name}` (or, dry, a comparison).
async fn inventory(
    api: &Api,
    entry: &Entry,
    purpose: &str,
    current: Option<&Value>,
    dry_run: bool,
) -> Result<&'static str> {
    let mut body = json!({ "region": entry.region, "purpose": purpose });
    if let Some(osimage) = &entry.osimage {
        body["osimage"] = json!(osimage);
    }
    if dry_run {
        return Ok(match current {
            None => "created",
            Some(cluster)
                if cluster["region"] == body["region"]
                    && cluster["purpose"] == body["purpose"]
                    && cluster["osimage"].as_str() == entry.osimage.as_deref() =>
            {
                "unchanged"
            }
            Some(_) => "updated",
        });
    }
    let path = format!("/pool/clusters/{}", encode(&entry.name));
    let applied = api.json(api.request(Method::PUT, &path).json(&body)).await?;
    Ok(match applied["change"].as_str() {
        Some("created") => "created",
        Some("updated") => "updated",
        _ => "unchanged",
    })
}

async fn legacy(api: &Api, path: &str) -> Result<()> {
    api.send(api.request(Method::POST, path).header("Accept", "application/json")).await.map(drop)
}

async fn lease(api: &Api, entry: &Entry, purpose: &str) -> Result<()> {
    let mut body = json!({
        "purpose": purpose,
        "cluster": entry.name,
        "job": entry.last_job.as_deref().unwrap_or("imported"),
        "build": entry.last_build.clone().unwrap_or_else(|| format!("imported-{}", entry.name)),
    });
    if let Some(osimage) = &entry.osimage {
        body["osimage"] = json!(osimage);
    }
    api.json(api.request(Method::POST, "/pool/leases").json(&body)).await.map(drop)
}
