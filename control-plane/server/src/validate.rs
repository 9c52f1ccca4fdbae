//! Checks of what serde cannot check (ranges, lengths, label and variable names), each
//! adding a field error at the request's path of the value, so one answer lists every
//! problem of a request. Also the one place a template name becomes a template.

use crate::error::{invalid, Result, ServiceError};
use crate::iac::{Catalog, Template, TemplateError};
use cellplane_api::{Billing, Capacity, DataResidency, FieldError, Policies, Quotas};
use std::collections::BTreeMap;

pub fn validate_text(field: &str, s: &str, max: usize, errors: &mut Vec<FieldError>) {
    if s.chars().count() > max {
        errors.push(FieldError {
            field: field.into(),
            message: format!("must be at most {max} characters"),
        });
    }
    if s.chars().any(|c| c.is_control()) {
        errors.push(FieldError {
            field: field.into(),
            message: "must not contain control characters".into(),
        });
    }
}

/// The largest count the registry takes anywhere (capacities, quotas, revisions):
/// 2^53 - 1. Every JSON client reads it exactly, and the sum of two (a reservation's
/// `used + units`) still fits the stores' signed 64-bit integers.
pub const MAX_COUNT: u64 = (1 << 53) - 1;

/// The one check of a number that enters the registry: `min..=MAX_COUNT`, else a field
/// error at `field` (the request's path of the value).
pub fn validate_count(field: &str, value: impl Into<i128>, min: u64, errors: &mut Vec<FieldError>) {
    let value = value.into();
    let message = if value < i128::from(min) {
        format!("must be at least {min}")
    } else if value > i128::from(MAX_COUNT) {
        format!("must be at most {MAX_COUNT}")
    } else {
        return;
    };
    errors.push(FieldError {
        field: field.into(),
        message,
    });
}

/// A cell's capacity: at least one tenant, both counts within [`MAX_COUNT`].
pub fn validate_capacity(field: &str, c: &Capacity, errors: &mut Vec<FieldError>) {
    validate_count(&format!("{field}.tenants"), c.tenants, 1, errors);
    validate_count(&format!("{field}.units"), c.units, 0, errors);
}

pub fn validate_quotas(q: &Quotas, errors: &mut Vec<FieldError>) {
    for (field, value, min) in [
        ("quotas.storageGiB", q.storage_gib, 0),
        ("quotas.concurrentJobs", q.concurrent_jobs, 0),
        ("quotas.apiRateLimit", q.api_rate_limit, 0),
        ("quotas.units", q.units, 1),
    ] {
        if let Some(v) = value {
            validate_count(field, v, min, errors);
        }
    }
}

/// An organization's display name: not blank, no control characters, at most 200.
pub fn validate_org_name(field: &str, name: &str) -> Result<()> {
    let mut errors = Vec::new();
    if name.trim().is_empty() {
        errors.push(FieldError {
            field: field.into(),
            message: "must not be empty".into(),
        });
    }
    validate_text(field, name, 200, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(crate::error::ServiceError::Validation(errors))
    }
}

pub fn validate_docs(
    region: &str,
    quotas: &Quotas,
    policies: &Policies,
    billing: &Billing,
) -> Result<()> {
    let mut errors = Vec::new();
    validate_quotas(quotas, &mut errors);
    if let Some(regions) = &policies.allowed_regions {
        if regions.is_empty() {
            errors.push(FieldError {
                field: "policies.allowedRegions".into(),
                message: "must not be empty".into(),
            });
        }
        if policies.data_residency == Some(DataResidency::InRegionOnly)
            && regions.iter().any(|r| r.as_str() != region)
        {
            errors.push(FieldError {
                field: "policies.allowedRegions".into(),
                message: "in-region-only residency allows only the tenant's own region".into(),
            });
        }
    } else if policies.data_residency == Some(DataResidency::AllowedRegions) {
        errors.push(FieldError {
            field: "policies.allowedRegions".into(),
            message: "is required when dataResidency is allowed-regions".into(),
        });
    }
    if let Some(days) = policies.retention_days {
        if days > 36_500 {
            errors.push(FieldError {
                field: "policies.retentionDays".into(),
                message: "must be at most 36500".into(),
            });
        }
    }
    for (i, w) in policies.change_windows.iter().flatten().enumerate() {
        for (what, v) in [("start", &w.start), ("end", &w.end)] {
            if cellplane_api::ChangeWindow::minutes(v).is_none() {
                errors.push(FieldError {
                    field: format!("policies.changeWindows[{i}].{what}"),
                    message: "must be a time of day HH:MM (UTC)".into(),
                });
            }
        }
        if w.start == w.end {
            errors.push(FieldError {
                field: format!("policies.changeWindows[{i}].end"),
                message: "must differ from start".into(),
            });
        }
        for (j, d) in w.days.iter().flatten().enumerate() {
            if !cellplane_api::ChangeWindow::DAYS.contains(&d.as_str()) {
                errors.push(FieldError {
                    field: format!("policies.changeWindows[{i}].days[{j}]"),
                    message: "must be one of mon, tue, wed, thu, fri, sat, sun".into(),
                });
            }
        }
    }
    if policies
        .change_windows
        .as_ref()
        .is_some_and(|w| w.len() > 50)
    {
        errors.push(FieldError {
            field: "policies.changeWindows".into(),
            message: "must hold at most 50 windows".into(),
        });
    }
    if let Some(p) = &billing.plan {
        validate_text("billing.plan", p, 100, &mut errors);
    }
    if let Some(c) = &billing.cost_center {
        validate_text("billing.costCenter", c, 100, &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ServiceError::Validation(errors))
    }
}

pub fn validate_labels(labels: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b));
        if !key_ok {
            errors.push(FieldError {
                field: format!("labels.{k}"),
                message: "label keys are 1-63 characters of [a-z0-9-_./]".into(),
            });
        }
        validate_text(&format!("labels.{k}"), v, 253, errors);
    }
}

pub fn validate_vars(vars: &BTreeMap<String, serde_json::Value>, errors: &mut Vec<FieldError>) {
    for (k, v) in vars {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.as_bytes()[0].is_ascii_lowercase()
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            errors.push(FieldError {
                field: format!("vars.{k}"),
                message: "variable names are [a-z][a-z0-9_]{0,62}".into(),
            });
        }
        if v.to_string().len() > 4096 {
            errors.push(FieldError {
                field: format!("vars.{k}"),
                message: "value must serialize to at most 4096 bytes".into(),
            });
        }
    }
}

pub fn validate_app_version(v: &str, errors: &mut Vec<FieldError>) {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if !ok {
        errors.push(FieldError {
            field: "app_version".into(),
            message: "1-64 characters of [A-Za-z0-9._-+]".into(),
        });
    }
}

/// Loads template `name` named by request field `field`: an unknown name is that field's
/// error; an unreadable template directory is the host's problem (503).
pub fn load_template(catalog: &Catalog, name: &str, field: &str) -> Result<Template> {
    catalog.load(name).map_err(|e| match e {
        TemplateError::Unknown(n) => invalid(
            field,
            format!("template {n:?} does not exist (see GET /v1/templates)"),
        ),
        other => ServiceError::Unavailable(other.to_string()),
    })
}
