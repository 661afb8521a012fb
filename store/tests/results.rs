//! Result files against real Postgres: however large the summaries stored for a run, what is read
//! back lists a bounded number of failed cases, of bounded size, in all.
#![allow(clippy::unwrap_used)]

mod support;

use cimaster_common::results::{
    FailedCase, KIND_ARTIFACT, KIND_JUNIT, MAX_LISTED_BYTES_IN_ALL, MAX_LISTED_FAILURES_IN_ALL,
};
use cimaster_common::RunId;
use cimaster_store::results;
use sqlx::PgPool;
use support::queued_run;

/// 40 reports of 200 failed cases each, with messages of `message` bytes, as no agent of today
/// writes them.
async fn forty_reports(pool: &PgPool, run: RunId, message: i32) {
    sqlx::query(
        "INSERT INTO run_results (run_id, attempt, kind, name, bytes, content_type, object_key, summary)
         SELECT $1, 1, 'junit', format('report-%s.xml', lpad(file::text, 2, '0')), 1, 'application/xml', 'k',
                jsonb_build_object('tests', 1000, 'failures', 200, 'errors', 0, 'skipped', 0, 'timeSeconds', 1.5,
                    'failedNotListed', 7,
                    'failed', (SELECT jsonb_agg(jsonb_build_object('suite', 's', 'classname', 'c',
                                                   'name', format('t%s', n), 'kind', 'failure',
                                                   'message', repeat('m', $2)))
                               FROM generate_series(1, 200) AS n))
         FROM generate_series(1, 40) AS file",
    )
    .bind(run.0)
    .bind(message)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn forty_reports_of_many_failures_are_read_back_with_500_listed(pool: PgPool) {
    let run = queued_run(&pool).await;
    forty_reports(&pool, run, 10).await;
    let files = results::files(&pool, run.0, 1, &[KIND_JUNIT], None).await.unwrap();
    let listed: Vec<usize> = files.iter().map(|file| file.summary.as_ref().unwrap().0.failed.len()).collect();
    assert_eq!(listed[..4], [200, 200, 100, 0], "in report order");
    assert_eq!(listed.iter().sum::<usize>(), MAX_LISTED_FAILURES_IN_ALL);
    assert_eq!(files[3].summary.as_ref().unwrap().0.failed_not_listed, 207);
}

#[sqlx::test(migrations = "../migrations")]
async fn forty_large_summaries_are_read_back_bounded(pool: PgPool) {
    let run = queued_run(&pool).await;
    // 64 MB of failure messages in all, and an artifact beside them.
    forty_reports(&pool, run, 8000).await;
    sqlx::query(
        "INSERT INTO run_results (run_id, attempt, kind, name, bytes, content_type, object_key)
         VALUES ($1, 1, 'artifact', 'out.txt', 3, 'text/plain', 'k')",
    )
    .bind(run.0)
    .execute(&pool)
    .await
    .unwrap();

    let files = results::files(&pool, run.0, 1, &[KIND_JUNIT], None).await.unwrap();
    let listed: Vec<&FailedCase> = files.iter().flat_map(|file| &file.summary.as_ref().unwrap().0.failed).collect();
    let bytes: usize = listed.iter().map(|case| serde_json::to_string(case).unwrap().len()).sum();
    assert_eq!(files.len(), 40);
    assert!(listed.len() <= MAX_LISTED_FAILURES_IN_ALL && bytes <= MAX_LISTED_BYTES_IN_ALL, "{} cases", listed.len());
    assert!(!listed.is_empty(), "the first report's first cases are listed");
    assert_eq!(listed[0].name, "t1");
    assert_eq!(files[0].name, "report-01.xml");
    let counted: u64 = files.iter().map(|file| file.summary.as_ref().unwrap().0.failures).sum();
    let not_listed: u64 = files.iter().map(|file| file.summary.as_ref().unwrap().0.failed_not_listed).sum();
    assert_eq!(counted, 8000, "every failure is still counted");
    assert_eq!(not_listed, 8000 - listed.len() as u64 + 40 * 7, "the cases dropped are counted as not listed");

    let all = results::list(&pool, run.0).await.unwrap();
    assert_eq!(all.len(), 41);
    let artifact = all.iter().find(|file| file.kind == KIND_ARTIFACT).unwrap();
    assert!(artifact.summary.is_none());
    let listed: usize = all.iter().filter_map(|file| file.summary.as_ref()).map(|summary| summary.0.failed.len()).sum();
    assert!(listed <= MAX_LISTED_FAILURES_IN_ALL);
}
