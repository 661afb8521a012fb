//! `cim pool ls|lease|release|hold|unhold|report|import`: the test-cluster pool.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{encode, Api};
use crate::error::Result;
use crate::output::{table, text, Output};

#[derive(clap::Subcommand)]
pub enum PoolCommand {
    /// Every cluster with its state, lease and hold.
    Ls {
        /// Only clusters of this purpose.
        #[arg(long)]
        purpose: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Lease a vacant cluster; prints the cluster and the lease's token (release needs it).
    Lease {
        #[arg(long, default_value = "tess-ci")]
        purpose: String,
        #[arg(long)]
        osimage: Option<String>,
        /// Wait up to this long for a cluster to free, e.g. `5m`.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// How long the lease lasts unless released, e.g. `2h` (default: the pool's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// What the lease is for; with --build it names the lease, and asking again gets it back.
        #[arg(long, default_value = "cim")]
        job: String,
        /// (default: a new one each time)
        #[arg(long)]
        build: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Give a leased cluster back.
    Release {
        /// The lease's token, as `pool lease` printed it.
        #[arg(id = "lease_token", value_name = "TOKEN")]
        token: i64,
        /// `infra_failure` when the cluster was at fault (repeated ones disable it).
        #[arg(long, value_parser = ["ok", "infra_failure"], default_value = "ok")]
        result: String,
    },
    /// Keep a cluster out of the pool for debugging.
    Hold {
        cluster: String,
        #[arg(long, default_value_t = 6.0)]
        hours: f64,
        /// Why (shown to everyone who lists the pool).
        #[arg(long, default_value = "held with cim")]
        desc: String,
    },
    /// End a hold.
    Unhold { cluster: String },
    /// Import the original CIMaster's inventory (`cluster.json`), idempotently (admin).
    Import(super::pool_import::ImportArgs),
    /// Utilisation, wait times and hold hours.
    Report {
        /// How far back, e.g. `24h`, `7d`.
        #[arg(long, default_value = "24h")]
        window: String,
        #[command(flatten)]
        output: Output,
    },
}

pub async fn pool(api: &Api, command: PoolCommand) -> Result<()> {
    match command {
        PoolCommand::Ls { purpose, output } => {
            let path = match purpose {
                Some(purpose) => format!("/pool/clusters?purpose={}", encode(&purpose)),
                None => "/pool/clusters".to_owned(),
            };
            let list = api.get(&path).await?;
            output.print(&list, |list| {
                let rows: Vec<Vec<String>> =
                    list["clusters"].as_array().into_iter().flatten().map(cluster_row).collect();
                table(&["CLUSTER", "STATE", "PURPOSE", "REGION", "HOLDER", "UNTIL"], &rows);
            });
        }
        PoolCommand::Lease { purpose, osimage, wait, ttl, job, build, output } => {
            let mut body = json!({
                "purpose": purpose,
                "job": job,
                "build": build.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
                "waitSeconds": wait.map_or(0, |wait| wait.as_secs()),
            });
            if let Some(osimage) = osimage {
                body["osimage"] = json!(osimage);
            }
            if let Some(ttl) = ttl {
                body["ttlSeconds"] = json!(ttl.as_secs());
            }
            let lease = api.json(api.request(Method::POST, "/pool/leases").json(&body)).await?;
            output.print(&lease, |lease| {
                println!("cluster: {}", text(lease, "cluster"));
                println!("token:   {}", text(lease, "token"));
                println!("expires: {}", text(lease, "expires"));
            });
        }
        PoolCommand::Release { token, result } => {
            let path = format!("/pool/leases/{token}/release");
            let cluster = api.json(api.request(Method::POST, &path).json(&json!({ "result": result }))).await?;
            println!("cluster {} released ({})", text(&cluster, "name"), text(&cluster, "status"));
        }
        PoolCommand::Hold { cluster, hours, desc } => {
            let path = format!("/holdcluster?cluster={}&hours={hours}&desc={}", encode(&cluster), encode(&desc));
            let view = api.json(api.request(Method::POST, &path).header("Accept", "application/json")).await?;
            println!("cluster {cluster} held until {}", text(&view["hold"], "until"));
        }
        PoolCommand::Unhold { cluster } => {
            let path = format!("/releasecluster?cluster={}", encode(&cluster));
            let view = api.json(api.request(Method::POST, &path).header("Accept", "application/json")).await?;
            println!("cluster {cluster} is {}", text(&view, "status"));
        }
        PoolCommand::Import(args) => super::pool_import::import(api, args).await?,
        PoolCommand::Report { window, output } => {
            let report = api.get(&format!("/pool/report?window={}", encode(&window))).await?;
            output.print(&report, |report| print!("{}", serde_yaml::to_string(report).unwrap_or_default()));
        }
    }
    Ok(())
}

fn cluster_row(cluster: &Value) -> Vec<String> {
    let (holder, until) = match (cluster.get("lease"), cluster.get("hold")) {
        (Some(lease), _) if !lease.is_null() => (text(lease, "holder"), text(lease, "expires")),
        (_, Some(hold)) if !hold.is_null() => (text(hold, "by"), text(hold, "until")),
        _ => (String::new(), String::new()),
    };
    vec![
        text(cluster, "name"),
        text(cluster, "status"),
        text(cluster, "purpose"),
        text(cluster, "region"),
        holder,
        until,
    ]
}
