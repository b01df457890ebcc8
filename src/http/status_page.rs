//! The human status page: one server-rendered HTML document for `GET /`.
//!
//! It shows what this instance is (role, peers, node, engine, readiness, version), every
//! target (output path, last render and apply, hash, check result, error, skipped
//! services) and the recent jobs with per-service outcomes. Invariants: the template is
//! compiled once and embedded in the binary; autoescaping is on, so label values, checker
//! output and job messages (all of which can carry hostile text) are always escaped;
//! rendering never panics and never fails the request — a template error yields a plain
//! fallback page. Job objects come from another module as JSON and are read tolerantly:
//! any missing or oddly-typed field becomes an empty value. No JavaScript; the markup
//! keeps stable ids, classes and `data-*` attributes for browser tests.

use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::jobs::JobState;
use crate::status::{CheckResult, LeftOutHost, SkippedService, Summary};

/// The template name ends in `.html` so Tera's autoescaping applies to it.
const TEMPLATE_NAME: &str = "status.html";

fn tera() -> Option<&'static tera::Tera> {
    static TERA: OnceLock<Option<tera::Tera>> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = tera::Tera::default();
        t.autoescape_on(vec![".html"]);
        // Tera's default escaper also turns `/` into `&#x2F;`; paths and image names read
        // better verbatim, and `/` is harmless in text and in quoted attributes.
        t.set_escape_fn(escape);
        match t.add_raw_template(
            TEMPLATE_NAME,
            include_str!("../../templates/status.html.tera"),
        ) {
            Ok(()) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "status page template does not compile");
                None
            }
        }
    })
    .as_ref()
}

/// The peers line of the page from what `contacts` knows: the controller first, then each
/// peer, with how long ago it last answered.
pub fn contact_lines(view: &crate::cluster::contacts::View) -> Vec<String> {
    let ago = |ms: Option<u64>| match ms {
        None => "never reached".to_owned(),
        Some(ms) if ms < 1000 => "last contact just now".to_owned(),
        Some(ms) => format!("last contact {} s ago", ms / 1000),
    };
    let name = |p: &crate::cluster::contacts::PeerView| {
        if p.hostname.is_empty() {
            p.node.clone()
        } else {
            p.hostname.clone()
        }
    };
    view.controller
        .iter()
        .map(|c| {
            format!(
                "{} (controller, {}, {})",
                name(c),
                c.address,
                ago(c.last_contact_ms_ago)
            )
        })
        .chain(view.peers.iter().map(|p| {
            format!(
                "{} ({}, {})",
                name(p),
                p.address,
                ago(p.last_contact_ms_ago)
            )
        }))
        .collect()
}

/// Renders the status page for `summary` and the job list `jobs` (a JSON array of job
/// objects; anything else shows as no jobs).
pub fn render(summary: &Summary, jobs: &Value) -> String {
    let now = crate::clock::unix_secs().max(0) as u64;
    render_at(summary, jobs, now)
}

/// [`render`] with a fixed clock, for tests.
pub fn render_at(summary: &Summary, jobs: &Value, now: u64) -> String {
    let page = Page::new(summary, jobs, now);
    let rendered = tera().and_then(|t| {
        let ctx = tera::Context::from_serialize(&page).ok()?;
        t.render(TEMPLATE_NAME, &ctx)
            .map_err(|e| tracing::error!(error = %e, "status page render failed"))
            .ok()
    });
    rendered.unwrap_or_else(|| fallback(&page))
}

#[derive(Serialize)]
struct Page<'a> {
    version: &'a str,
    role: &'a str,
    node: &'a str,
    engine: &'a str,
    ready: bool,
    peers: &'a [String],
    now: String,
    targets: Vec<TargetView<'a>>,
    stacks: Vec<StackView<'a>>,
    certificates: Vec<CertificateView<'a>>,
    polls: Vec<PollView<'a>>,
    jobs: Vec<JobView>,
}

#[derive(Serialize)]
struct CertificateView<'a> {
    host: &'a str,
    names: String,
    not_after: String,
    renew_at: String,
    error: &'a str,
    retry_at: String,
}

#[derive(Serialize)]
struct PollView<'a> {
    image: &'a str,
    services: &'a [String],
    every: String,
    /// The digest shortened to its first 12 hex digits.
    digest: &'a str,
    last_at: String,
    next_in: String,
    outcome: &'a str,
    outcome_class: &'static str,
    job: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct StackView<'a> {
    name: &'a str,
    branch: &'a str,
    deployed: &'a str,
    head: &'a str,
    ahead: bool,
    last_trigger: &'a str,
    last_at: String,
    outcome: &'a str,
    outcome_class: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct TargetView<'a> {
    name: &'a str,
    output: &'a str,
    last_render: String,
    last_apply: String,
    hash: Option<&'a str>,
    hash_short: Option<&'a str>,
    check: String,
    /// `ok`, `bad` or `neutral`: drives the badge colour and `data-check`.
    check_class: &'static str,
    check_word: &'static str,
    error: Option<&'a str>,
    skipped: &'a [SkippedService],
    left_out: &'a [LeftOutHost],
    without_certificate: &'a [String],
}

#[derive(Serialize)]
struct JobView {
    id: String,
    hook: String,
    state: String,
    state_class: &'static str,
    created: String,
    /// What the job is for, when the job says (`image`, `repository:tag`, ...).
    subject: String,
    error: String,
    services: Vec<JobServiceView>,
}

#[derive(Serialize)]
struct JobServiceView {
    service: String,
    from: String,
    from_short: String,
    to: String,
    to_short: String,
    outcome: String,
    outcome_class: &'static str,
    message: String,
}

impl<'a> Page<'a> {
    fn new(s: &'a Summary, jobs: &Value, now: u64) -> Page<'a> {
        Page {
            version: s.version,
            role: s.role.map_or("starting", |r| r.as_str()),
            node: &s.node,
            engine: &s.engine,
            ready: s.ready,
            peers: &s.peers,
            now: format_time(Some(now), now),
            targets: s
                .targets
                .iter()
                .map(|t| {
                    let (check_class, check_word) = check_class(&t.check);
                    TargetView {
                        name: &t.name,
                        output: &t.output,
                        last_render: format_time(t.last_render, now),
                        last_apply: format_time(t.last_apply, now),
                        hash: t.hash.as_deref(),
                        hash_short: t.hash.as_deref().map(|h| h.get(..12).unwrap_or(h)),
                        check: t.check.to_string(),
                        check_class,
                        check_word,
                        error: t.error.as_deref().filter(|e| !e.is_empty()),
                        skipped: &t.skipped,
                        left_out: &t.left_out,
                        without_certificate: &t.without_certificate,
                    }
                })
                .collect(),
            stacks: s
                .stacks
                .iter()
                .map(|st| {
                    let short = |c: &'a Option<String>| {
                        c.as_deref().map_or("", |c| c.get(..12).unwrap_or(c))
                    };
                    let outcome = st.outcome.as_deref().unwrap_or("");
                    StackView {
                        name: &st.name,
                        branch: &st.branch,
                        deployed: short(&st.deployed),
                        head: short(&st.head),
                        ahead: st.ahead(),
                        last_trigger: st.last_trigger.as_deref().unwrap_or(""),
                        last_at: format_time(st.last_at, now),
                        outcome,
                        outcome_class: match outcome {
                            "completed" => "ok",
                            "failed" | "rolled_back" => "bad",
                            _ => "neutral",
                        },
                        message: st.message.as_deref().unwrap_or(""),
                    }
                })
                .collect(),
            certificates: s
                .certificates
                .iter()
                .map(|c| {
                    let at =
                        |t: Option<i64>| format_time(t.and_then(|t| u64::try_from(t).ok()), now);
                    CertificateView {
                        host: &c.host,
                        names: c.names.join(", "),
                        not_after: at(c.not_after),
                        renew_at: at(c.renew_at),
                        error: c.error.as_deref().unwrap_or(""),
                        retry_at: c.retry_at.map(|t| at(Some(t))).unwrap_or_default(),
                    }
                })
                .collect(),
            polls: s
                .polls
                .iter()
                .map(|p| {
                    let outcome = p.outcome.as_deref().unwrap_or("");
                    let secs =
                        |n: u64| humantime::format_duration(Duration::from_secs(n)).to_string();
                    PollView {
                        image: &p.image,
                        services: &p.services,
                        every: secs(p.every),
                        digest: p.digest.as_deref().map_or("", |d| {
                            d.strip_prefix("sha256:")
                                .unwrap_or(d)
                                .get(..12)
                                .unwrap_or(d)
                        }),
                        last_at: format_time(p.last_at, now),
                        next_in: p.next_at.map_or_else(String::new, |at| {
                            match at.checked_sub(now) {
                                Some(n) if n > 0 => format!("in {}", secs(n)),
                                _ => "due".into(),
                            }
                        }),
                        outcome,
                        outcome_class: match outcome {
                            "unchanged" => "ok",
                            "changed" | "held" => "neutral",
                            "" => "neutral",
                            _ => "bad",
                        },
                        job: p.job.as_deref().unwrap_or(""),
                        message: p.message.as_deref().unwrap_or(""),
                    }
                })
                .collect(),
            jobs: job_list(jobs)
                .iter()
                .map(|j| JobView::new(j, now))
                .collect(),
        }
    }
}

/// Accepts a bare array or an object wrapping one under `jobs`.
fn job_list(jobs: &Value) -> &[Value] {
    match jobs {
        Value::Array(a) => a,
        Value::Object(o) => o.get("jobs").and_then(Value::as_array).map_or(&[], |a| a),
        _ => &[],
    }
}

impl JobView {
    fn new(j: &Value, now: u64) -> JobView {
        let state = text(j, "state");
        let state = if state.is_empty() {
            "unknown".to_owned()
        } else {
            state
        };
        // `created` in seconds, or `created_at` in milliseconds (the jobs module's shape).
        let created = number(j, "created")
            .map(|n| n as u64)
            .or_else(|| number(j, "created_at").map(|ms| (ms / 1000.0) as u64));
        let mut subject = subject(j);
        if let Some(n) = number(j, "requests").filter(|n| *n > 1.0) {
            subject.push_str(&format!(" ({} requests coalesced)", n as u64));
        }
        // A job's message is only an error when the job went wrong ("exit code 0" is not).
        let error = if outcome_class(&state) == "bad" {
            ["error", "message"]
                .iter()
                .map(|k| text(j, k))
                .find(|s| !s.is_empty())
                .unwrap_or_default()
        } else {
            text(j, "error")
        };
        let services = j
            .get("services")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(JobServiceView::new).collect())
            .unwrap_or_default();
        JobView {
            id: text(j, "id"),
            hook: text(j, "hook"),
            state_class: outcome_class(&state),
            state,
            created: format_time(created, now),
            subject: subject.trim().to_owned(),
            error,
            services,
        }
    }
}

/// What a job is about: the image it rolls out, the service it restarts, the command it
/// runs, else what the payload said (repository, tag, ref).
fn subject(j: &Value) -> String {
    let image = text(j, "image");
    if !image.is_empty() {
        return image;
    }
    let service = text(j, "service");
    if !service.is_empty() {
        return format!("restart {service}");
    }
    if let Some(argv) = j.get("argv").and_then(Value::as_array) {
        let words: Vec<String> = argv
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        if !words.is_empty() {
            return format!("run {}", words.join(" "));
        }
    }
    let facts = j.get("facts").unwrap_or(j);
    let repository = text(facts, "repository");
    let tag = text(facts, "tag");
    let git_ref = text(facts, "ref");
    match (repository.is_empty(), tag.is_empty()) {
        (false, false) => format!("{repository}:{tag}"),
        (false, true) if !git_ref.is_empty() => format!("{repository} {git_ref}"),
        (false, true) => repository,
        _ => git_ref,
    }
}

fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .filter(|n| n.is_finite() && *n >= 0.0)
}

impl JobServiceView {
    fn new(s: &Value) -> JobServiceView {
        let pick = |a: &str, b: &str| {
            Some(text(s, a))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| text(s, b))
        };
        let (from, to) = (pick("from", "from_image"), pick("to", "to_image"));
        let outcome = text(s, "outcome");
        JobServiceView {
            service: text(s, "service"),
            from_short: short_image(&from),
            to_short: short_image(&to),
            from,
            to,
            outcome_class: outcome_class(&outcome),
            outcome,
            message: text(s, "message"),
        }
    }
}

/// A field as display text: strings as they are, numbers and booleans printed, anything
/// else (missing, null, objects) empty.
fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// A passed check is good, a failed one bad, none or unavailable neutral.
fn check_class(check: &CheckResult) -> (&'static str, &'static str) {
    let class = match check {
        CheckResult::Passed => "ok",
        CheckResult::Failed(_) => "bad",
        CheckResult::None | CheckResult::Unavailable(_) => "neutral",
    };
    (class, check.word())
}

/// The badge of a job's or a service's state, as `JobState` names it; a word no state
/// has (a newer or older drover's) is neutral.
fn outcome_class(outcome: &str) -> &'static str {
    match serde_json::from_value::<JobState>(Value::String(outcome.to_owned())) {
        Ok(JobState::Completed) => "ok",
        Ok(JobState::Failed | JobState::RolledBack) => "bad",
        Ok(JobState::Queued | JobState::Running) => "warn",
        Ok(JobState::Skipped) | Err(_) => "neutral",
    }
}

/// `repo:tag@sha256:0123456789abcdef...` → `repo:tag@sha256:0123456789ab` (the full value
/// stays in the cell's title).
fn short_image(image: &str) -> String {
    match image.split_once("@sha256:") {
        Some((name, digest)) => format!("{name}@sha256:{}", digest.get(..12).unwrap_or(digest)),
        None => image.to_owned(),
    }
}

/// `2024-05-01 12:00:00 UTC (3m ago)`, or `never`.
fn format_time(secs: Option<u64>, now: u64) -> String {
    let Some(secs) = secs.filter(|s| *s > 0) else {
        return "never".into();
    };
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let stamp = format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if secs == now {
        return stamp;
    }
    match now.checked_sub(secs) {
        Some(ago) => format!("{stamp} ({} ago)", human_duration(ago)),
        None => stamp,
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm); avoids a date crate for one line of the page.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Minimal page used only if the embedded template cannot render; still escaped.
fn fallback(page: &Page<'_>) -> String {
    let mut out = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>drover</title></head><body>",
    );
    out.push_str(&format!(
        "<p>drover {} · role {} · {}</p><ul id=\"targets\">",
        escape(page.version),
        escape(page.role),
        if page.ready { "ready" } else { "not ready" }
    ));
    for t in &page.targets {
        out.push_str(&format!(
            "<li class=\"target\" data-name=\"{0}\">{0}: {1}</li>",
            escape(t.name),
            escape(&t.check)
        ));
    }
    out.push_str("</ul></body></html>");
    out
}

/// HTML-escapes text for element content and double- or single-quoted attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[path = "status_page_tests.rs"]
mod tests;
