//! The `github_approvals` table: `/ok-to-test` by a trusted user, for one pull request at one head
//! commit (a later push needs a new approval).

use sqlx::PgPool;

pub struct Approval<'a> {
    pub repository: &'a str,
    pub pull_request: i64,
    pub sha: &'a str,
}

pub async fn approve(pool: &PgPool, approval: &Approval<'_>, by: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO github_approvals (repository, pull_request, sha, approved_by) VALUES (lower($1), $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(approval.repository)
    .bind(approval.pull_request)
    .bind(approval.sha)
    .bind(by)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn approved(pool: &PgPool, approval: &Approval<'_>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM github_approvals WHERE repository = lower($1) AND pull_request = $2 AND sha = $3)",
    )
    .bind(approval.repository)
    .bind(approval.pull_request)
    .bind(approval.sha)
    .fetch_one(pool)
    .await
}
