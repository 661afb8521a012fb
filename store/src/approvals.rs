//! The `github_approvals` table: `/ok-to-test` by a trusted user, for one pull request at one head
//! commit (a later push needs a new approval); and `github_pull_heads`, when a webhook first
//! brought each head, which is what a bare `/ok-to-test` is judged against.

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

/// Notes that a webhook brought this head of the pull request (the first sighting is kept).
pub async fn heard_of(pool: &PgPool, head: &Approval<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO github_pull_heads (repository, pull_request, sha) VALUES (lower($1), $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(head.repository)
    .bind(head.pull_request)
    .bind(head.sha)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a webhook brought this head before the delivery `delivery` (a comment) was received.
pub async fn heard_of_before(pool: &PgPool, head: &Approval<'_>, delivery: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM github_pull_heads h JOIN github_deliveries d ON d.id = $4
             WHERE h.repository = lower($1) AND h.pull_request = $2 AND h.sha = $3 AND h.seen_at < d.received_at)",
    )
    .bind(head.repository)
    .bind(head.pull_request)
    .bind(head.sha)
    .bind(delivery)
    .fetch_one(pool)
    .await
}
