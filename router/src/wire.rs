//! Reads a `GET /v1/routes` answer (or the state file, which has the same shape) straight
//! into a snapshot draft, one route at a time: a full table of a million routes is never
//! held as a million owned wire structs on its way in.

use crate::table::{Draft, RejectedRoute, Snapshot, TableBuilder};
use cellplane_api::RouteMode;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::fmt;

#[derive(Deserialize)]
struct WireRoute<'a> {
    #[serde(borrow)]
    tenant_id: Cow<'a, str>,
    #[serde(borrow)]
    env: Cow<'a, str>,
    #[serde(borrow)]
    cell_id: Cow<'a, str>,
    #[serde(borrow)]
    endpoint: Cow<'a, str>,
    mode: RouteMode,
    #[serde(default)]
    rate_limit: Option<u64>,
}

#[derive(Deserialize)]
struct WireKey<'a> {
    #[serde(borrow)]
    tenant_id: Cow<'a, str>,
    #[serde(borrow)]
    env: Cow<'a, str>,
}

/// A parsed answer applied to a snapshot.
pub struct Applied {
    pub snapshot: Snapshot,
    pub rejected: Vec<RejectedRoute>,
    pub full: bool,
    pub upserts: usize,
    pub removals: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed routing table: {0}")]
pub struct WireError(String);

/// Parses `bytes` and applies it on top of `base` (or replaces it when the answer is full).
pub fn apply_changes(
    bytes: &[u8],
    builder: &mut TableBuilder,
    base: &Snapshot,
) -> Result<Applied, WireError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let out = ChangesVisitor { builder, base }
        .deserialize(&mut de)
        .map_err(|e| WireError(e.to_string()))?;
    de.end().map_err(|e| WireError(e.to_string()))?;
    Ok(out)
}

struct ChangesVisitor<'b> {
    builder: &'b mut TableBuilder,
    base: &'b Snapshot,
}

impl<'de, 'b> DeserializeSeed<'de> for ChangesVisitor<'b> {
    type Value = Applied;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Applied, D::Error> {
        d.deserialize_map(self)
    }
}

struct Counted<'x, 'b> {
    draft: &'x mut Draft<'b>,
    n: &'x mut usize,
}

impl<'de> DeserializeSeed<'de> for Counted<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Counted<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of routes")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(r) = seq.next_element::<WireRoute<'de>>()? {
            self.draft.upsert(
                &r.tenant_id,
                &r.env,
                &r.cell_id,
                &r.endpoint,
                r.mode,
                r.rate_limit,
            );
            *self.n += 1;
        }
        Ok(())
    }
}

impl<'de, 'b> Visitor<'de> for ChangesVisitor<'b> {
    type Value = Applied;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a routing table change set")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Applied, A::Error> {
        let ChangesVisitor { builder, base } = self;
        let mut builder = Some(builder);
        let mut revision: Option<i64> = None;
        let mut full: Option<bool> = None;
        let mut draft: Option<Draft<'b>> = None;
        // Only when `upserts` comes before `full` (never from cellplane itself).
        let mut early: Vec<(String, String, String, String, RouteMode, Option<u64>)> = Vec::new();
        let mut removals: Vec<(String, String)> = Vec::new();
        let mut upserts = 0usize;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "revision" => revision = Some(map.next_value()?),
                "full" => {
                    let f: bool = map.next_value()?;
                    full = Some(f);
                    if draft.is_none() {
                        if let Some(b) = builder.take() {
                            draft = Some(b.draft(base, f));
                        }
                    }
                }
                "upserts" => match draft.as_mut() {
                    Some(d) => map.next_value_seed(Counted {
                        draft: d,
                        n: &mut upserts,
                    })?,
                    None => {
                        let v: Vec<WireRoute<'de>> = map.next_value()?;
                        for r in v {
                            early.push((
                                r.tenant_id.into_owned(),
                                r.env.into_owned(),
                                r.cell_id.into_owned(),
                                r.endpoint.into_owned(),
                                r.mode,
                                r.rate_limit,
                            ));
                        }
                    }
                },
                "removals" => {
                    let v: Vec<WireKey<'de>> = map.next_value()?;
                    removals.extend(
                        v.into_iter()
                            .map(|k| (k.tenant_id.into_owned(), k.env.into_owned())),
                    );
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let revision = revision.ok_or_else(|| serde::de::Error::missing_field("revision"))?;
        let full = full.ok_or_else(|| serde::de::Error::missing_field("full"))?;
        let mut draft = match draft {
            Some(d) => d,
            None => builder
                .take()
                .ok_or_else(|| serde::de::Error::custom("internal: no builder"))?
                .draft(base, full),
        };
        for (t, e, c, ep, m, r) in &early {
            draft.upsert(t, e, c, ep, *m, *r);
            upserts += 1;
        }
        for (t, e) in &removals {
            draft.remove(t, e);
        }
        let (snapshot, rejected) = draft.finish(revision);
        Ok(Applied {
            snapshot,
            rejected,
            full,
            upserts,
            removals: removals.len(),
        })
    }
}

/// Writes `snap` in the same shape as a full `GET /v1/routes` answer.
pub fn write_snapshot(snap: &Snapshot, out: &mut impl std::io::Write) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        tenant_id: &'a str,
        env: &'a str,
        cell_id: &'a str,
        endpoint: &'a str,
        mode: RouteMode,
        #[serde(skip_serializing_if = "Option::is_none")]
        rate_limit: Option<u32>,
    }
    write!(
        out,
        "{{\"format\":\"cellplane-router-state/1\",\"revision\":{},\"full\":true,\"upserts\":[",
        snap.revision
    )?;
    let mut first = true;
    let mut err = None;
    snap.each_tenant(|tenant, t| {
        t.each(|env, r| {
            if err.is_some() {
                return;
            }
            let item = Out {
                tenant_id: tenant,
                env,
                cell_id: &r.cell.cell_id,
                endpoint: &r.cell.endpoint,
                mode: r.mode,
                rate_limit: (r.rate_limit > 0).then_some(r.rate_limit),
            };
            let res = (|| {
                if !first {
                    out.write_all(b",\n")?;
                }
                serde_json::to_writer(&mut *out, &item).map_err(std::io::Error::other)
            })();
            first = false;
            if let Err(e) = res {
                err = Some(e);
            }
        })
    });
    if let Some(e) = err {
        return Err(e);
    }
    out.write_all(b"],\"removals\":[]}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn round_trips_through_the_state_shape() {
        let mut b = TableBuilder::new(Arc::from(vec![0.1]), Default::default());
        let body = br#"{"revision":7,"full":true,"upserts":[
            {"tenant_id":"acme","env":"prod","cell_id":"c1","endpoint":"http://127.0.0.1:9001","mode":"serve","rate_limit":5},
            {"tenant_id":"acme","env":"dev","cell_id":"c2","endpoint":"http://127.0.0.1:9002","mode":"hold"},
            {"tenant_id":"glob\u0065x","env":"prod","cell_id":"c1","endpoint":"http://127.0.0.1:9001","mode":"suspended"}],
            "removals":[]}"#;
        let a = apply_changes(body, &mut b, &Snapshot::empty()).unwrap();
        assert!(a.full);
        assert_eq!(a.snapshot.routes, 3);
        assert_eq!(
            a.snapshot.route("globex", "prod").unwrap().mode,
            RouteMode::Suspended
        );
        let mut buf = Vec::new();
        write_snapshot(&a.snapshot, &mut buf).unwrap();
        let mut b2 = TableBuilder::new(Arc::from(vec![0.1]), Default::default());
        let again = apply_changes(&buf, &mut b2, &Snapshot::empty()).unwrap();
        assert_eq!(again.snapshot.revision, 7);
        assert_eq!(again.snapshot.routes, 3);
        assert_eq!(again.snapshot.route("acme", "prod").unwrap().rate_limit, 5);
        // A delta removes and changes.
        let delta = br#"{"revision":8,"full":false,"upserts":[
            {"tenant_id":"acme","env":"prod","cell_id":"c3","endpoint":"http://127.0.0.1:9003","mode":"serve"}],
            "removals":[{"tenant_id":"acme","env":"dev"}]}"#;
        let d = apply_changes(delta, &mut b2, &again.snapshot).unwrap();
        assert_eq!(d.snapshot.routes, 2);
        assert_eq!(
            &*d.snapshot.route("acme", "prod").unwrap().cell.cell_id,
            "c3"
        );
        assert!(apply_changes(b"{\"revision\":1}", &mut b2, &Snapshot::empty()).is_err());
        assert!(apply_changes(b"nope", &mut b2, &Snapshot::empty()).is_err());
    }
}
