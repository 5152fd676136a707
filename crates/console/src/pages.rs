//! The pages. Each reads through the API (`Api::get` with the caller's credentials)
//! and only arranges what it gets; parts that change while one watches carry
//! `data-refresh` (seconds) and an id, for console.js to re-fetch.

use crate::api::{Api, Caller, encode};
use crate::calendar::{self, Month};
use crate::view::{PageError, bytes, ok, percent};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};
use protocol::{
    AgentInfo, AlertInfo, DataSourceInfo, GroupInfo, JobInfo, JobKind, JobState, Policy,
    RecoveryPointInfo, ReplicaCreation, ReplicaState, ServerStatus, SyncFrequency,
};
use serde::Deserialize;
use std::collections::BTreeSet;

type Page = Result<Response, PageError>;

const STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

const KINDS: [JobKind; 10] = [
    JobKind::Sync,
    JobKind::ExpressFull,
    JobKind::ConsistencyCheck,
    JobKind::InitialReplica,
    JobKind::Verify,
    JobKind::Prune,
    JobKind::Gc,
    JobKind::Recovery,
    JobKind::OnlineCopy,
    JobKind::OnlineVerify,
];

pub async fn dashboard(State(api): State<Api>, headers: HeaderMap) -> Page {
    let who = Caller::from_headers(&headers);
    let status: ServerStatus = api.get(&who, "/status").await?;
    let sources: Vec<DataSourceInfo> = api.get(&who, "/datasources").await?;
    let running: Vec<JobInfo> = api.get(&who, "/jobs?state=running&limit=100").await?;
    let alerts: Vec<AlertInfo> = api.get(&who, "/alerts").await?;
    let groups: Vec<GroupInfo> = api.get(&who, "/protection-groups").await?;
    let protected: Vec<&DataSourceInfo> = sources
        .iter()
        .filter(|d| d.protection_group.is_some())
        .collect();
    let count = |s: ReplicaState| protected.iter().filter(|d| d.replica_state == s).count();
    let body = html! {
        section aria-labelledby="vms-h" {
            h2 id="vms-h" { "Protected VMs" }
            ul.counts {
                li { strong { (count(ReplicaState::Ok)) } " OK" }
                li { strong { (count(ReplicaState::Inconsistent)) } " inconsistent" }
                li { strong { (count(ReplicaState::Unprotected)) } " without a replica yet" }
                li { strong { (sources.len().saturating_sub(protected.len())) } " VMs not protected" }
            }
            table {
                thead { tr { th scope="col" { "VM" } th scope="col" { "Group" } th scope="col" { "Replica" } th scope="col" { "Last recovery point" } } }
                tbody {
                    @for d in &protected {
                        tr {
                            td { a href=(format!("/recovery-points?vm={}", encode(d.name.as_str()))) { (d.name) } }
                            td { (d.protection_group.as_deref().unwrap_or("")) }
                            td { span class=(format!("state {}", d.replica_state)) { (d.replica_state) } }
                            td { (d.last_recovery_point.as_deref().unwrap_or("none yet")) }
                        }
                    }
                }
            }
        }
        section aria-labelledby="jobs-h" {
            h2 id="jobs-h" { "Running jobs" }
            div id="running-jobs" data-refresh="3" { (job_table(&running)) }
        }
        section aria-labelledby="alerts-h" {
            h2 id="alerts-h" { "Open alerts" }
            div id="open-alerts" data-refresh="10" { (alert_table(&alerts)) }
        }
        section aria-labelledby="store-h" {
            h2 id="store-h" { "Datastore" }
            p { (status.datastore) @if status.datastore_encrypted { " (encrypted)" } }
            @if let Some(a) = groups.first().map(|g| &g.allocation) {
                @let used = a.datastore_total.saturating_sub(a.datastore_free);
                p {
                    label for="usage" { "Used: " (bytes(used)) " of " (bytes(a.datastore_total)) }
                    " "
                    meter id="usage" min="0" max="100" value=(percent(used, a.datastore_total)) { (percent(used, a.datastore_total)) "%" }
                }
            }
            p { (status.recovery_points) " recovery points, " (status.agents) " agents, " (status.protection_groups) " protection groups." }
        }
    };
    Ok(ok("Dashboard", "/", body))
}

fn job_table(jobs: &[JobInfo]) -> Markup {
    html! {
        @if jobs.is_empty() { p { "No jobs." } } @else {
            table {
                thead { tr { th scope="col" { "Job" } th scope="col" { "Kind" } th scope="col" { "State" } th scope="col" { "VM" } th scope="col" { "Created" } th scope="col" { "Progress" } } }
                tbody {
                    @for j in jobs {
                        tr {
                            td { a href=(format!("/jobs/{}", j.id)) { "#" (j.id) } }
                            td { (j.kind) }
                            td { span class=(format!("state {}", j.state)) { (j.state) } }
                            td { @if let Some(vm) = &j.vm { (vm) } }
                            td { (j.created) }
                            td { (progress(j)) }
                        }
                    }
                }
            }
        }
    }
}

fn progress(j: &JobInfo) -> Markup {
    let p = percent(j.bytes_done, j.bytes_total);
    html! {
        @if j.bytes_total > 0 {
            progress max="100" value=(p) aria-label=(format!("job {} progress", j.id)) { (p) "%" }
            " " (bytes(j.bytes_done)) " of " (bytes(j.bytes_total))
        } @else if let Some(e) = &j.error { span.error { (e) } }
    }
}

fn alert_table(alerts: &[AlertInfo]) -> Markup {
    html! {
        @if alerts.is_empty() { p { "No alerts." } } @else {
            table {
                thead { tr { th scope="col" { "Severity" } th scope="col" { "Subject" } th scope="col" { "Kind" } th scope="col" { "Message" } th scope="col" { "Raised" } th scope="col" { "Seen" } th scope="col" { "Resolved" } } }
                tbody {
                    @for a in alerts {
                        tr {
                            td { span class=(format!("sev {}", a.severity)) { (a.severity) } }
                            td { (a.subject) }
                            td { (a.kind) }
                            td { (a.message) }
                            td { (a.raised) }
                            td { (a.occurrences) " times" }
                            td { (a.resolved.as_deref().unwrap_or("open")) }
                        }
                    }
                }
            }
        }
    }
}

pub async fn hosts(State(api): State<Api>, headers: HeaderMap) -> Page {
    let agents: Vec<AgentInfo> = api.get(&Caller::from_headers(&headers), "/agents").await?;
    let body = html! {
        @if agents.is_empty() { p { "No agents enrolled yet (" code { "holdfast agent-token HOST" } ")." } } @else {
            table {
                thead { tr { th scope="col" { "Host" } th scope="col" { "Connected" } th scope="col" { "Last seen" } th scope="col" { "Version" } th scope="col" { "Enrolled" } th scope="col" { "Certificate" } } }
                tbody {
                    @for a in &agents {
                        tr {
                            td { (a.host) }
                            td { @if a.revoked { "revoked" } @else if a.connected { "yes" } @else { "no" } }
                            td { (a.last_seen.as_deref().unwrap_or("never")) }
                            td { (a.version.as_deref().unwrap_or("")) }
                            td { (a.enrolled) }
                            td { code title=(a.cert_fingerprint) { (a.cert_fingerprint.get(..16).unwrap_or(&a.cert_fingerprint)) "…" } }
                        }
                    }
                }
            }
        }
    };
    Ok(ok("Hosts", "/hosts", body))
}

/// One line saying what a policy does.
fn policy_summary(p: &Policy) -> String {
    let sync = match p.sync_frequency {
        SyncFrequency::Minutes(m) => format!("synchronized every {m} min"),
        SyncFrequency::JustBeforeRecoveryPoint => {
            "synchronized just before a recovery point".into()
        }
    };
    let replica = match &p.replica_creation {
        ReplicaCreation::Now => "first replica at once".to_string(),
        ReplicaCreation::At(t) => format!("first replica at {t}"),
        ReplicaCreation::Manual => "first replica seeded by hand".to_string(),
    };
    let mut s = format!(
        "{} days of retention, {sync}, recovery points at {}, {replica}",
        p.retention_days,
        p.recovery_point_times.join(", ")
    );
    if !p.express_full_times.is_empty() {
        s.push_str(&format!(
            ", express fulls at {}",
            p.express_full_times.join(", ")
        ));
    }
    if let Some(t) = &p.consistency_check_daily {
        s.push_str(&format!(", daily consistency check at {t}"));
    }
    if let Some(o) = &p.online {
        s.push_str(&format!(", online copy to {}", o.storage));
    }
    s
}

pub async fn groups(State(api): State<Api>, headers: HeaderMap) -> Page {
    let groups: Vec<GroupInfo> = api
        .get(&Caller::from_headers(&headers), "/protection-groups")
        .await?;
    let body = html! {
        @if groups.is_empty() { p { "No protection groups yet (" code { "holdfast pg create" } ")." } }
        @for g in &groups {
            section.group aria-labelledby=(format!("g-{}", encode(&g.name))) {
                h2 id=(format!("g-{}", encode(&g.name))) { (g.name) }
                p { (policy_summary(&g.policy)) "." }
                p { "Disk allocation: " (bytes(g.allocation.required)) " needed, "
                    (bytes(g.allocation.datastore_free)) " free"
                    @if !g.allocation.fits { strong.error { " (does not fit)" } } "." }
                h3 { "Members" }
                ul { @for m in &g.members { li { a href=(format!("/recovery-points?vm={}", encode(m))) { (m) } } } }
            }
        }
    };
    Ok(ok("Protection groups", "/groups", body))
}

#[derive(Deserialize)]
pub struct JobsFilter {
    #[serde(default)]
    state: String,
    #[serde(default)]
    kind: String,
}

pub async fn jobs(State(api): State<Api>, headers: HeaderMap, Query(f): Query<JobsFilter>) -> Page {
    // Only known values travel on to the API (an empty one means any).
    let state = match f.state.as_str() {
        "" => None,
        s => Some(
            JobState::parse(s)
                .ok_or_else(|| PageError::BadRequest(format!("no job state {s:?}")))?,
        ),
    };
    let kind = match f.kind.as_str() {
        "" => None,
        k => Some(
            JobKind::parse(k).ok_or_else(|| PageError::BadRequest(format!("no job kind {k:?}")))?,
        ),
    };
    let mut path = "/jobs?limit=200".to_string();
    if let Some(s) = state {
        path.push_str(&format!("&state={s}"));
    }
    if let Some(k) = kind {
        path.push_str(&format!("&kind={k}"));
    }
    let jobs: Vec<JobInfo> = api.get(&Caller::from_headers(&headers), &path).await?;
    let body = html! {
        form.filters method="get" action="/jobs" {
            label for="state" { "State" }
            select id="state" name="state" {
                option value="" { "any" }
                @for s in STATES { option value=(s) selected[state == Some(s)] { (s) } }
            }
            label for="kind" { "Kind" }
            select id="kind" name="kind" {
                option value="" { "any" }
                @for k in KINDS { option value=(k) selected[kind == Some(k)] { (k) } }
            }
            button type="submit" { "Filter" }
        }
        div id="job-list" data-refresh="5" { (job_table(&jobs)) }
    };
    Ok(ok("Jobs", "/jobs", body))
}

pub async fn job(State(api): State<Api>, headers: HeaderMap, Path(id): Path<i64>) -> Page {
    let j: JobInfo = api
        .get(&Caller::from_headers(&headers), &format!("/jobs/{id}"))
        .await?;
    let title = format!("Job #{}: {}", j.id, j.kind);
    let body = html! {
        div id="job-detail" data-refresh=[(!j.state.finished()).then_some("3")] {
            dl {
                dt { "State" } dd { span class=(format!("state {}", j.state)) { (j.state) } }
                @if let Some(vm) = &j.vm { dt { "VM" } dd { a href=(format!("/recovery-points?vm={}", encode(vm.as_str()))) { (vm) } } }
                dt { "Trigger" } dd { (j.trigger) }
                dt { "Attempt" } dd { (j.attempt) }
                dt { "Created" } dd { (j.created) }
                dt { "Started" } dd { (j.started.as_deref().unwrap_or("not yet")) }
                dt { "Finished" } dd { (j.finished.as_deref().unwrap_or("not yet")) }
                dt { "Progress" } dd { (progress(&j)) }
                @if let Some(r) = j.rate_bytes_per_sec { dt { "Rate" } dd { (bytes(r)) "/s" } }
                @if let Some(rp) = &j.recovery_point { dt { "Recovery point" } dd { code { (rp) } } }
                @if let Some(e) = &j.error { dt { "Error" } dd.error { (e) } }
            }
            h2 { "Log" }
            @if j.log.is_empty() { p { "Nothing logged." } } @else {
                table.log {
                    thead { tr { th scope="col" { "Time" } th scope="col" { "Message" } } }
                    tbody { @for l in &j.log { tr { td { (l.time) } td { (l.message) } } } }
                }
            }
        }
        p { a href="/jobs" { "All jobs" } }
    };
    Ok(ok(&title, "/jobs", body))
}

#[derive(Deserialize)]
pub struct AlertsFilter {
    #[serde(default)]
    all: bool,
}

pub async fn alerts(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(f): Query<AlertsFilter>,
) -> Page {
    let path = if f.all { "/alerts?all=true" } else { "/alerts" };
    let alerts: Vec<AlertInfo> = api.get(&Caller::from_headers(&headers), path).await?;
    let body = html! {
        p {
            @if f.all { a href="/alerts" { "Show open alerts only" } }
            @else { a href="/alerts?all=true" { "Show resolved alerts too" } }
        }
        div id="alert-list" data-refresh="10" { (alert_table(&alerts)) }
    };
    Ok(ok("Alerts", "/alerts", body))
}

#[derive(Deserialize)]
pub struct PointsQuery {
    #[serde(default)]
    vm: String,
    #[serde(default)]
    month: String,
    #[serde(default)]
    day: Option<u32>,
}

pub async fn recovery_points(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<PointsQuery>,
) -> Page {
    let who = Caller::from_headers(&headers);
    let sources: Vec<DataSourceInfo> = api.get(&who, "/datasources").await?;
    let picker = html! {
        form.filters method="get" action="/recovery-points" {
            label for="vm" { "VM" }
            select id="vm" name="vm" {
                @for d in &sources {
                    @let n = d.name.to_string();
                    option value=(n) selected[n == q.vm] { (n) }
                }
            }
            button type="submit" { "Show" }
        }
    };
    if q.vm.is_empty() {
        return Ok(ok(
            "Recovery points",
            "/recovery-points",
            html! { (picker) p { "Pick a VM." } },
        ));
    }
    let points: Vec<RecoveryPointInfo> = api
        .get(&who, &format!("/recovery-points?vm={}", encode(&q.vm)))
        .await?;
    let month = match q.month.as_str() {
        "" => Month::of(
            points
                .iter()
                .map(|p| p.created_unix)
                .max()
                .unwrap_or_else(utc::now),
        ),
        m => Month::parse(m)
            .ok_or_else(|| PageError::BadRequest(format!("no month {m:?} (YYYY-MM)")))?,
    };
    let in_month: Vec<(u32, &RecoveryPointInfo)> = points
        .iter()
        .filter_map(|p| {
            let (m, d) = Month::day_of(p.created_unix);
            (m == month).then_some((d, p))
        })
        .collect();
    let days: BTreeSet<u32> = in_month.iter().map(|(d, _)| *d).collect();
    let base = format!("/recovery-points?vm={}", encode(&q.vm));
    let shown: Vec<&RecoveryPointInfo> = in_month
        .iter()
        .filter(|(d, _)| q.day.is_none_or(|x| x == *d))
        .map(|(_, p)| *p)
        .collect();
    let body = html! {
        (picker)
        nav.months aria-label="Months" {
            a href=(format!("{base}&month={}", month.prev())) { "← " (month.prev().name()) }
            " "
            a href=(format!("{base}&month={}", month.next())) { (month.next().name()) " →" }
        }
        (calendar::render(month, &days, |d| format!("{base}&month={month}&day={d}")))
        h2 { (shown.len()) " recovery points of " (q.vm)
            @if let Some(d) = q.day { " on " (month) "-" (format!("{d:02}")) } @else { " in " (month.name()) } }
        @if !shown.is_empty() {
            table {
                thead { tr { th scope="col" { "Created" } th scope="col" { "Id" } th scope="col" { "Consistency" } th scope="col" { "Disks" } th scope="col" { "Stored" } th scope="col" { "Job" } } }
                tbody {
                    @for p in &shown {
                        tr {
                            td { (p.created) }
                            td { code { (p.id) } }
                            td { (format!("{:?}", p.consistency).to_lowercase()) }
                            td { (p.disks.len()) }
                            td { (bytes(p.stats.bytes_stored)) }
                            td { @if let Some(j) = p.job_id { a href=(format!("/jobs/{j}")) { "#" (j) } } }
                        }
                    }
                }
            }
        }
        p { (points.len()) " recovery points in all." }
    };
    Ok(ok(
        &format!("Recovery points of {}", q.vm),
        "/recovery-points",
        body,
    ))
}
