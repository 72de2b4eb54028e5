//! `cport server`'s cluster flags (with the `cluster` feature).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use cport::cluster::{ClusterConfig, DEFAULT_QUEUE, DEFAULT_SUBJECT};

#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    /// Join a cluster through the NATS server at URL (nats://host:4222,
    /// tls://host:4222); repeat for the seed servers of a NATS cluster.
    /// BROADCAST then reaches every client of every node (docs/CLUSTER.md).
    #[arg(long = "cluster", value_name = "URL")]
    pub(crate) cluster: Vec<String>,
    /// Subject prefix on NATS: servers with the same prefix form one cluster.
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_SUBJECT, requires = "cluster")]
    cluster_subject: String,
    /// This node's name, unique in the cluster [default: HOSTNAME:PORT of the first --listen].
    #[arg(long, value_name = "NAME", requires = "cluster")]
    node_name: Option<String>,
    /// NATS authentication token.
    #[arg(long, value_name = "TOKEN", requires = "cluster")]
    cluster_token: Option<String>,
    /// NATS user (with --cluster-password).
    #[arg(long, value_name = "USER", requires_all = ["cluster", "cluster_password"])]
    cluster_user: Option<String>,
    /// NATS password (with --cluster-user).
    #[arg(long, value_name = "PASSWORD", requires = "cluster_user")]
    cluster_password: Option<String>,
    /// NATS credentials file (JWT and NKey seed, as `nsc` writes it).
    #[arg(long, value_name = "FILE", requires = "cluster")]
    cluster_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server's TLS certificate.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    cluster_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS (with --cluster-tls-key).
    #[arg(long, value_name = "FILE", requires_all = ["cluster", "cluster_tls_key"])]
    cluster_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --cluster-tls-cert.
    #[arg(long, value_name = "FILE", requires = "cluster_tls_cert")]
    cluster_tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS.
    #[arg(long, requires = "cluster")]
    cluster_tls_required: bool,
    /// Bound of each bridge queue (to NATS, from NATS), in messages; a
    /// message over it is dropped and counted.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE, requires = "cluster")]
    cluster_queue: usize,
}

impl ClusterArgs {
    /// The bridge's configuration, or `None` without --cluster.
    pub(crate) fn config(
        &self,
        listen: &[SocketAddr],
        max_frame: u32,
    ) -> anyhow::Result<Option<ClusterConfig>> {
        if self.cluster.is_empty() {
            return Ok(None);
        }
        for u in &self.cluster {
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| u.starts_with(s))
                || !u.contains("://");
            if !scheme_ok || u.trim().is_empty() {
                bail!("--cluster {u:?}: give a NATS URL such as nats://127.0.0.1:4222");
            }
        }
        if self.cluster_queue == 0 {
            bail!("--cluster-queue must be at least 1");
        }
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => format!("{}:{}", hostname(), listen.first().map_or(0, |a| a.port())),
        };
        let mut c = ClusterConfig::new(self.cluster.clone(), node_name);
        c.subject = self.cluster_subject.clone();
        c.token = self.cluster_token.clone();
        c.user_password = self.cluster_user.clone().zip(self.cluster_password.clone());
        c.creds = self.cluster_creds.clone();
        c.tls_ca = self.cluster_tls_ca.clone();
        c.tls_cert = self
            .cluster_tls_cert
            .clone()
            .zip(self.cluster_tls_key.clone());
        c.require_tls = self.cluster_tls_required;
        c.queue = self.cluster_queue;
        c.max_frame = max_frame;
        Ok(Some(c))
    }
}

fn hostname() -> String {
    let from_file = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string());
    from_file
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cport".into())
}
