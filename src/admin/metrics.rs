//! `/metrics`: a [`StatsSnapshot`] in the Prometheus text exposition
//! format. `prometheus-client` writes OpenMetrics text, which Prometheus
//! asks for first; a scraper that does not ask for it (curl, older tools,
//! the classic text parsers) gets the classic 0.0.4 text, where a
//! counter's `# TYPE` line names the sample (`x_total`) and there are no
//! `# UNIT`/`# EOF` lines. Every figure is read from the snapshot taken
//! for the scrape; nothing here touches the engine.

use std::fmt::Error as FmtError;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::server::StatsSnapshot;

/// The HTTP content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The HTTP content type of [`encode_classic`]'s output.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `s` as OpenMetrics text.
pub fn encode(s: &StatsSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(s.clone())));
    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Encodes `s` as classic Prometheus text (format 0.0.4).
pub fn encode_classic(s: &StatsSnapshot) -> String {
    to_classic(&encode(s))
}

/// Rewrites OpenMetrics text as classic Prometheus text: counters are
/// declared under their sample's name (`x_total`), an info metric becomes a
/// gauge named `x_info`, and `# UNIT` and `# EOF` lines go.
fn to_classic(open: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => renamed.insert(name, (format!("{name}_total"), "counter")),
                "info" => renamed.insert(name, (format!("{name}_info"), "gauge")),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((new, kind)) if prefix == "# TYPE " => {
                        out.push_str(&format!("# TYPE {new} {kind}"))
                    }
                    Some((new, _)) => out.push_str(&format!("# HELP {new} {tail}")),
                    None => out.push_str(line),
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct SnapshotCollector(StatsSnapshot);

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), FmtError> {
    let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), FmtError> {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v as i64).encode(m)
}

/// One counter family with a single label.
fn counters<'a>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) -> Result<(), FmtError> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        let labels = [(label, l)];
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), FmtError> {
        let s = &self.0;
        {
            let mut m = e.encode_descriptor(
                "cport_backend",
                "Completion backend and protocol in use.",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&[
                ("backend", s.backend.as_str()),
                ("protocol", s.protocol.as_str()),
            ])?;
        }
        gauge(&mut e, "cport_ports", "Completion ports.", s.ports as u64)?;
        gauge(&mut e, "cport_workers", "Worker threads.", s.workers as u64)?;
        gauge(
            &mut e,
            "cport_connections_open",
            "Connections open now.",
            s.connections_open,
        )?;
        counter(
            &mut e,
            "cport_connections_accepted",
            "Connections accepted.",
            s.connections_accepted,
        )?;
        counter(
            &mut e,
            "cport_connections_connected",
            "Outgoing connections made.",
            s.connections_connected,
        )?;
        counters(
            &mut e,
            "cport_connections_closed",
            "Connections closed, by reason.",
            "reason",
            s.closed.iter().map(|(k, v)| (k.as_str(), *v)),
        )?;
        let by_cmd = |f: fn(&crate::server::CommandCounts) -> u64| {
            s.commands.iter().map(move |(k, c)| (k.as_str(), f(c)))
        };
        counters(
            &mut e,
            "cport_frames_in",
            "Frames received, by command.",
            "command",
            by_cmd(|c| c.frames_in),
        )?;
        counters(
            &mut e,
            "cport_frame_bytes_in",
            "Bytes of frames received (headers included), by command.",
            "command",
            by_cmd(|c| c.bytes_in),
        )?;
        counters(
            &mut e,
            "cport_frames_out",
            "Frames queued for sending, by command.",
            "command",
            by_cmd(|c| c.frames_out),
        )?;
        counters(
            &mut e,
            "cport_frame_bytes_out",
            "Bytes of frames queued for sending (headers and files included), by command.",
            "command",
            by_cmd(|c| c.bytes_out),
        )?;
        counter(
            &mut e,
            "cport_bytes_in",
            "Bytes received on all connections.",
            s.bytes_in,
        )?;
        counter(
            &mut e,
            "cport_bytes_out",
            "Bytes sent on all connections.",
            s.bytes_out,
        )?;
        counters(
            &mut e,
            "cport_errors",
            "Errors by kind: ERROR frames sent (by code name), failed accepts, connections ended by a reset or another I/O error.",
            "kind",
            s.errors.iter().map(|(k, v)| (k.as_str(), *v)),
        )?;
        counter(
            &mut e,
            "cport_late_completions",
            "Completions for connections already gone (dropped).",
            s.late_completions,
        )?;
        counter(
            &mut e,
            "cport_file_truncated",
            "FILE replies cut short because the file shrank while being sent.",
            s.file_truncated,
        )?;
        counter(
            &mut e,
            "cport_worker_stalls",
            "Times a worker stayed away from its port longer than the stall threshold (100 ms by default) while handling completions.",
            s.worker_stalls,
        )?;
        counters(
            &mut e,
            "cport_completions",
            "Completions taken from the ports, by worker thread.",
            "worker",
            s.completions.iter().map(|(k, v)| (k.as_str(), *v)),
        )?;
        gauge(
            &mut e,
            "cport_send_queue_bytes",
            "Bytes queued for sending over all connections.",
            s.send_queue_bytes,
        )?;
        gauge(
            &mut e,
            "cport_file_replies",
            "FILE replies in progress (each holds an open file).",
            s.file_replies,
        )?;
        gauge(
            &mut e,
            "cport_file_replies_waiting",
            "FILE requests waiting for a place under the bound on file replies.",
            s.file_replies_waiting,
        )?;
        gauge(
            &mut e,
            "cport_outstanding_ops",
            "Operations in flight in the ports.",
            s.outstanding_ops,
        )?;
        gauge(
            &mut e,
            "cport_recv_buffers_leased",
            "Pooled receive buffers lent out.",
            s.bufs_leased,
        )?;
        {
            let m = e.encode_descriptor(
                "cport_uptime",
                "Time since the engine started.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            ConstGauge::new(s.uptime_s).encode(m)?;
        }
        if let Some(cpu) = s.cpu_s {
            let m = e.encode_descriptor(
                "process_cpu",
                "User and system CPU time of the process.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
        }
        if let Some(rss) = s.rss_bytes {
            let m = e.encode_descriptor(
                "process_resident_memory",
                "Resident memory of the process.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss as i64).encode(m)?;
        }
        {
            let mut m = e.encode_descriptor(
                "cport_request_handling",
                "Time from a worker taking a receive completion to the replies it caused being submitted (recorded while the admin endpoint is on).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            // The encoder wants counts per bucket; the snapshot's are cumulative.
            let mut prev = 0;
            let buckets: Vec<(f64, u64)> = s
                .latency
                .buckets
                .iter()
                .map(|b| {
                    let n = b.count - prev;
                    prev = b.count;
                    (b.le_s.unwrap_or(f64::INFINITY), n)
                })
                .collect();
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                s.latency.sum_s,
                s.latency.count,
                &buckets,
                None,
            )?;
        }
        if let Some(c) = &s.cluster {
            encode_cluster(&mut e, c)?;
        }
        Ok(())
    }
}

/// The cluster bridge's state and counters (docs/CLUSTER.md).
fn encode_cluster(
    e: &mut DescriptorEncoder<'_>,
    c: &crate::server::ClusterSnapshot,
) -> Result<(), FmtError> {
    {
        let mut m = e.encode_descriptor(
            "cport_cluster_node",
            "This node of the cluster: its name, number, state (up or degraded) and why it is degraded.",
            None,
            MetricType::Info,
        )?;
        let node = c.node.to_string();
        // Label values go out as they are: keep quotes, backslashes and
        // line breaks (a NATS server's error text) out of them.
        let clean = |v: &str| -> String {
            v.chars()
                .map(|ch| {
                    if matches!(ch, '"' | '\\') || ch.is_control() {
                        '\''
                    } else {
                        ch
                    }
                })
                .collect()
        };
        let (name, reason) = (
            clean(&c.node_name),
            clean(c.reason.as_deref().unwrap_or("")),
        );
        m.encode_info(&[
            ("name", name.as_str()),
            ("node", node.as_str()),
            ("state", c.state.as_str()),
            ("reason", reason.as_str()),
        ])?;
    }
    gauge(
        e,
        "cport_cluster_up",
        "1 when the node is connected to the cluster, 0 when degraded (serving local clients only).",
        u64::from(c.state == "up"),
    )?;
    counter(
        e,
        "cport_cluster_published",
        "Local broadcasts published to the other nodes.",
        c.published,
    )?;
    counter(
        e,
        "cport_cluster_sent",
        "Targeted sends and service messages published to other nodes.",
        c.sent,
    )?;
    counter(
        e,
        "cport_cluster_received",
        "Messages received from other nodes.",
        c.received,
    )?;
    counter(
        e,
        "cport_cluster_delivered",
        "Messages from other nodes handed to local connections.",
        c.delivered,
    )?;
    counters(
        e,
        "cport_cluster_dropped",
        "Cluster messages dropped or lost, by reason.",
        "reason",
        c.dropped.iter().map(|(k, v)| (k.as_str(), *v)),
    )?;
    gauge(
        e,
        "cport_cluster_queue_out",
        "Messages waiting to be published.",
        c.queue_out,
    )?;
    gauge(
        e,
        "cport_cluster_queue_in",
        "Messages received and waiting to be delivered.",
        c.queue_in,
    )?;
    gauge(
        e,
        "cport_cluster_queue_limit",
        "Bound of each bridge queue.",
        c.queue_limit,
    )?;
    gauge(
        e,
        "cport_cluster_nodes",
        "Other nodes heard from in the last 30 s.",
        c.nodes.len() as u64,
    )?;
    if let Some(rtt) = c.rtt_us {
        let m = e.encode_descriptor(
            "cport_cluster_nats_rtt",
            "Last round trip to the NATS server.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(rtt as f64 / 1e6).encode(m)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let open = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{k=\"v\"} 1\n# HELP g G.\n# TYPE g gauge\n# UNIT g bytes\ng 2\n# HELP i I.\n# TYPE i info\ni_info{x=\"y\"} 1\n# EOF\n";
        assert_eq!(
            to_classic(open),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{k=\"v\"} 1\n# HELP g G.\n# TYPE g gauge\ng 2\n# HELP i_info I.\n# TYPE i_info gauge\ni_info{x=\"y\"} 1\n"
        );
    }
}
