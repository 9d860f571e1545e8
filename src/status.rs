//! `hyper2kvm status`: the queue, the claims and their owners, the progress of running jobs,
//! and recent finished jobs — all read from the on-disk state, so it works from any host that
//! mounts the queue, whether or not a daemon runs there.
//!
//! It only reads: it must never change the queue, so it is safe on any host at any time.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{self, Config, Overrides, ProcessEnv};
use crate::manifest;
use crate::queue::claim::LockRecord;
use crate::queue::layout::is_manifest_name;
use crate::queue::records::{self, EventLog};
use crate::queue::Queue;
use crate::queue::{JobState, Layout};
use crate::systemd_units::{human_duration, InstanceView};

/// One job, running or finished.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// The job id (`<UTC time>-<16 hex digits>`), as in its lock file and records.
    pub job_id: String,
    /// The VM's name from the manifest: what results are published under.
    pub vm_name: String,
    /// The host name of the daemon that ran (or runs) the job.
    pub host: String,
    /// The daemon's instance name (`hyper2kvm@NAME`); `None` for the unnamed `hyper2kvm.service`.
    pub instance: Option<String>,
    /// The lock generation: above 1 means the job was taken over from a stale daemon.
    pub generation: u64,
    /// Running (from a claim) or done/failed (from the job's record).
    pub state: JobState,
    /// When the job was claimed (UTC).
    pub started_at: DateTime<Utc>,
    /// When the job ended (UTC); `None` while it runs.
    pub finished_at: Option<DateTime<Utc>>,
    /// The last stage reached: the failing one for a failed job, `claim` before the first event.
    pub stage: String,
    /// The first line of the error, for a failed job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Progress of the current stage in percent (0–100), from the last event of a running job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// A manifest waiting in WATCH_DIR.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    /// The file name; one that is not UTF-8 as `{:?}` spells it (`"caf\xE9.json"`).
    pub name: String,
    /// The manifest's size in bytes.
    pub bytes: u64,
    /// Seconds since the manifest was last modified, by the file server's clock.
    pub age_seconds: f64,
    /// The name is not UTF-8: the daemon never takes it until it is renamed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_utf8: bool,
}

/// A claimed job and its lock.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimView {
    /// The claim's lock record (job id, owner, generation, claim time), flattened into the JSON.
    #[serde(flatten)]
    pub lock: LockRecord,
    /// From the claimed manifest (its file stem when it names none).
    pub vm_name: String,
    /// Seconds since the last heartbeat, judged against the file server's clock.
    pub heartbeat_age_seconds: Option<f64>,
    /// The phase of the job's last event; `None` before its first.
    pub stage: Option<String>,
    /// The progress in percent of the job's last event, when it reported one.
    pub percent: Option<f64>,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The queue directory (`WATCH_DIR`) that was read.
    pub watch_dir: String,
    /// Where results are published (`OUTPUT_DIR`).
    pub output_dir: String,
    /// Finished jobs (oldest first) followed by the running ones.
    pub jobs: Vec<JobView>,
    /// Manifests waiting to be claimed, oldest first.
    pub queue: Vec<QueueEntry>,
    /// The current claims, by job id.
    pub claims: Vec<ClaimView>,
    /// The daemons systemd knows on this host (`hyper2kvm@*.service`, and `hyper2kvm.service`
    /// when installed); empty where systemctl cannot be asked. Filled by [`with_instances`].
    pub instances: Vec<InstanceView>,
}

/// `hyper2kvm status`: [`collect`] and [`with_instances`] (the conf files found in
/// `--config-dir`, else where the configuration was read from), printed as JSON or as
/// [`render`]'s lines.
pub fn command(config: &Config, config_dir: Option<PathBuf>, json: bool) -> Result<(), serde_json::Error> {
    let overrides = Overrides { config_dir, flags: Vec::new() };
    let status = with_instances(collect(config), &config::config_dir(&overrides, &ProcessEnv));
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Reads the state of the queue described by `config`.
pub fn collect(config: &Config) -> Status {
    let layout = Layout::new(&config.watch_dir);
    let now = server_now(&layout);
    let claims = claims(&layout, now);
    let mut jobs: Vec<JobView> = records::finished_jobs(&layout)
        .into_iter()
        .map(|r| JobView {
            job_id: r.job_id,
            vm_name: r.vm_name,
            host: r.host,
            instance: r.instance,
            generation: r.generation,
            state: r.state,
            started_at: r.started_at,
            finished_at: r.finished_at,
            stage: r.stage,
            error: r.error,
            percent: None,
        })
        .collect();
    jobs.extend(claims.iter().map(running_view));
    Status {
        watch_dir: config.watch_dir.display().to_string(),
        output_dir: config.output_dir.display().to_string(),
        queue: queue(&config.watch_dir, now),
        claims,
        jobs,
        instances: Vec::new(),
    }
}

/// Adds the systemd instances on this host, with directories read from the conf files in
/// `config_dir` (the same files the units read).
pub fn with_instances(mut status: Status, config_dir: &Path) -> Status {
    status.instances = crate::systemd_units::instances(config_dir);
    status
}

fn running_view(claim: &ClaimView) -> JobView {
    JobView {
        job_id: claim.lock.job_id.clone(),
        vm_name: claim.vm_name.clone(),
        host: claim.lock.owner.host.clone(),
        instance: claim.lock.owner.instance.clone(),
        generation: claim.lock.generation,
        state: JobState::Running,
        started_at: claim.lock.claimed_at,
        finished_at: None,
        stage: claim.stage.clone().unwrap_or_else(|| "claim".into()),
        error: None,
        percent: claim.percent,
    }
}

fn queue(watch_dir: &Path, now: SystemTime) -> Vec<QueueEntry> {
    let Ok(entries) = std::fs::read_dir(watch_dir) else { return Vec::new() };
    let mut queue: Vec<QueueEntry> = entries
        .flatten()
        .filter_map(|e| {
            let file_name = e.file_name();
            let meta = std::fs::symlink_metadata(e.path()).ok().filter(|m| m.is_file())?;
            let name = file_name.to_str().map_or_else(|| format!("{file_name:?}"), str::to_owned);
            is_manifest_name(&file_name.to_string_lossy()).then(|| QueueEntry {
                not_utf8: file_name.to_str().is_none(),
                name,
                bytes: meta.len(),
                age_seconds: age(meta.modified().ok(), now),
            })
        })
        .collect();
    queue.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    queue
}

fn claims(layout: &Layout, now: SystemTime) -> Vec<ClaimView> {
    let mut claims: Vec<ClaimView> = Queue::new(layout.clone())
        .locks()
        .into_iter()
        .map(|(path, lock)| {
            let heartbeat = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            let last = EventLog::last(&layout.event_log(&lock.job_id));
            let manifest = manifest::read_file(&layout.claimed_manifest(&lock.job_id)).unwrap_or_default();
            ClaimView {
                vm_name: manifest::vm_name_hint(&manifest, &lock.manifest_name),
                heartbeat_age_seconds: heartbeat.map(|h| age(Some(h), now)),
                stage: last.as_ref().map(|e| e.phase.clone()),
                percent: last.and_then(|e| e.progress_percent),
                lock,
            }
        })
        .collect();
    claims.sort_by(|a, b| a.lock.job_id.cmp(&b.lock.job_id));
    claims
}

fn age(then: Option<SystemTime>, now: SystemTime) -> f64 {
    then.and_then(|t| now.duration_since(t).ok()).map_or(0.0, |d| d.as_secs_f64())
}

/// The file server's idea of now (heartbeats are stamped by it); the local clock where the
/// state directory is not writable.
fn server_now(layout: &Layout) -> SystemTime {
    use crate::queue::fs::{QueueFs, RealFs};
    RealFs.server_now(layout.state_dir()).unwrap_or_else(|_| SystemTime::now())
}

/// A readable summary for a terminal.
pub fn render(status: &Status) -> String {
    let mut out = format!("WATCH_DIR  {}\nOUTPUT_DIR {}\n\n", status.watch_dir, status.output_dir);
    out.push_str(&format!("Queue: {} waiting\n", status.queue.len()));
    for q in &status.queue {
        let stuck = if q.not_utf8 { "  file name not UTF-8: never taken, rename it" } else { "" };
        out.push_str(&format!("  {}  ({} bytes, {:.0}s old){stuck}\n", q.name, q.bytes, q.age_seconds));
    }
    out.push_str(&format!("\nClaims: {}\n", status.claims.len()));
    for c in &status.claims {
        let percent = c.percent.map(|p| format!(" {p:.0}%")).unwrap_or_default();
        out.push_str(&format!(
            "  {}  {:?} ({})  host {} pid {} gen {}  heartbeat {:.0}s ago  {}{percent}\n",
            c.lock.job_id,
            c.vm_name,
            c.lock.manifest_name,
            c.lock.owner.host,
            c.lock.owner.pid,
            c.lock.generation,
            c.heartbeat_age_seconds.unwrap_or(0.0),
            c.stage.as_deref().unwrap_or("claim"),
        ));
    }
    let finished: Vec<&JobView> = status.jobs.iter().filter(|j| j.state != JobState::Running).collect();
    out.push_str(&format!("\nRecent jobs: {}\n", finished.len()));
    for j in finished.iter().rev().take(20) {
        let when = j.finished_at.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default();
        let state = match j.state {
            JobState::Done => "done".to_owned(),
            _ => format!("FAILED at {}: {}", j.stage, j.error.as_deref().unwrap_or("")),
        };
        out.push_str(&format!("  {when}  {}  {:?}  on {}  {state}\n", j.job_id, j.vm_name, j.host));
    }
    if !status.instances.is_empty() {
        out.push_str(&format!("\nInstances on this host (systemd): {}\n", status.instances.len()));
    }
    for i in &status.instances {
        let enabled = i.unit_file_state.as_deref().map(|s| format!(", {s}")).unwrap_or_default();
        let pid = i.main_pid.map(|p| format!(", pid {p}")).unwrap_or_default();
        let up = i.uptime_seconds.map(|s| format!(", up {}", human_duration(s))).unwrap_or_default();
        let summary = i.status_text.as_deref().map(|s| format!("  {s}")).unwrap_or_default();
        out.push_str(&format!("  {}  {} ({}){enabled}{pid}{up}{summary}\n", i.unit, i.active_state, i.sub_state));
        match (&i.watch_dir, &i.output_dir, &i.config_error) {
            (Some(watch), Some(output), _) => out.push_str(&format!("      queue {watch}  output {output}\n")),
            (_, _, Some(error)) => out.push_str(&format!("      configuration error: {error}\n")),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Status {
        Status {
            watch_dir: "/q".into(),
            output_dir: "/o".into(),
            jobs: Vec::new(),
            queue: Vec::new(),
            claims: Vec::new(),
            instances: Vec::new(),
        }
    }

    #[test]
    fn instances_are_listed_when_systemd_knows_some() {
        let mut status = empty();
        assert!(!render(&status).contains("Instances"), "nothing is said without systemd");
        assert_eq!(serde_json::to_value(&status).unwrap()["instances"], serde_json::json!([]));
        status.instances.push(InstanceView {
            name: None,
            unit: "hyper2kvm.service".into(),
            load_state: "loaded".into(),
            active_state: "inactive".into(),
            sub_state: "dead".into(),
            unit_file_state: Some("disabled".into()),
            main_pid: None,
            uptime_seconds: None,
            status_text: None,
            watch_dir: Some("/var/lib/hyper2kvm/queue".into()),
            output_dir: Some("/var/lib/hyper2kvm/output".into()),
            config_error: None,
        });
        status.instances.push(InstanceView {
            name: Some("vsphere".into()),
            unit: "hyper2kvm@vsphere.service".into(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            unit_file_state: Some("enabled".into()),
            main_pid: Some(135),
            uptime_seconds: Some(3 * 3600 + 12 * 60 + 9),
            status_text: Some("0 running, 0 queued, 1 done, 0 failed; last: web01 ok".into()),
            watch_dir: Some("/var/lib/hyper2kvm/vsphere/queue".into()),
            output_dir: Some("/var/lib/hyper2kvm/vsphere/output".into()),
            config_error: None,
        });
        let text = render(&status);
        assert!(text.contains("  hyper2kvm.service  inactive (dead), disabled\n"), "{text}");
        assert!(text.contains("queue /var/lib/hyper2kvm/queue  output /var/lib/hyper2kvm/output"), "{text}");
        assert!(
            text.contains(
                "  hyper2kvm@vsphere.service  active (running), enabled, pid 135, up 3h 12m  0 running, 0 queued, 1 done"
            ),
            "{text}"
        );
        assert!(text.contains("queue /var/lib/hyper2kvm/vsphere/queue  output /var/lib/hyper2kvm/vsphere/output"));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["instances"][0]["unit"], "hyper2kvm.service");
        assert_eq!(json["instances"][0]["name"], serde_json::Value::Null);
        assert!(json["instances"][0].get("uptime_seconds").is_none(), "not running, no uptime");
        assert_eq!(json["instances"][1]["unit"], "hyper2kvm@vsphere.service");
        assert_eq!(json["instances"][1]["name"], "vsphere");
        assert_eq!(json["instances"][1]["uptime_seconds"], 11529);
        assert_eq!(json["instances"][1]["status_text"], "0 running, 0 queued, 1 done, 0 failed; last: web01 ok");
        assert!(json["instances"][1].get("config_error").is_none());
    }
}
