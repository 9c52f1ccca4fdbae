//! A thin reqwest client for the v1 API. It maps problem documents to
//! [`ClientError::Api`] and otherwise stays out of the way: callers that need headers or
//! raw bodies use [`Client::request`].

use crate::types::*;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{} {}: {}", .0.status, .0.title, .0.detail)]
    Api(Box<Problem>),
    #[error("unexpected response {status}: {body}")]
    Unexpected { status: u16, body: String },
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api(p) => Some(p.status),
            ClientError::Unexpected { status, .. } => Some(*status),
            ClientError::Http(e) => e.status().map(|s| s.as_u16()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let base = base.into().trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_default();
        Self { base, token, http }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A request with the bearer token set; the path starts with `/`.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send<T: DeserializeOwned>(rb: RequestBuilder) -> Result<T, ClientError> {
        let resp = rb.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                status: status.as_u16(),
                body: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        Err(problem_of(status, &bytes))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::send(self.request(Method::GET, path)).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        Self::send(self.request(Method::POST, path).json(body)).await
    }

    /// `POST` of a body that is not JSON (e.g. `application/yaml` manifests).
    pub async fn post_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        Self::send(
            self.request(Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        Self::send(self.request(Method::PATCH, path).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::send(self.request(Method::DELETE, path)).await
    }

    /// Fetches every page of a list (`next_cursor` followed until it runs out).
    pub async fn all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(cur) => format!("{path}{sep}cursor={cur}"),
                None => path.to_string(),
            };
            let page: Page<T> = self.get(&p).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(n) => cursor = Some(n),
                None => return Ok(items),
            }
        }
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let resp = self.request(Method::GET, path).send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        Err(problem_of(status, &bytes))
    }

    // Typed helpers for the resources the CLI and tests use most.

    pub async fn create_organization(
        &self,
        req: &CreateOrganization,
    ) -> Result<Organization, ClientError> {
        self.post("/v1/organizations", req).await
    }

    pub async fn create_tenant(&self, req: &CreateTenant) -> Result<Tenant, ClientError> {
        self.post("/v1/tenants", req).await
    }

    pub async fn get_tenant(&self, id: &str) -> Result<Tenant, ClientError> {
        self.get(&format!("/v1/tenants/{id}")).await
    }

    pub async fn tenant_action(
        &self,
        id: &str,
        action: LifecycleAction,
    ) -> Result<Job, ClientError> {
        self.post(
            &format!("/v1/tenants/{id}/{}", action.as_str()),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn create_cell(&self, req: &CreateCell) -> Result<CellWithJob, ClientError> {
        self.post("/v1/cells", req).await
    }

    pub async fn get_job(&self, id: &str) -> Result<Job, ClientError> {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    /// Polls a job until it reaches a terminal state or `timeout` passes.
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: std::time::Duration,
    ) -> Result<Job, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let job = self.get_job(id).await?;
            if job.state.is_terminal() || std::time::Instant::now() >= deadline {
                return Ok(job);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn create_token(&self, req: &CreateToken) -> Result<CreatedToken, ClientError> {
        self.post("/v1/tokens", req).await
    }

    pub async fn audit_verify(&self) -> Result<AuditVerify, ClientError> {
        self.get("/v1/audit/verify").await
    }
}

fn problem_of(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<Problem>(bytes) {
        Ok(p) => ClientError::Api(Box::new(p)),
        Err(_) => ClientError::Unexpected {
            status: status.as_u16(),
            body: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}
