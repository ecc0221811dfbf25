//! The node policy: which workloads may reach which backends, addresses,
//! paths and regions. A pipeline stage of its own, run on the final, merged
//! request after validation and before any login or fetch. Rules are read
//! from `--policy FILE`, first match wins, and the file states the default.
//!
//! The driver merges a pod's `volumeAttributes` over the SPC's parameters
//! before coffer sees them, so coffer cannot tell who set a value; a policy
//! therefore judges the effective values (addresses, paths, parameters),
//! which is what a pod would try to widen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::backend::Registry;
use crate::error::shown;
use crate::request::MountContext;
use crate::spc::ObjectSpec;

/// Policy files larger than this are refused.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Rules one policy may hold.
pub const MAX_RULES: usize = 10_000;
/// How often the file is looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Action,
    #[serde(default)]
    regions: BTreeMap<String, String>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(default)]
    when: WhenFile,
    #[serde(default)]
    objects: ObjectsFile,
    action: Action,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WhenFile {
    namespaces: Option<Vec<String>>,
    service_accounts: Option<Vec<String>>,
    spcs: Option<Vec<String>>,
    node_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObjectsFile {
    backends: Option<Vec<String>>,
    addresses: Option<Vec<String>>,
    vault_namespaces: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    regions: Option<Vec<String>>,
    regions_not: Option<Vec<String>>,
    parameters: Option<BTreeMap<String, Vec<String>>>,
}

/// A glob: `*` matches any run of characters (`/` included); `{namespace}`,
/// `{serviceAccount}`, `{spc}` stand for the caller's own values, matched
/// literally. Kept as the runs between stars, so matching allocates only
/// for a run that mixes text and placeholders.
#[derive(Debug, Clone)]
struct Pattern {
    /// Runs between stars; a pattern without a star has one.
    runs: Vec<Vec<Piece>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Namespace,
    ServiceAccount,
    Spc,
}

impl Pattern {
    fn parse(raw: &str) -> Result<Pattern, String> {
        let mut runs: Vec<Vec<Piece>> = vec![Vec::new()];
        let mut rest = raw;
        while let Some(c) = rest.chars().next() {
            let run = runs.last_mut().expect("never empty");
            if c == '*' {
                runs.push(Vec::new());
                rest = &rest[1..];
                continue;
            }
            if c == '{' {
                let var = [
                    ("{namespace}", Piece::Namespace),
                    ("{serviceAccount}", Piece::ServiceAccount),
                    ("{spc}", Piece::Spc),
                ]
                .into_iter()
                .find(|(name, _)| rest.starts_with(name));
                let Some((name, piece)) = var else {
                    return Err(format!(
                        "pattern {} has an unknown placeholder (known: {{namespace}}, {{serviceAccount}}, {{spc}})",
                        shown(raw)
                    ));
                };
                run.push(piece);
                rest = &rest[name.len()..];
                continue;
            }
            match run.last_mut() {
                Some(Piece::Text(t)) => t.push(c),
                _ => run.push(Piece::Text(c.to_string())),
            }
            rest = &rest[c.len_utf8()..];
        }
        Ok(Pattern { runs })
    }

    /// One run's text for this caller.
    fn run<'a>(run: &'a [Piece], who: &'a Subject<'_>) -> std::borrow::Cow<'a, str> {
        let one = |p: &'a Piece| -> &'a str {
            match p {
                Piece::Text(t) => t,
                Piece::Namespace => who.namespace,
                Piece::ServiceAccount => who.service_account,
                Piece::Spc => who.spc,
            }
        };
        match run {
            [] => std::borrow::Cow::Borrowed(""),
            [p] => std::borrow::Cow::Borrowed(one(p)),
            many => std::borrow::Cow::Owned(many.iter().map(one).collect()),
        }
    }

    /// Wildcard match in linear time: the runs between stars are found
    /// left to right (the leftmost place is always a right choice).
    fn matches(&self, value: &str, who: &Subject<'_>) -> bool {
        let n = self.runs.len();
        let first = Self::run(&self.runs[0], who);
        if n == 1 {
            return value == first;
        }
        let last = Self::run(&self.runs[n - 1], who);
        if value.len() < first.len() + last.len()
            || !value.starts_with(first.as_ref())
            || !value.ends_with(last.as_ref())
        {
            return false;
        }
        let mut rest = &value[first.len()..value.len() - last.len()];
        for middle in &self.runs[1..n - 1] {
            let middle = Self::run(middle, who);
            match rest.find(middle.as_ref()) {
                Some(i) => rest = &rest[i + middle.len()..],
                None => return false,
            }
        }
        true
    }
}

fn any_matches(patterns: &[Pattern], value: Option<&str>, who: &Subject<'_>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| p.matches(v, who)))
}

#[derive(Debug)]
struct When {
    namespaces: Option<Vec<Pattern>>,
    service_accounts: Option<Vec<Pattern>>,
    spcs: Option<Vec<Pattern>>,
    node_labels: Vec<(String, Pattern)>,
}

#[derive(Debug)]
struct Objects {
    backends: Option<Vec<Pattern>>,
    addresses: Option<Vec<Pattern>>,
    vault_namespaces: Option<Vec<Pattern>>,
    paths: Option<Vec<Pattern>>,
    regions: Option<Vec<Pattern>>,
    regions_not: Option<Vec<Pattern>>,
    parameters: Vec<(String, Vec<Pattern>)>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    when: When,
    objects: Objects,
    action: Action,
}

/// Who is asking: the request's pod identity and the node's labels.
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub spc: &'a str,
    pub node_labels: &'a BTreeMap<String, String>,
}

/// Where an object lives, as its backend tells it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Vault address, `projects/<p>` for Google, the root for files.
    pub address: Option<String>,
    /// Vault namespace.
    pub namespace: Option<String>,
    /// Vault path, Google resource name, file path.
    pub path: Option<String>,
    /// Where the data is (Google location; others from the policy's
    /// `regions` table by address).
    pub region: Option<String>,
}

/// A parsed, validated policy.
pub struct Policy {
    default: Action,
    regions: BTreeMap<String, String>,
    rules: Vec<Rule>,
    /// The rules whose `when` matches a caller (namespace, service account,
    /// SPC; node labels are fixed), found once per caller rather than per
    /// object and Mount: a warm Mount then tries only those.
    candidates: crate::bounded_map::BoundedMap<Arc<Vec<usize>>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("default", &self.default)
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// Callers whose candidate rules are kept (bounded by the node's pods).
const CANDIDATES: crate::bounded_map::Bounds = crate::bounded_map::Bounds {
    max_entries: 4096,
    max_weight: 64 * 1024 * 1024,
    idle: Duration::from_secs(3600),
};

/// What decided an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'p> {
    pub action: Action,
    /// The rule, or `None` for the default.
    pub rule: Option<&'p str>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn patterns(list: Option<Vec<String>>, what: &str) -> Result<Option<Vec<Pattern>>, String> {
    list.map(|l| {
        if l.is_empty() {
            return Err(format!(
                "{what} is an empty list (leave it out to match any)"
            ));
        }
        l.iter().map(|p| Pattern::parse(p)).collect()
    })
    .transpose()
}

fn valid_rule_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Policy {
    /// Parses a policy document; errors name the line where YAML says so.
    pub fn parse(text: &str) -> Result<Policy, String> {
        crate::yaml::check(text, &crate::yaml::REQUEST).map_err(|e| format!("the document {e}"))?;
        let file: File = serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
            Some(l) => format!("line {}, column {}: {e}", l.line(), l.column()),
            None => e.to_string(),
        })?;
        if file.rules.len() > MAX_RULES {
            return Err(format!("{} rules; at most {MAX_RULES}", file.rules.len()));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let at = |e: String| format!("rules[{i}] ({}): {e}", r.name);
            if !valid_rule_name(&r.name) {
                return Err(format!(
                    "rules[{i}]: name {} must be 1-63 letters, digits, '-', '_' or '.'",
                    shown(&r.name)
                ));
            }
            if !names.insert(r.name.clone()) {
                return Err(format!("rules[{i}]: name {} is used twice", shown(&r.name)));
            }
            let when = When {
                namespaces: patterns(r.when.namespaces.clone(), "when.namespaces").map_err(at)?,
                service_accounts: patterns(r.when.service_accounts.clone(), "when.serviceAccounts")
                    .map_err(at)?,
                spcs: patterns(r.when.spcs.clone(), "when.spcs").map_err(at)?,
                node_labels: r
                    .when
                    .node_labels
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| Pattern::parse(&v).map(|p| (k, p)))
                    .collect::<Result<_, _>>()
                    .map_err(at)?,
            };
            let o = &r.objects;
            let objects = Objects {
                backends: patterns(o.backends.clone(), "objects.backends").map_err(at)?,
                addresses: patterns(o.addresses.clone(), "objects.addresses").map_err(at)?,
                vault_namespaces: patterns(o.vault_namespaces.clone(), "objects.vaultNamespaces")
                    .map_err(at)?,
                paths: patterns(o.paths.clone(), "objects.paths").map_err(at)?,
                regions: patterns(o.regions.clone(), "objects.regions").map_err(at)?,
                regions_not: patterns(o.regions_not.clone(), "objects.regionsNot").map_err(at)?,
                parameters: o
                    .parameters
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| {
                        v.iter()
                            .map(|p| Pattern::parse(p))
                            .collect::<Result<Vec<_>, _>>()
                            .map(|p| (k, p))
                    })
                    .collect::<Result<_, _>>()
                    .map_err(at)?,
            };
            rules.push(Rule {
                name: r.name,
                when,
                objects,
                action: r.action,
            });
        }
        let regions = file
            .regions
            .into_iter()
            .map(|(k, v)| (normalize_address(&k), v))
            .collect();
        Ok(Policy {
            default: file.default,
            regions,
            rules,
            candidates: crate::bounded_map::BoundedMap::new(CANDIDATES),
        })
    }

    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The region the policy's table gives an address.
    pub fn region_of(&self, address: &str) -> Option<&str> {
        if self.regions.is_empty() {
            return None;
        }
        self.regions
            .get(&normalize_address(address))
            .map(String::as_str)
    }

    /// The rules whose `when` matches this caller, found once per caller.
    pub fn candidates(&self, who: &Subject<'_>) -> Arc<Vec<usize>> {
        let key = who
            .node_labels
            .iter()
            .fold(
                crate::key::KeyBuilder::new("policy-caller")
                    .field(who.namespace)
                    .field(who.service_account)
                    .field(who.spc),
                |b, (k, v)| b.field(k).field(v),
            )
            .finish();
        self.candidates.get(&key).unwrap_or_else(|| {
            let found: Vec<usize> = (0..self.rules.len())
                .filter(|&i| self.rules[i].when_matches(who))
                .collect();
            let weight = 64 + 8 * found.len() as u64;
            let found = Arc::new(found);
            self.candidates
                .insert_weighed(key, Arc::clone(&found), weight);
            found
        })
    }

    /// The first rule that matches the caller and the object, else the default.
    pub fn decide<'p>(
        &'p self,
        who: &Subject<'_>,
        backend: &str,
        place: &Placement,
        parameters: &BTreeMap<String, String>,
    ) -> Decision<'p> {
        self.decide_among(&self.candidates(who), who, backend, place, parameters)
    }

    /// [`Policy::decide`] with the caller's candidate rules already found.
    pub fn decide_among<'p>(
        &'p self,
        candidates: &[usize],
        who: &Subject<'_>,
        backend: &str,
        place: &Placement,
        parameters: &BTreeMap<String, String>,
    ) -> Decision<'p> {
        let region = place
            .region
            .as_deref()
            .or_else(|| place.address.as_deref().and_then(|a| self.region_of(a)));
        for rule in candidates.iter().map(|&i| &self.rules[i]) {
            if rule.objects_match(who, backend, place, region, parameters) {
                return Decision {
                    action: rule.action,
                    rule: Some(&rule.name),
                };
            }
        }
        Decision {
            action: self.default,
            rule: None,
        }
    }
}

impl Rule {
    /// Whether the rule is about this caller.
    fn when_matches(&self, who: &Subject<'_>) -> bool {
        let opt = |list: &Option<Vec<Pattern>>, value: &str| {
            list.as_ref()
                .is_none_or(|l| any_matches(l, Some(value), who))
        };
        let w = &self.when;
        opt(&w.namespaces, who.namespace)
            && opt(&w.service_accounts, who.service_account)
            && opt(&w.spcs, who.spc)
            && w.node_labels
                .iter()
                .all(|(k, p)| who.node_labels.get(k).is_some_and(|v| p.matches(v, who)))
    }

    /// Whether the rule is about this object (its caller already matched).
    fn objects_match(
        &self,
        who: &Subject<'_>,
        backend: &str,
        place: &Placement,
        region: Option<&str>,
        parameters: &BTreeMap<String, String>,
    ) -> bool {
        let opt = |list: &Option<Vec<Pattern>>, value: Option<&str>| {
            list.as_ref().is_none_or(|l| any_matches(l, value, who))
        };
        let o = &self.objects;
        opt(&o.backends, Some(backend))
            && opt(&o.addresses, place.address.as_deref())
            && opt(&o.vault_namespaces, place.namespace.as_deref())
            && opt(&o.paths, place.path.as_deref())
            && opt(&o.regions, region)
            // An unknown region is outside every list.
            && o.regions_not
                .as_ref()
                .is_none_or(|l| !any_matches(l, region, who))
            && o.parameters.iter().all(|(k, l)| {
                let v = parameters.get(k).map(|s| s.trim()).unwrap_or("");
                l.iter().any(|p| p.matches(v, who))
            })
    }
}

/// Addresses compare without a trailing slash and case-insensitively in
/// scheme and host.
fn normalize_address(a: &str) -> String {
    a.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// One object a policy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub object: String,
    /// `default` when no rule matched.
    pub rule: String,
    pub backend: String,
}

/// The policy of a running daemon: replaced as a whole on reload; a Mount
/// holds the one it started with.
pub struct PolicyHandle {
    path: Option<PathBuf>,
    current: RwLock<Option<Arc<Policy>>>,
    node_labels: BTreeMap<String, String>,
    stamp: RwLock<Option<(SystemTime, u64)>>,
}

impl PolicyHandle {
    /// No policy: every object allowed (today's behaviour).
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            path: None,
            current: RwLock::new(None),
            node_labels: BTreeMap::new(),
            stamp: RwLock::new(None),
        })
    }

    /// Loads `path` (a bad file is an error naming it and the line).
    pub fn load(
        path: Option<PathBuf>,
        node_labels: BTreeMap<String, String>,
    ) -> Result<Arc<Self>, PolicyError> {
        let handle = Self {
            path,
            current: RwLock::new(None),
            node_labels,
            stamp: RwLock::new(None),
        };
        if let Some(p) = &handle.path {
            let (policy, stamp) = read(p)?;
            if let Ok(mut c) = handle.current.write() {
                *c = Some(Arc::new(policy));
            }
            if let Ok(mut s) = handle.stamp.write() {
                *s = Some(stamp);
            }
        }
        Ok(Arc::new(handle))
    }

    pub fn current(&self) -> Option<Arc<Policy>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    pub fn node_labels(&self) -> &BTreeMap<String, String> {
        &self.node_labels
    }

    /// Reads the file again; an invalid file keeps the policy in force.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let Some(p) = &self.path else {
            return Ok(false);
        };
        let (policy, stamp) = read(p)?;
        if let Ok(mut c) = self.current.write() {
            *c = Some(Arc::new(policy));
        }
        if let Ok(mut s) = self.stamp.write() {
            *s = Some(stamp);
        }
        crate::metrics::METRICS.policy_reloads.inc();
        Ok(true)
    }

    /// Whether the file changed since it was last read.
    fn changed(&self) -> bool {
        let Some(p) = &self.path else { return false };
        let now = std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let seen = self.stamp.read().ok().and_then(|s| *s);
        now.is_some() && now != seen
    }

    /// Reloads on SIGHUP and when the file changes.
    pub fn watch(self: &Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        let handle = Arc::clone(self);
        tokio::spawn(async move {
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let signalled = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        _ = tokio::time::sleep(WATCH_EVERY) => false,
                    },
                    None => {
                        tokio::time::sleep(WATCH_EVERY).await;
                        false
                    }
                };
                if signalled || handle.changed() {
                    match handle.reload() {
                        Ok(_) => tracing::info!(
                            rules = handle.current().map_or(0, |p| p.rules.len()),
                            "policy reloaded"
                        ),
                        Err(e) => {
                            crate::metrics::METRICS.policy_reload_failures.inc();
                            // Do not read the same bad file every 2 s.
                            if let (Some(p), Ok(mut s)) = (&handle.path, handle.stamp.write()) {
                                *s = std::fs::metadata(p).ok().map(|m| {
                                    (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())
                                });
                            }
                            tracing::error!(error = %e, "policy not reloaded; the previous one stays in force");
                        }
                    }
                }
            }
        });
    }

    /// Every object's action and deciding rule (`None`: the default), in
    /// order; empty when no policy is in force.
    pub fn decisions(
        &self,
        backends: &Registry,
        objects: &[ObjectSpec],
        ctx: &MountContext,
    ) -> Vec<(Action, Option<String>)> {
        let Some(policy) = self.current() else {
            return Vec::new();
        };
        let who = Subject {
            namespace: &ctx.pod.namespace,
            service_account: &ctx.pod.service_account,
            spc: &ctx.spc_name,
            node_labels: &self.node_labels,
        };
        let candidates = policy.candidates(&who);
        objects
            .iter()
            .map(|object| {
                let place = backends
                    .get(&object.backend)
                    .map(|b| b.placement(object, ctx))
                    .unwrap_or_default();
                let d = policy.decide_among(
                    &candidates,
                    &who,
                    &object.backend,
                    &place,
                    &ctx.parameters,
                );
                (d.action, d.rule.map(str::to_string))
            })
            .collect()
    }

    /// Judges every object of a Mount; the denials, if any.
    pub fn check(
        &self,
        backends: &Registry,
        objects: &[ObjectSpec],
        ctx: &MountContext,
    ) -> Vec<Denial> {
        denials(objects, &self.decisions(backends, objects, ctx))
    }
}

/// The denied objects among `decisions` (as from [`PolicyHandle::decisions`]).
pub fn denials(objects: &[ObjectSpec], decisions: &[(Action, Option<String>)]) -> Vec<Denial> {
    objects
        .iter()
        .zip(decisions)
        .filter(|(_, (action, _))| *action == Action::Deny)
        .map(|(object, (_, rule))| Denial {
            object: object.label(),
            rule: rule.clone().unwrap_or_else(|| "default".to_string()),
            backend: object.backend.clone(),
        })
        .collect()
}

fn read(path: &Path) -> Result<(Policy, (SystemTime, u64)), PolicyError> {
    let invalid = |reason: String| PolicyError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| invalid(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(invalid(format!(
            "{} bytes; at most {MAX_FILE_BYTES}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let policy = Policy::parse(&text).map_err(invalid)?;
    let stamp = (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
    );
    Ok((policy, stamp))
}

/// Parses `KEY=VALUE` node labels (flag values, or a comma-separated list).
pub fn parse_node_labels(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for item in items.iter().flat_map(|s| s.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("node label {} is not KEY=VALUE", shown(item)))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who<'a>(labels: &'a BTreeMap<String, String>) -> Subject<'a> {
        Subject {
            namespace: "team-a",
            service_account: "web",
            spc: "db",
            node_labels: labels,
        }
    }

    #[test]
    fn globs_and_placeholders() {
        let labels = BTreeMap::new();
        let w = who(&labels);
        let m = |p: &str, v: &str| Pattern::parse(p).unwrap().matches(v, &w);
        assert!(m("team-*", "team-a"));
        assert!(!m("team-*", "xteam-a"));
        assert!(m("*", ""));
        assert!(m("", ""));
        assert!(!m("", "x"));
        assert!(m("secret/data/{namespace}/*", "secret/data/team-a/db"));
        assert!(!m("secret/data/{namespace}/*", "secret/data/team-b/db"));
        assert!(m("*-west-*", "eu-west-1"));
        assert!(!m("eu-*", "us-east-1"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(!m("a*b*c", "aXbY"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(m("*.corp", "vault.corp"));
        assert!(!m("*.corp", "vault.corp.evil"));
        assert!(Pattern::parse("{nope}").is_err());
        // Long hostile values stay linear.
        let long = "a".repeat(100_000);
        assert!(!Pattern::parse("*a*a*a*b").unwrap().matches(&long, &w));
    }

    #[test]
    fn first_match_wins_then_default() {
        let p = Policy::parse(
            r#"
default: deny
regions:
  "https://vault-eu.corp:8200/": eu-west-1
rules:
  - name: eu-residency
    when: {nodeLabels: {region: "eu-*"}}
    objects: {backends: [vault, gcp], regionsNot: ["eu-*", "europe-*"]}
    action: deny
  - name: own-paths
    when: {namespaces: ["team-*"]}
    objects: {backends: [vault], paths: ["secret/data/{namespace}/*"]}
    action: allow
  - name: files
    objects: {backends: [file]}
    action: allow
"#,
        )
        .unwrap();
        let eu = BTreeMap::from([("region".to_string(), "eu-west-1".to_string())]);
        let none = BTreeMap::new();
        let vault = |addr: &str, path: &str| Placement {
            address: Some(addr.into()),
            path: Some(path.into()),
            ..Placement::default()
        };
        let params = BTreeMap::new();
        let d = p.decide(
            &who(&eu),
            "vault",
            &vault("https://vault-eu.corp:8200", "secret/data/team-a/x"),
            &params,
        );
        assert_eq!(
            d,
            Decision {
                action: Action::Allow,
                rule: Some("own-paths")
            }
        );
        let d = p.decide(
            &who(&eu),
            "vault",
            &vault("https://vault-us.corp:8200", "secret/data/team-a/x"),
            &params,
        );
        assert_eq!(
            d.rule,
            Some("eu-residency"),
            "unknown region is outside the EU"
        );
        let d = p.decide(
            &who(&none),
            "vault",
            &vault("https://vault-us.corp:8200", "secret/data/team-b/x"),
            &params,
        );
        assert_eq!(
            d,
            Decision {
                action: Action::Deny,
                rule: None
            }
        );
        let d = p.decide(&who(&eu), "file", &Placement::default(), &params);
        assert_eq!(d.rule, Some("files"));
    }

    #[test]
    fn bad_files_name_the_line() {
        let e =
            Policy::parse("default: allow\nrules:\n  - name: a\n    action: maybe\n").unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        let e =
            Policy::parse("default: allow\nrules:\n  - name: a\n    acton: allow\n").unwrap_err();
        assert!(e.contains("acton"), "{e}");
        let e = Policy::parse(
            "default: allow\nrules:\n  - {name: a, action: allow}\n  - {name: a, action: deny}\n",
        )
        .unwrap_err();
        assert!(e.contains("used twice"), "{e}");
        let e = Policy::parse("default: allow\nrules:\n  - {name: 'a b', action: allow}\n")
            .unwrap_err();
        assert!(e.contains("must be"), "{e}");
        assert!(Policy::parse("rules: []\n").is_err(), "default is required");
    }

    #[test]
    fn hostile_policy_documents_are_refused_fast() {
        let started = std::time::Instant::now();
        for doc in [
            "[".repeat(200_000),
            format!(
                "default: allow\nrules:\n{}",
                "  - {name: a, action: allow}\n".repeat(60_000)
            ),
            format!(
                "default: allow\nx: &a [{}]\ny: [{}]\n",
                "1,".repeat(1000),
                "*a,".repeat(5000)
            ),
        ] {
            assert!(Policy::parse(&doc).is_err());
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
