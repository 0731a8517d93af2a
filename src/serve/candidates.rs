//! Neighbours across owners. With several instances each one's index holds the rows it owns
//! ([`crate::serve::AnnIndexes`]), so `/v1/neighbors` asks every other owner for the best rows
//! of its partitions and merges them with its own by their exact scores (scatter-gather).
//!
//! - The owner's side is `POST /v1/candidates/{type}`: for a query vector already in the target
//!   space (the relation-translated source, as `/v1/neighbors` scores it), the best `k` rows of
//!   the partitions its served version covers, each scored by that version (comparator, target
//!   bias).
//! - The asking side finds each partition's owner at the HTTP address its newest version marker
//!   names (`http.advertise`, read by the remote follower: data in Kafka, no registry of our
//!   own), asks the owners at once, and waits at most `http.gather_timeout_ms`. A partition no
//!   owner answered for (none advertised, an error, a timeout, or the owner no longer covers
//!   it) is ranked from this instance's own copies of its rows, and the response says which.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use actix_web::{post, web};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::partition::partition_of;
use crate::remote::RemoteCache;
use crate::schema::TypeId;
use crate::serve::embeddings::{
    left_out, resolve_type, rows, score_every_row, score_picked, Served, Target,
};
use crate::serve::{ApiError, HttpState, MAX_K};
use crate::store::{GraphStore, NodeRef};
use crate::telemetry::NEIGHBORS_GATHERED;

/// `POST /v1/candidates/{type}`'s body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CandidatesRequest {
    /// The query in the target type's space: the relation-translated source (`[D]`).
    pub vector: Vec<f32>,
    /// How many to return (1 to 1000).
    pub k: usize,
    /// Nodes (`type:id`) never returned, e.g. the source's known targets.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// `POST /v1/candidates/{type}`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CandidatesResponse {
    /// The served version that scored them.
    pub version: u64,
    /// The partitions whose rows were ranked (those the version covers), of `of`; none (and
    /// `of` 0) while the served version does not say (the one restored at start).
    pub partitions: Vec<i32>,
    pub of: u32,
    /// Best first; at most `k`.
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    pub node: String,
    pub score: f32,
}

#[post("/v1/candidates/{type}")]
pub(super) async fn owned_candidates(
    state: web::Data<HttpState>,
    path: web::Path<String>,
    body: web::Json<CandidatesRequest>,
) -> Result<web::Json<CandidatesResponse>, ApiError> {
    let type_name = path.into_inner();
    let req = body.into_inner();
    let out = web::block(move || rank_owned(&state, &type_name, &req)).await??;
    Ok(web::Json(out))
}

fn rank_owned(
    state: &HttpState,
    type_name: &str,
    req: &CandidatesRequest,
) -> Result<CandidatesResponse, ApiError> {
    if !(1..=MAX_K).contains(&req.k) {
        return Err(ApiError::BadParam {
            param: "k",
            problem: format!("{} is not in 1..={MAX_K}", req.k),
        });
    }
    if req.vector.is_empty() || !req.vector.iter().all(|x| x.is_finite()) {
        return Err(ApiError::BadParam {
            param: "vector",
            problem: "must be a non-empty list of finite numbers".into(),
        });
    }
    let store = &state.store;
    let t = resolve_type(store, type_name)?;
    let (served, table, bias, scope) = state.serving.with(|view| {
        let view = view.ok_or(ApiError::NoVersion)?;
        let table = (view.tables.get(t as usize)).map(Tensor::shallow_clone);
        let bias =
            (view.biases.get(t as usize).and_then(Option::as_ref)).map(Tensor::shallow_clone);
        Ok::<_, ApiError>((
            Served::bare(view.version, view.comparator),
            table,
            bias,
            view.scope.clone(),
        ))
    })?;
    let mut out = CandidatesResponse {
        version: served.version,
        partitions: Vec::new(),
        of: 0,
        candidates: Vec::new(),
    };
    // A version that does not say which partitions it covers (the one restored at start)
    // answers for none: the asking instance ranks them from its copies until the next one.
    let Some(scope) = scope else {
        return Ok(out);
    };
    let (covered, of) = (scope.covered().to_vec(), scope.partitions());
    (out.partitions, out.of) = (covered.clone(), of);
    let Some(table) = table.filter(|t| rows(t) > 0) else {
        return Ok(out);
    };
    let dim = table.size()[1] as usize;
    if req.vector.len() != dim {
        return Err(ApiError::BadParam {
            param: "vector",
            problem: format!("has {} values, the served rows {dim}", req.vector.len()),
        });
    }
    let n = rows(&table);
    let mut excluded = Vec::new();
    let prefix = format!("{type_name}:");
    for key in &req.exclude {
        if let Some(id) = key.strip_prefix(&prefix) {
            if let Some(index) = store.node_index(t, id)? {
                excluded.push(i64::from(index));
            }
        }
    }
    let gone = left_out(&store.erasures_since(0), &excluded, t, n);
    let covers = Covers::new(store, t, &covered, of);
    let target = Target {
        candidates: &table,
        bias: bias.as_ref(),
        codes: None,
    };
    let translated = Tensor::from_slice(&req.vector).unsqueeze(0);
    let ann = state
        .serving
        .ann()
        .filter(|a| n as usize >= a.config().min_rows);
    let mut hits = Vec::new();
    let searched = ann.and_then(|ann| {
        let keep = |key: u64| gone.binary_search(&(key as i64)).is_err();
        let count = req.k * ann.config().oversample;
        ann.search(
            t,
            served.comparator,
            bias.is_some(),
            &req.vector,
            count,
            keep,
        )
    });
    tch::no_grad(|| -> Result<(), ApiError> {
        match searched {
            Some(found) => {
                let found = found?;
                // An index built for other partitions than the version covers (a move under
                // way) may propose rows of partitions this instance does not answer for.
                let exact_scope = (found.covered.as_ref())
                    .is_some_and(|(theirs, partitions)| *theirs == covered && *partitions == of);
                let picked: Vec<i64> = (found.rows.into_iter())
                    .filter(|&i| i < n && (exact_scope || covers.row(i)))
                    .collect();
                if !picked.is_empty() {
                    let scores = score_picked(&served, &target, &translated, &picked)?;
                    hits = best_where(&scores, req.k, |i| Some(picked[i as usize]))?;
                }
            }
            None => {
                let scores = score_every_row(&served, &target, &translated, &gone, None);
                hits = best_where(&scores, req.k, |i| covers.row(i).then_some(i))?;
            }
        }
        Ok(())
    })?;
    for (score, row) in hits {
        let node = NodeRef {
            node_type: t,
            index: row as u32,
        };
        let id = store.node_id(node)?.ok_or(ApiError::MissingId {
            node_type: t,
            index: node.index,
        })?;
        out.candidates.push(Candidate {
            node: format!("{type_name}:{id}"),
            score,
        });
    }
    Ok(out)
}

/// Whether a row of type `t` is in one of the `covered` partitions (of `of`), from its node's
/// key (every row when all are covered).
pub(super) struct Covers<'a> {
    store: &'a GraphStore,
    t: TypeId,
    /// Sorted; `None`: every partition.
    covered: Option<Vec<i32>>,
    of: u32,
}

impl<'a> Covers<'a> {
    pub(super) fn new(store: &'a GraphStore, t: TypeId, covered: &[i32], of: u32) -> Covers<'a> {
        let mut covered = covered.to_vec();
        covered.sort_unstable();
        covered.dedup();
        Covers {
            store,
            t,
            covered: (covered.len() < of as usize).then_some(covered),
            of,
        }
    }

    pub(super) fn row(&self, row: i64) -> bool {
        let Some(covered) = &self.covered else {
            return true;
        };
        let row = row as u32;
        let found = self.store.partitions_of(self.t, row, row + 1, self.of);
        found
            .first()
            .copied()
            .flatten()
            .is_some_and(|q| covered.binary_search(&q).is_ok())
    }
}

/// The best `k` of `scores` (`[m]`, rows at −∞ never) whose position `keep` maps to a row,
/// best first, as `(score, row)`. Takes the top of `scores` in growing steps, so a filter that
/// keeps most rows costs one small top-k, and one that keeps few still finds them.
pub(super) fn best_where(
    scores: &Tensor,
    k: usize,
    keep: impl Fn(i64) -> Option<i64>,
) -> Result<Vec<(f32, i64)>, ApiError> {
    let m = scores.size()[0];
    let mut take = ((k * 4) as i64).min(m);
    loop {
        let (values, indices) = scores.f_topk(take, 0, true, true)?;
        let values = Vec::<f32>::try_from(&values.to_kind(Kind::Float))?;
        let indices = Vec::<i64>::try_from(&indices)?;
        let mut out = Vec::with_capacity(k);
        // A −∞ ends the finite scores: every row that could be kept was seen.
        let mut seen_all = take == m;
        for (score, i) in values.into_iter().zip(indices) {
            if score == f32::NEG_INFINITY {
                seen_all = true;
                break;
            }
            if let Some(row) = keep(i) {
                out.push((score, row));
                if out.len() == k {
                    break;
                }
            }
        }
        if out.len() == k || seen_all {
            return Ok(out);
        }
        take = (take * 4).min(m);
    }
}

/// The HTTP client `/v1/neighbors` asks the other owners with: one agent for every request, so
/// that the connection to each owner is kept and reused, each call bounded by
/// `http.gather_timeout_ms`.
#[derive(Clone)]
pub struct Peers {
    agent: ureq::Agent,
}

impl Peers {
    pub fn new(timeout: Duration) -> Peers {
        Peers {
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
        }
    }

    /// `method http://{address}{path}`, with this deployment's bearer token when it has one.
    fn request(
        &self,
        method: &str,
        address: &str,
        path: &str,
        token: Option<&str>,
    ) -> (String, ureq::Request) {
        let url = format!("http://{address}{path}");
        let request = self.agent.request(method, &url);
        let request = match token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        };
        (url, request)
    }

    /// `GET http://{address}{path}` as JSON, marked with header `mark`; `None` when it fails or
    /// answers anything but a 200 of that document (logged).
    pub(super) fn get<T: serde::de::DeserializeOwned>(
        &self,
        address: &str,
        path: &str,
        token: Option<&str>,
        mark: &str,
    ) -> Option<T> {
        let (url, request) = self.request("GET", address, path, token);
        let answer = (request.set(mark, "1").call())
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_json::<T>().map_err(|e| e.to_string()));
        match answer {
            Ok(answer) => Some(answer),
            Err(error) => {
                tracing::warn!(%url, %error, "the owner did not answer; ranking here");
                None
            }
        }
    }

    /// `POST /v1/candidates/{type_name}` to the owner at `address`.
    fn candidates(
        &self,
        address: &str,
        type_name: &str,
        token: Option<&str>,
        body: &CandidatesRequest,
    ) -> Result<CandidatesResponse, String> {
        let path = format!("/v1/candidates/{type_name}");
        let (url, request) = self.request("POST", address, &path, token);
        let response = request
            .send_json(body)
            .map_err(|e| format!("POST {url}: {e}"))?;
        response
            .into_json::<CandidatesResponse>()
            .map_err(|e| format!("POST {url}: the answer is not a candidates document: {e}"))
    }
}

/// How `/v1/neighbors` reaches the other owners.
pub(super) struct Gather<'a> {
    pub(super) store: &'a GraphStore,
    /// `None` (`remote.enabled = false`): no owner is known, every partition is ranked here.
    pub(super) remote: Option<&'a RemoteCache>,
    pub(super) peers: &'a Peers,
    pub(super) token: Option<&'a str>,
}

/// One owner asked, as the response reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OwnerAnswer {
    /// Its advertised HTTP address.
    pub address: String,
    pub node_type: String,
    /// The partitions it ranked (empty when it failed).
    pub partitions: Vec<i32>,
    /// The version it ranked them with.
    pub version: Option<u64>,
    pub ms: f64,
    /// Why it gave nothing (its partitions were then ranked here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `/v1/neighbors`' `gathered`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GatherReport {
    /// The owners asked, per target type.
    pub owners: Vec<OwnerAnswer>,
    /// Partitions owned elsewhere that were ranked from this instance's copies of their rows.
    pub local: Vec<i32>,
}

/// An owner asked: its address, the partitions wanted of it, its answer, and how long it took
/// (ms).
type Asked = (String, Vec<i32>, Result<CandidatesResponse, String>, f64);

/// What a gather for one target type found.
pub(super) struct Gathered {
    pub(super) hits: Vec<(f32, String)>,
    pub(super) owners: Vec<OwnerAnswer>,
    /// The partitions nobody answered for: the caller ranks them from its own rows.
    pub(super) unanswered: Vec<i32>,
}

impl Gather<'_> {
    /// Every owner of `owners` (address → the partitions wanted of it) asked at once.
    fn ask_all(
        &self,
        owners: BTreeMap<String, Vec<i32>>,
        type_name: &str,
        body: &CandidatesRequest,
    ) -> Vec<Asked> {
        std::thread::scope(|scope| {
            let asked: Vec<_> = (owners.into_iter())
                .map(|(address, wanted)| {
                    scope.spawn(move || {
                        let started = Instant::now();
                        let answer = self.peers.candidates(&address, type_name, self.token, body);
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        (address, wanted, answer, ms)
                    })
                })
                .collect();
            (asked.into_iter())
                .map(|h| h.join().expect("a gather thread panicked"))
                .collect()
        })
    }

    /// Ask the owners of `partitions` (type `t`) for their best `k` rows for `query`, leaving
    /// out the `exclude` rows (this instance's row indices of type `t`); all at once, each
    /// waited for at most the gather timeout.
    pub(super) fn ask(
        &self,
        t: TypeId,
        query: &[f32],
        k: usize,
        exclude: &[i64],
        partitions: &[i32],
    ) -> Result<Gathered, ApiError> {
        let type_name = self.store.stored_schema().node_types[t as usize].clone();
        let owners = self
            .remote
            .map(|r| r.owners_of(partitions))
            .unwrap_or_default();
        let answers: Vec<Asked> = match owners.is_empty() {
            true => Vec::new(),
            false => {
                let mut exclude_keys = Vec::with_capacity(exclude.len());
                for &row in exclude {
                    let node = NodeRef {
                        node_type: t,
                        index: row as u32,
                    };
                    if let Some(id) = self.store.node_id(node)? {
                        exclude_keys.push(format!("{type_name}:{id}"));
                    }
                }
                let body = CandidatesRequest {
                    vector: query.to_vec(),
                    k,
                    exclude: exclude_keys,
                };
                self.ask_all(owners, &type_name, &body)
            }
        };
        let mut left: BTreeSet<i32> = partitions.iter().copied().collect();
        let mut out = Gathered {
            hits: Vec::new(),
            owners: Vec::new(),
            unanswered: Vec::new(),
        };
        for (address, wanted, answer, ms) in answers {
            let mut owner = OwnerAnswer {
                address,
                node_type: type_name.clone(),
                partitions: Vec::new(),
                version: None,
                ms,
                error: None,
            };
            match answer {
                Ok(answer) => {
                    // Only the partitions it was asked for and covers: an owner that lost one
                    // since its marker answers for what it owns now.
                    let counted: Vec<i32> = (wanted.iter().copied())
                        .filter(|q| answer.partitions.contains(q))
                        .collect();
                    let place = |key: &str| partition_of(key.as_bytes(), answer.of) as i32;
                    out.hits.extend(
                        (answer.candidates.into_iter())
                            .filter(|c| counted.contains(&place(&c.node)))
                            .map(|c| (c.score, c.node)),
                    );
                    for q in &counted {
                        left.remove(q);
                    }
                    owner.partitions = counted;
                    owner.version = Some(answer.version);
                }
                Err(e) => owner.error = Some(e),
            }
            out.owners.push(owner);
        }
        out.unanswered = left.into_iter().collect();
        let answered = partitions.len() - out.unanswered.len();
        metrics::counter!(NEIGHBORS_GATHERED, "from" => "owner").increment(answered as u64);
        metrics::counter!(NEIGHBORS_GATHERED, "from" => "local")
            .increment(out.unanswered.len() as u64);
        Ok(out)
    }
}
