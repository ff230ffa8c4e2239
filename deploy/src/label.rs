//! The node label that tells the scheduler CNFS is ready on a node
//! (`cnfs.io/runtime=kata-cnfs`: the RuntimeClass's and the CSI node plugin's nodeSelector).
//! One JSON merge patch of the Node object with the pod's service account
//! (configs/deploy/installer.yaml grants `get` and `patch` on nodes, nothing else).

use std::time::Duration;

use anyhow::{bail, Context};
use cnfs_protocols::spec::printable_within;

pub const KEY: &str = "cnfs.io/runtime";
pub const VALUE: &str = "kata-cnfs";
pub const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The most of an error answer that is echoed.
const MAX_ECHO: usize = 512;

/// Refuses a NODE_NAME that is not a Kubernetes node name (checked before the install
/// writes anything: the label is its last step).
pub fn check_node_name(node: &str) -> anyhow::Result<()> {
    if node.is_empty()
        || node.len() > 253
        || !node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        bail!(
            "NODE_NAME {} is not a Kubernetes node name",
            printable_within(node, 80)
        );
    }
    Ok(())
}

pub struct Api {
    /// `https://host:port` (in-cluster) or what `--api-server` says.
    pub server: String,
    pub token: String,
    agent: ureq::Agent,
}

impl Api {
    /// The in-cluster API (KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA),
    /// or `server` with the same credentials; `None` outside a cluster.
    pub fn from_env(server: Option<&str>, account_dir: &str) -> anyhow::Result<Option<Api>> {
        let server = match server {
            Some(s) => s.to_string(),
            None => match (
                std::env::var("KUBERNETES_SERVICE_HOST"),
                std::env::var("KUBERNETES_SERVICE_PORT"),
            ) {
                (Ok(h), Ok(p)) if h.contains(':') => format!("https://[{h}]:{p}"),
                (Ok(h), Ok(p)) => format!("https://{h}:{p}"),
                _ => return Ok(None),
            },
        };
        let token = std::fs::read_to_string(format!("{account_dir}/token"))
            .with_context(|| format!("reading the service account token in {account_dir}"))?
            .trim()
            .to_string();
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false);
        if server.starts_with("https://") {
            let pem = std::fs::read(format!("{account_dir}/ca.crt"))
                .with_context(|| format!("reading the cluster CA in {account_dir}"))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                bail!("{account_dir}/ca.crt holds no certificate");
            }
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(Some(Api {
            server,
            token,
            agent: config.build().into(),
        }))
    }

    /// Sets (`Some`) or removes (`None`) the label on `node`.
    pub fn label(&self, node: &str, value: Option<&str>) -> anyhow::Result<()> {
        check_node_name(node)?;
        let body = serde_json::json!({ "metadata": { "labels": { KEY: value } } }).to_string();
        let url = format!("{}/api/v1/nodes/{node}", self.server.trim_end_matches('/'));
        let mut resp = self
            .agent
            .patch(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/merge-patch+json")
            .header("Accept", "application/json")
            .send(body.as_bytes())
            .with_context(|| format!("PATCH {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            // Only the start of the answer is read: it is echoed bounded anyway.
            let mut head = Vec::new();
            let _ = std::io::Read::read_to_end(
                &mut std::io::Read::take(resp.body_mut().as_reader(), 4096),
                &mut head,
            );
            let text = String::from_utf8_lossy(&head);
            bail!(
                "PATCH {url}: {status}: {}",
                printable_within(&text, MAX_ECHO)
            );
        }
        Ok(())
    }
}
