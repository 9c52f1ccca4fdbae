//! The audit chain and the event outbox. Each record's hash covers its own fields and the
//! previous record's hash; `chain_head` holds the last sequence number and hash, and the
//! `UPDATE … RETURNING` on it is the row lock that orders concurrent writers on PostgreSQL.

use super::{new_id, now, Result, Store, StoreError, WriteTx};
use cellplane_api::AuditRecord;
use sha2::{Digest, Sha256};
use sqlx::Row;

/// What a write records about itself.
#[derive(Debug, Clone)]
pub struct AuditInput<'a> {
    pub tenant_id: Option<&'a str>,
    pub event_type: &'a str,
    pub actor: &'a str,
    pub target: &'a str,
    pub payload: serde_json::Value,
    pub correlation_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    Ok {
        records: i64,
    },
    Broken {
        records: i64,
        seq: i64,
        reason: String,
    },
}

#[allow(clippy::too_many_arguments)]
fn record_hash(
    seq: i64,
    audit_id: &str,
    tenant_id: Option<&str>,
    event_type: &str,
    actor: &str,
    target: &str,
    payload: &str,
    correlation_id: Option<&str>,
    occurred_at: &str,
    prev_hash: &str,
) -> String {
    let canonical = serde_json::json!([
        seq,
        audit_id,
        tenant_id,
        event_type,
        actor,
        target,
        payload,
        correlation_id,
        occurred_at,
        prev_hash
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

impl WriteTx {
    /// Appends one audit record inside this transaction; the insert trigger moves the chain
    /// head and queues the outbox event in the same statement.
    pub async fn audit(&mut self, input: AuditInput<'_>) -> Result<i64> {
        let row =
            sqlx::query("UPDATE chain_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
                .fetch_one(&mut *self.tx)
                .await?;
        let seq: i64 = row.try_get("seq")?;
        let prev_hash: String = row.try_get("hash")?;
        let audit_id = new_id("evt");
        let occurred_at = now();
        let payload = input.payload.to_string();
        let hash = record_hash(
            seq,
            &audit_id,
            input.tenant_id,
            input.event_type,
            input.actor,
            input.target,
            &payload,
            input.correlation_id,
            &occurred_at,
            &prev_hash,
        );
        sqlx::query(
            "INSERT INTO tenant_audit (seq, audit_id, tenant_id, event_type, actor, target, payload, \
             correlation_id, occurred_at, prev_hash, hash) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
        )
        .bind(seq)
        .bind(&audit_id)
        .bind(input.tenant_id)
        .bind(input.event_type)
        .bind(input.actor)
        .bind(input.target)
        .bind(&payload)
        .bind(input.correlation_id)
        .bind(&occurred_at)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *self.tx)
        .await?;
        Ok(seq)
    }
}

/// An audit record to append, owning its fields (for batched writes).
#[derive(Debug, Clone)]
pub struct OwnedAudit {
    pub tenant_id: Option<String>,
    pub event_type: String,
    pub actor: String,
    pub target: String,
    pub payload: serde_json::Value,
    pub correlation_id: Option<String>,
}

impl WriteTx {
    /// Appends several audit records with one chain-head move and one multi-row insert.
    pub async fn audit_many(&mut self, inputs: &[OwnedAudit]) -> Result<()> {
        if inputs.is_empty() {
            return Ok(());
        }
        let n = inputs.len() as i64;
        let row =
            sqlx::query("UPDATE chain_head SET seq = seq + $1 WHERE id = 1 RETURNING seq, hash")
                .bind(n)
                .fetch_one(&mut *self.tx)
                .await?;
        let last_seq: i64 = row.try_get("seq")?;
        let mut prev_hash: String = row.try_get("hash")?;
        let occurred_at = now();
        let mut records = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let seq = last_seq - n + 1 + i as i64;
            let audit_id = new_id("evt");
            let payload = input.payload.to_string();
            let hash = record_hash(
                seq,
                &audit_id,
                input.tenant_id.as_deref(),
                &input.event_type,
                &input.actor,
                &input.target,
                &payload,
                input.correlation_id.as_deref(),
                &occurred_at,
                &prev_hash,
            );
            records.push((seq, audit_id, payload, prev_hash.clone(), hash.clone()));
            prev_hash = hash;
        }
        let mut sql = String::from(
            "INSERT INTO tenant_audit (seq, audit_id, tenant_id, event_type, actor, target, payload, \
             correlation_id, occurred_at, prev_hash, hash) VALUES ",
        );
        for i in 0..records.len() {
            let b = i * 11;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${},${},${},${},${},${},${},${},${},${},${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9,
                b + 10,
                b + 11
            ));
        }
        let mut q = sqlx::query(&sql);
        for (input, (seq, audit_id, payload, prev, hash)) in inputs.iter().zip(&records) {
            q = q
                .bind(*seq)
                .bind(audit_id.as_str())
                .bind(input.tenant_id.as_deref())
                .bind(input.event_type.as_str())
                .bind(input.actor.as_str())
                .bind(input.target.as_str())
                .bind(payload.as_str())
                .bind(input.correlation_id.as_deref())
                .bind(occurred_at.as_str())
                .bind(prev.as_str())
                .bind(hash.as_str());
        }
        q.execute(&mut *self.tx).await?;
        Ok(())
    }
}

/// An outbox record with the subject (the audit record's target) it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub tenant_id: Option<String>,
    pub subject: String,
    pub payload: serde_json::Value,
    pub correlation_id: Option<String>,
    pub created_at: String,
}

fn audit_from_row(row: &sqlx::any::AnyRow) -> Result<AuditRecord> {
    let payload: String = row.try_get("payload")?;
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        audit_id: row.try_get("audit_id")?,
        tenant_id: row.try_get("tenant_id")?,
        event_type: row.try_get("event_type")?,
        actor: row.try_get("actor")?,
        target: row.try_get("target")?,
        payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload)),
        correlation_id: row.try_get("correlation_id")?,
        occurred_at: row.try_get("occurred_at")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

impl Store {
    /// Outbox records after `after_seq`, oldest first, of the given internal event types,
    /// optionally about one subject and one tenant.
    pub async fn list_outbox(
        &self,
        after_seq: i64,
        event_types: &[&str],
        subject: Option<&str>,
        tenant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>> {
        if event_types.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = String::from(
            "SELECT o.seq, o.event_id, o.event_type, o.tenant_id, o.payload, o.correlation_id, \
             o.created_at, a.target FROM outbox o JOIN tenant_audit a ON a.seq = o.seq \
             WHERE o.seq > $1 AND o.event_type IN (",
        );
        let mut n = 1;
        for (i, _) in event_types.iter().enumerate() {
            n += 1;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("${n}"));
        }
        sql.push(')');
        if subject.is_some() {
            n += 1;
            sql.push_str(&format!(" AND a.target = ${n}"));
        }
        if tenant_id.is_some() {
            n += 1;
            sql.push_str(&format!(" AND o.tenant_id = ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY o.seq LIMIT ${n}"));
        let mut q = sqlx::query(&sql).bind(after_seq);
        for t in event_types {
            q = q.bind(*t);
        }
        if let Some(s) = subject {
            q = q.bind(s);
        }
        if let Some(t) = tenant_id {
            q = q.bind(t);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(super::deliveries::outbox_from_row)
            .collect()
    }

    /// Audit records after `after_seq`, oldest first, filtered by tenant, target and time.
    pub async fn list_audit(
        &self,
        tenant_id: Option<&str>,
        target: Option<&str>,
        since: Option<&str>,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>> {
        let mut sql = String::from("SELECT * FROM tenant_audit WHERE seq > $1");
        let mut n = 1;
        let mut binds: Vec<String> = Vec::new();
        for (col, op, val) in [
            ("tenant_id", "=", tenant_id),
            ("target", "=", target),
            ("occurred_at", ">=", since),
        ] {
            if let Some(v) = val {
                n += 1;
                sql.push_str(&format!(" AND {col} {op} ${n}"));
                binds.push(v.to_string());
            }
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY seq LIMIT ${n}"));
        let mut q = sqlx::query(&sql).bind(after_seq);
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Walks the whole chain in sequence order and reports the first record that does not
    /// hold: a modified field (hash mismatch), a removed or inserted record (sequence gap or
    /// broken link), a truncated tail (the head is past the last record), or records past
    /// the head (appended without moving it).
    ///
    /// Writes may commit while a long chain is walked. A record and the head move commit
    /// together (the insert trigger), so the walk reads the head first and checks records
    /// up to it; anything newer is judged at the end against a head read after it. This
    /// needs no isolation level beyond each statement's own, the same on both stores.
    pub async fn verify_audit(&self) -> Result<VerifyOutcome> {
        let (head_seq, head_hash) = self.chain_head().await?;
        let mut expected_prev =
            "0000000000000000000000000000000000000000000000000000000000000000".to_string();
        let mut expected_seq = 1i64;
        let mut count = 0i64;
        let mut after = 0i64;
        loop {
            let rows = sqlx::query(
                "SELECT * FROM tenant_audit WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT 5000",
            )
            .bind(after)
            .bind(head_seq)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let seq: i64 = row.try_get("seq")?;
                let audit_id: String = row.try_get("audit_id")?;
                let tenant_id: Option<String> = row.try_get("tenant_id")?;
                let event_type: String = row.try_get("event_type")?;
                let actor: String = row.try_get("actor")?;
                let target: String = row.try_get("target")?;
                let payload: String = row.try_get("payload")?;
                let correlation_id: Option<String> = row.try_get("correlation_id")?;
                let occurred_at: String = row.try_get("occurred_at")?;
                let prev_hash: String = row.try_get("prev_hash")?;
                let hash: String = row.try_get("hash")?;
                let broken = |reason: &str| VerifyOutcome::Broken {
                    records: count,
                    seq,
                    reason: reason.to_string(),
                };
                if seq != expected_seq {
                    return Ok(VerifyOutcome::Broken {
                        records: count,
                        seq: expected_seq.min(seq),
                        reason: format!("expected record {expected_seq}, found {seq}: records were removed or inserted"),
                    });
                }
                if prev_hash != expected_prev {
                    return Ok(broken("prev_hash does not link to the previous record"));
                }
                let computed = record_hash(
                    seq,
                    &audit_id,
                    tenant_id.as_deref(),
                    &event_type,
                    &actor,
                    &target,
                    &payload,
                    correlation_id.as_deref(),
                    &occurred_at,
                    &prev_hash,
                );
                if computed != hash {
                    return Ok(broken("record contents do not match its hash"));
                }
                expected_prev = hash;
                expected_seq += 1;
                count += 1;
                after = seq;
            }
        }
        if count != head_seq {
            return Ok(VerifyOutcome::Broken {
                records: count,
                seq: count + 1,
                reason: format!(
                    "chain head is at record {head_seq} but the table ends at {count}: records were removed from the end"
                ),
            });
        }
        if head_hash != expected_prev {
            return Ok(VerifyOutcome::Broken {
                records: count,
                seq: count,
                reason: "chain head does not match the last record's hash".into(),
            });
        }
        // Records past the head: legitimate ones committed with their head move, so a head
        // read after the highest record covers it; a record the head never reached was
        // appended around the trigger.
        let max_seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM tenant_audit")
            .fetch_one(&self.pool)
            .await?;
        let (head_now, _) = self.chain_head().await?;
        if let Some(max) = max_seq.filter(|m| *m > head_now) {
            return Ok(VerifyOutcome::Broken {
                records: count,
                seq: head_now + 1,
                reason: format!(
                    "record {max} is past the chain head ({head_now}): records were appended without moving the head"
                ),
            });
        }
        Ok(VerifyOutcome::Ok { records: count })
    }

    async fn chain_head(&self) -> Result<(i64, String)> {
        let head = sqlx::query("SELECT seq, hash FROM chain_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::Corrupt("chain_head row is missing".into()))?;
        Ok((head.try_get("seq")?, head.try_get("hash")?))
    }
}
