//! `/v1/embeddings/{type}/{id}` and `/v1/neighbors/{type}/{id}`: rows of the served (committed)
//! version, and the top-k targets by the model's score: exact over every row, or over a large
//! type's approximate candidates ([`crate::serve::AnnIndexes`]), always scored exactly. With
//! several instances a source another instance owns is forwarded to its owner, and the
//! partitions this instance's index does not hold are gathered from theirs (`candidates.rs`).

use actix_web::{get, web};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::partition::partition_of;
use crate::publish::{Codebooks, PublishedView};
use crate::schema::RelId;
use crate::schema::TypeId;
use crate::serve::candidates::{best_where, Covers, Gather, GatherReport};
use crate::serve::{AnnIndexes, ApiError, HttpState, DEFAULT_K, MAX_K};
use crate::store::{GraphStore, NodeRef};
use crate::train::{
    composed_source, interest_sources, known_targets, mixture, score_targets, translate,
};

/// Rows of a `[rows, D]` table (0 for anything else).
pub(super) fn rows(t: &Tensor) -> i64 {
    if t.dim() == 2 {
        t.size()[0]
    } else {
        0
    }
}

/// Row `index` of a `[rows, D]` table, if the table has it.
fn row(t: &Tensor, index: i64) -> Option<Tensor> {
    (index < rows(t)).then(|| t.get(index))
}

pub(super) fn resolve_type(store: &GraphStore, name: &str) -> Result<TypeId, ApiError> {
    store
        .stored_schema()
        .node_types
        .iter()
        .position(|t| t == name)
        .map(|t| t as TypeId)
        .ok_or_else(|| ApiError::UnknownType(name.to_owned()))
}

/// `key` is the node as the response names it (`type:id`).
fn resolve_node(
    store: &GraphStore,
    node_type: TypeId,
    id: &str,
    key: &str,
) -> Result<NodeRef, ApiError> {
    known_node(store, node_type, id, key)?.ok_or_else(|| ApiError::UnknownNode(key.to_owned()))
}

/// The node if the store holds it (`None`: it does not), an error if it was erased.
fn known_node(
    store: &GraphStore,
    node_type: TypeId,
    id: &str,
    key: &str,
) -> Result<Option<NodeRef>, ApiError> {
    let Some(index) = store.node_index(node_type, id)? else {
        return Ok(None);
    };
    let node = NodeRef { node_type, index };
    if store.is_erased(node) {
        return Err(ApiError::Erased(key.to_owned()));
    }
    Ok(Some(node))
}

/// The served version, or 503.
fn served(view: Option<&PublishedView>) -> Result<&PublishedView, ApiError> {
    view.ok_or(ApiError::NoVersion)
}

fn node_row(view: &PublishedView, node: NodeRef, key: &str) -> Result<Tensor, ApiError> {
    view.tables
        .get(node.node_type as usize)
        .and_then(|t| row(t, i64::from(node.index)))
        .ok_or_else(|| ApiError::NodeNotServed {
            node: key.to_owned(),
            version: view.version,
        })
}

/// `GET /v1/embeddings/{type}/{id}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    /// `type:id`.
    pub node: String,
    /// The version served: this instance's committed version, or for a `remote` row the
    /// version its partition's owner published last (contract 3 numbers each partition's
    /// versions).
    pub version: u64,
    pub epoch: u64,
    /// Event time (ms) of the newest event that touched the row, when the version records it
    /// (`null` for a `remote` row).
    pub ts: Option<i64>,
    pub vector: Vec<f32>,
    pub source: RowSource,
    /// The node's partition (of the engagements and embeddings topics); `null` before this
    /// instance's first assignment.
    pub partition: Option<i32>,
}

/// Where an answered row comes from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RowSource {
    /// This instance owns the node's partition: its committed version.
    Owner,
    /// Another instance owns it: that owner's published row, as this instance's subscriber of
    /// the partition assembled it (`[remote]`).
    Remote,
    /// Another instance owns it and no published row of it is cached (`remote.enabled` is
    /// false, the partition is not followed yet, or its owner has not published the node):
    /// this instance's own committed version.
    Local,
}

// `{id:.+}`: node ids may contain `/` (search queries, URLs).
#[get("/v1/embeddings/{type}/{id:.+}")]
pub(super) async fn embedding_row(
    state: web::Data<HttpState>,
    path: web::Path<(String, String)>,
) -> Result<web::Json<EmbeddingResponse>, ApiError> {
    let (type_name, id) = path.into_inner();
    let out = web::block(move || lookup_embedding(&state, &type_name, &id)).await??;
    Ok(web::Json(out))
}

fn lookup_embedding(
    state: &HttpState,
    type_name: &str,
    id: &str,
) -> Result<EmbeddingResponse, ApiError> {
    let key = format!("{type_name}:{id}");
    let node_type = resolve_type(&state.store, type_name)?;
    let (partition, owned) = ownership_of(state, &key);
    let known = known_node(&state.store, node_type, id, &key)?;
    if !owned {
        if let Some(mut row) = state.remote.as_ref().and_then(|r| r.get(&key)) {
            // A biased type's record carries its bias after the embedding; the answer is the
            // embedding alone, as for rows this instance owns.
            if let Some(train) = &state.train {
                row.vector.truncate(train.dim as usize);
            }
            return Ok(EmbeddingResponse {
                node: key,
                version: row.applied.0,
                epoch: row.applied.1,
                ts: None,
                vector: row.vector,
                source: RowSource::Remote,
                partition,
            });
        }
    }
    let node = known.ok_or_else(|| ApiError::UnknownNode(key.clone()))?;
    state.serving.with(|view| {
        let view = served(view)?;
        let row = node_row(view, node, &key)?;
        let vector = Vec::<f32>::try_from(&row.to_kind(Kind::Float).contiguous())?;
        let ts = view
            .row_ts
            .get(node.node_type as usize)
            .and_then(|r| r.get(node.index as usize))
            .copied();
        Ok(EmbeddingResponse {
            node: key.clone(),
            version: view.version,
            epoch: view.epoch,
            ts,
            vector,
            source: if owned {
                RowSource::Owner
            } else {
                RowSource::Local
            },
            partition,
        })
    })
}

/// The partition of `key` and whether this instance owns it (before the first assignment,
/// when the partition count is unknown: owned).
fn ownership_of(state: &HttpState, key: &str) -> (Option<i32>, bool) {
    let partitions = state.ingest.ownership.partition_count();
    if partitions == 0 {
        return (None, true);
    }
    let q = partition_of(key.as_bytes(), partitions) as i32;
    let owned = state.ingest.ownership.get().partitions.contains(&q);
    (Some(q), owned)
}

#[derive(Debug, Deserialize)]
pub(super) struct NeighborsQuery {
    pub rel: Option<String>,
    /// Strings so that a bad value gets our error naming the parameter, not the extractor's.
    pub k: Option<String>,
    /// `true`: score every row (never the index).
    pub exact: Option<String>,
    /// `true`: leave out the node's known targets of `rel`, as the filtered evaluation does.
    pub exclude_known: Option<String>,
    /// `true`: score every row from its product-quantized codes, as `pq` subscribers hold it
    /// (`publish.format = "pq"`; never the index).
    pub codes: Option<String>,
    /// `true`: a history-type source as its interests, merged as a mixture (every row scored);
    /// unset: `http.multi_interest.enabled`.
    pub interests: Option<String>,
}

/// `GET /v1/neighbors`'s ranking method: `exact` (every row scored), `ann` (at least one
/// target type's candidates came from its index, then were scored exactly) or `codes` (every
/// row scored from its product-quantized codes).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RankMethod {
    Exact,
    Ann,
    Codes,
}

/// `GET /v1/neighbors/{type}/{id}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NeighborsResponse {
    pub node: String,
    pub rel: String,
    pub version: u64,
    pub method: RankMethod,
    /// With `ann`: the oldest served version the searched indexes reflect (candidates are scored
    /// with `version`'s rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_version: Option<u64>,
    /// With interests: how many the source was split into (per target type, the most); the
    /// scores are then the mixture's log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interests: Option<usize>,
    /// With several instances, when a target type's index holds this instance's partitions
    /// only: the other owners asked for theirs, and the partitions ranked here from this
    /// instance's copies instead (no owner advertised, or it did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gathered: Option<GatherReport>,
    /// With several instances, when the source's partition is another instance's: that owner's
    /// address, which ranked it (this instance forwarded the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<String>,
    /// Best first.
    pub neighbors: Vec<ScoredNode>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ScoredNode {
    pub node: String,
    pub score: f32,
}

fn parse_k(k: Option<&str>) -> Result<usize, ApiError> {
    let Some(k) = k else {
        return Ok(DEFAULT_K);
    };
    let bad = || ApiError::BadParam {
        param: "k",
        problem: format!("{k:?} is not an integer in 1..={MAX_K}"),
    };
    let k: usize = k.trim().parse().map_err(|_| bad())?;
    if (1..=MAX_K).contains(&k) {
        Ok(k)
    } else {
        Err(bad())
    }
}

fn parse_flag(param: &'static str, value: Option<&str>) -> Result<bool, ApiError> {
    match value.map(str::trim) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::BadParam {
            param,
            problem: format!("{other:?} is not true or false"),
        }),
    }
}

/// What one ranking asks for besides the node and relation.
struct RankRequest {
    k: usize,
    exact: bool,
    exclude_known: bool,
    codes: bool,
    interests: bool,
}

#[get("/v1/neighbors/{type}/{id:.+}")]
pub(super) async fn neighbor_ranking(
    state: web::Data<HttpState>,
    path: web::Path<(String, String)>,
    query: web::Query<NeighborsQuery>,
    request: actix_web::HttpRequest,
) -> Result<web::Json<NeighborsResponse>, ApiError> {
    let (type_name, id) = path.into_inner();
    // A source another instance owns is ranked by its owner, which holds its published row and
    // every edge it is the source of; once (a forwarded request is answered where it lands).
    let forwarded = request.headers().contains_key(FORWARDED_HEADER);
    if !forwarded {
        let (state, path) = (state.clone(), request.uri().to_string());
        let key = format!("{type_name}:{id}");
        if let Some(answer) = web::block(move || ask_owner(&state, &key, &path)).await? {
            return Ok(web::Json(answer));
        }
    }
    let NeighborsQuery {
        rel,
        k,
        exact,
        exclude_known,
        codes,
        interests,
    } = query.into_inner();
    let req = RankRequest {
        k: parse_k(k.as_deref())?,
        exact: parse_flag("exact", exact.as_deref())?,
        exclude_known: parse_flag("exclude_known", exclude_known.as_deref())?,
        codes: parse_flag("codes", codes.as_deref())?,
        interests: match interests {
            Some(v) => parse_flag("interests", Some(&v))?,
            None => state.multi_interest.enabled,
        },
    };
    let rel = rel.filter(|r| !r.is_empty()).ok_or(ApiError::BadParam {
        param: "rel",
        problem: "required: the relation to rank targets by".into(),
    })?;
    let out = web::block(move || rank_neighbors(&state, &type_name, &id, &rel, &req)).await??;
    Ok(web::Json(out))
}

/// Marks a `/v1/neighbors` request one instance forwarded to the source's owner.
pub(super) const FORWARDED_HEADER: &str = "x-twhin-forwarded";

/// The source's owner's answer to `path`, when another instance owns `key`'s partition, its
/// address is known and it answers; `None`: rank here.
fn ask_owner(state: &HttpState, key: &str, path: &str) -> Option<NeighborsResponse> {
    let (Some(partition), false) = ownership_of(state, key) else {
        return None;
    };
    let remote = state.remote.as_deref()?;
    let (address, _) = remote.owners_of(&[partition]).pop_first()?;
    let mut answer: NeighborsResponse = state.peers.get(
        &address,
        path,
        state.bearer_token.as_deref(),
        FORWARDED_HEADER,
    )?;
    answer.answered_by = Some(address);
    Some(answer)
}

/// What a ranking reads of the served version: shallow copies taken under the view's lock, so
/// the scoring runs without it (requests rank in parallel; a new version can be published
/// meanwhile).
pub(super) struct Served {
    pub(super) version: u64,
    pub(super) comparator: crate::train::Comparator,
    relation: Tensor,
    /// Per target type: its table, target biases and, with `codes=true`, its codes.
    targets: Vec<(TypeId, Tensor, Option<Tensor>, Option<Tensor>)>,
    /// With `codes=true`: the codebooks of the targets' codes.
    codebooks: Option<Codebooks>,
}

impl Served {
    /// A version's comparator alone, for scoring given queries against given rows.
    pub(super) fn bare(version: u64, comparator: crate::train::Comparator) -> Served {
        Served {
            version,
            comparator,
            relation: Tensor::empty([0], (Kind::Float, tch::Device::Cpu)),
            targets: Vec::new(),
            codebooks: None,
        }
    }
}

/// The `k` best targets of `rel` for the node, scored by the served version with its comparator
/// against the rows of every target type of `rel`: every row (exact), or, for a type with an
/// index of at least `http.ann.min_rows` rows, the index's candidates (re-scored exactly). The
/// node itself is a candidate; its known targets are too unless `exclude_known`.
fn rank_neighbors(
    state: &HttpState,
    type_name: &str,
    id: &str,
    rel: &str,
    req: &RankRequest,
) -> Result<NeighborsResponse, ApiError> {
    let store = &state.store;
    let key = format!("{type_name}:{id}");
    let node_type = resolve_type(store, type_name)?;
    let (rel_id, dst_types) = resolve_relation(store, type_name, rel)?;
    let node = resolve_node(store, node_type, id, &key)?;
    let (src, served) = state.serving.with(|view| {
        take_served(
            served(view)?,
            node,
            &key,
            (rel_id, rel),
            &dst_types,
            req.codes,
        )
    })?;
    // A history-type source is its row plus the sum of its recent targets' served rows, per
    // target type, as the model scores it; with interests, one such query per interest.
    let interests = req.interests
        && (state.train.as_ref()).is_some_and(|p| p.history_types.iter().any(|h| h == type_name));
    let mut sources = Vec::with_capacity(served.targets.len());
    let mut known = Vec::with_capacity(served.targets.len());
    for (t, table, _, _) in &served.targets {
        sources.push(match &state.train {
            Some(p) if interests => {
                let mi = &state.multi_interest;
                let (queries, share) =
                    interest_sources(p, mi, store, node, *t as usize, &src, table)?;
                (queries, Some(share))
            }
            Some(p) => {
                let composed = composed_source(p, store, node, *t as usize, &src, table)?;
                (composed.unsqueeze(0), None)
            }
            None => (src.unsqueeze(0), None),
        });
        known.push(match req.exclude_known {
            true => known_targets(store, node, rel_id, *t)?,
            false => Vec::new(),
        });
    }
    let erased = store.erasures_since(0);
    // Interests are merged over every row: the mixture needs each interest's softmax.
    let ann = (state.serving.ann()).filter(|_| !req.exact && !req.codes && !interests);
    let gather = Gather {
        store,
        remote: state.remote.as_deref(),
        peers: &state.peers,
        token: state.bearer_token.as_deref(),
    };
    let ranked =
        tch::no_grad(|| top_targets(&served, &sources, &erased, &known, req.k, ann, &gather))?;
    let mut neighbors = Vec::with_capacity(ranked.hits.len());
    for (score, target) in ranked.hits {
        let node = match target {
            Hit::Row(target) => {
                let id = store.node_id(target)?.ok_or(ApiError::MissingId {
                    node_type: target.node_type,
                    index: target.index,
                })?;
                let type_name = &store.stored_schema().node_types[target.node_type as usize];
                format!("{type_name}:{id}")
            }
            Hit::Key(key) => key,
        };
        neighbors.push(ScoredNode { node, score });
    }
    Ok(NeighborsResponse {
        node: key,
        rel: rel.to_owned(),
        version: served.version,
        method: match (ranked.index_version, &served.codebooks) {
            (Some(_), _) => RankMethod::Ann,
            (None, Some(_)) => RankMethod::Codes,
            (None, None) => RankMethod::Exact,
        },
        index_version: ranked.index_version,
        interests: (sources.iter())
            .filter_map(|(_, share)| share.as_ref())
            .map(|s| s.size()[0] as usize)
            .max(),
        gathered: ranked.gathered,
        answered_by: None,
        neighbors,
    })
}

/// The relation `rel` by name, checked to start at `type_name`: its id and its target types.
fn resolve_relation(
    store: &GraphStore,
    type_name: &str,
    rel: &str,
) -> Result<(RelId, Vec<TypeId>), ApiError> {
    let schema = store.stored_schema();
    let (rel_id, (_, src_types, dst_names)) = schema
        .relations
        .iter()
        .enumerate()
        .find(|(_, (name, _, _))| name == rel)
        .ok_or_else(|| ApiError::BadParam {
            param: "rel",
            problem: format!("unknown relation `{rel}`"),
        })?;
    if !src_types.iter().any(|t| t == type_name) {
        return Err(ApiError::BadParam {
            param: "rel",
            problem: format!(
                "relation `{rel}` starts at `{}`, not at `{type_name}`",
                src_types.join("` or `")
            ),
        });
    }
    let mut dst_types = Vec::with_capacity(dst_names.len());
    for name in dst_names {
        let t = resolve_type(store, name)?;
        if !dst_types.contains(&t) {
            dst_types.push(t);
        }
    }
    Ok((rel_id as RelId, dst_types))
}

/// The node's served row and what ranking reads of `view` for relation `(id, name)`'s
/// `dst_types` (with `codes`: their codes and codebooks, refused when the version has none).
fn take_served(
    view: &PublishedView,
    node: NodeRef,
    key: &str,
    (rel_id, rel): (RelId, &str),
    dst_types: &[TypeId],
    codes: bool,
) -> Result<(Tensor, Served), ApiError> {
    let src = node_row(view, node, key)?;
    let relation =
        row(&view.relations, rel_id as i64).ok_or_else(|| ApiError::RelationNotServed {
            rel: rel.to_owned(),
            version: view.version,
        })?;
    let codes = match (&view.codes, codes) {
        (_, false) => None,
        (None, true) => {
            return Err(ApiError::BadParam {
                param: "codes",
                problem: format!(
                    "version {} has no codes: set publish.format = \"pq\"",
                    view.version
                ),
            })
        }
        (Some(c), true) => Some(c),
    };
    let targets = dst_types
        .iter()
        .filter_map(|&t| {
            let table = view.tables.get(t as usize)?.shallow_clone();
            let bias = view
                .biases
                .get(t as usize)
                .and_then(Option::as_ref)
                .map(Tensor::shallow_clone);
            let type_codes = match codes {
                Some(c) => Some(c.tables.get(t as usize)?.shallow_clone()),
                None => None,
            };
            Some((t, table, bias, type_codes))
        })
        .collect();
    Ok((
        src,
        Served {
            version: view.version,
            comparator: view.comparator,
            relation,
            targets,
            codebooks: codes.map(|c| c.codebooks.shallow_clone()),
        },
    ))
}

/// The best targets, the oldest version of the indexes searched (`None`: none was), and the
/// other owners asked.
struct Ranked {
    hits: Vec<(f32, Hit)>,
    index_version: Option<u64>,
    gathered: Option<GatherReport>,
}

/// A target: a row of this instance's served version, or a node another owner answered with.
/// (Ordered for ties: this instance's rows first, by type and row, then other owners' by key.)
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Hit {
    Row(NodeRef),
    Key(String),
}

/// Best `k` of each target type, then merged: a best `k` overall is within the union. A type
/// with a usable index (`ann`) is scored on its candidates (`k × http.ann.oversample`), every
/// other on all its rows (libtorch's top-k); a source of several interests scores every row per
/// interest and merges them ([`mixture`]). Ties go to the lower type id, then the lower row.
/// `sources` are per target type (as `served.targets`) the source's queries `[c, D]` (one, or
/// one per interest) and, with interests, each one's share of the history `[c]`. `erased` nodes,
/// and the `known` rows of each type, are never candidates. An index that holds this instance's
/// partitions only (several instances) gives their candidates; the other partitions' best come
/// from their owners (`gather`), or from this instance's rows of them when no owner answers.
fn top_targets(
    served: &Served,
    sources: &[(Tensor, Option<Tensor>)],
    erased: &[NodeRef],
    known: &[Vec<i64>],
    k: usize,
    ann: Option<&AnnIndexes>,
    gather: &Gather,
) -> Result<Ranked, ApiError> {
    let mut hits: Vec<(f32, Hit)> = Vec::new();
    let mut index_version: Option<u64> = None;
    let mut gathered: Option<GatherReport> = None;
    let typed = served.targets.iter().zip(sources).zip(known);
    for (((t, candidates, bias, codes), (queries, share)), known) in typed {
        let t = *t;
        let translated = translate(queries, &served.relation.unsqueeze(0));
        let n = rows(candidates);
        if n == 0 {
            continue;
        }
        let gone = left_out(erased, known, t, n);
        let target = Target {
            candidates,
            bias: bias.as_ref(),
            codes: codes.as_ref(),
        };
        // From the index: its candidates, re-scored below exactly like every row would be.
        let from_index = match ann.filter(|a| n as usize >= a.config().min_rows) {
            Some(ann) => {
                let query = Vec::<f32>::try_from(&translated.reshape([-1]).to_kind(Kind::Float))?;
                let keep = |key: u64| gone.binary_search(&(key as i64)).is_err();
                let count = k * ann.config().oversample;
                match ann.search(t, served.comparator, bias.is_some(), &query, count, keep) {
                    Some(found) => {
                        let found = found?;
                        index_version = Some(
                            index_version
                                .map_or(found.index_version, |v| v.min(found.index_version)),
                        );
                        // The partitions the index does not hold are their owners' to rank.
                        if let Some((covered, of)) = &found.covered {
                            let others: Vec<i32> =
                                (0..*of as i32).filter(|q| !covered.contains(q)).collect();
                            let report = gathered.get_or_insert_with(GatherReport::default);
                            let others = Others {
                                t,
                                partitions: &others,
                                of: *of,
                            };
                            hits.extend(gather_others(
                                served,
                                (&target, &translated, &query),
                                &others,
                                k,
                                &gone,
                                gather,
                                report,
                            )?);
                        }
                        // An index a version behind may name rows the served version dropped.
                        Some(
                            found
                                .rows
                                .into_iter()
                                .filter(|i| (0..n).contains(i))
                                .collect::<Vec<_>>(),
                        )
                    }
                    None => None,
                }
            }
            None => None,
        };
        let scores = match &from_index {
            Some(picked) if picked.is_empty() => continue,
            Some(picked) => score_picked(served, &target, &translated, picked)?,
            None => score_every_row(served, &target, &translated, &gone, share.as_ref()),
        };
        hits.extend(
            best_of(&scores, from_index.as_deref(), t, k)?
                .into_iter()
                .map(|(score, node)| (score, Hit::Row(node))),
        );
    }
    hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    hits.truncate(k);
    Ok(Ranked {
        hits,
        index_version,
        gathered,
    })
}

/// The partitions of type `t` an index does not hold, of `of`.
struct Others<'a> {
    t: TypeId,
    partitions: &'a [i32],
    of: u32,
}

/// The best `k` of `others` for the `query` (`translated`, as a tensor): from their owners
/// (`gather`), and for those no owner answered for, from this instance's rows of `target`,
/// scored exactly; the `gone` rows never.
fn gather_others(
    served: &Served,
    (target, translated, query): (&Target, &Tensor, &[f32]),
    others: &Others,
    k: usize,
    gone: &[i64],
    gather: &Gather,
    report: &mut GatherReport,
) -> Result<Vec<(f32, Hit)>, ApiError> {
    let found = gather.ask(others.t, query, k, gone, others.partitions)?;
    let mut hits: Vec<(f32, Hit)> = (found.hits.into_iter())
        .map(|(score, key)| (score, Hit::Key(key)))
        .collect();
    report.owners.extend(found.owners);
    if found.unanswered.is_empty() {
        return Ok(hits);
    }
    let covers = Covers::new(gather.store, others.t, &found.unanswered, others.of);
    let scores = score_every_row(served, target, translated, gone, None);
    let local = best_where(&scores, k, |i| covers.row(i).then_some(i))?;
    hits.extend(local.into_iter().map(|(score, row)| {
        let node = NodeRef {
            node_type: others.t,
            index: row as u32,
        };
        (score, Hit::Row(node))
    }));
    report.local.extend(found.unanswered);
    Ok(hits)
}

/// One target type as [`Served`] holds it: its rows, target biases and codes.
pub(super) struct Target<'a> {
    pub(super) candidates: &'a Tensor,
    pub(super) bias: Option<&'a Tensor>,
    pub(super) codes: Option<&'a Tensor>,
}

/// The rows of a type of `n` rows that are never candidates, sorted: the `erased` nodes of type
/// `t` and the `known` rows.
pub(super) fn left_out(erased: &[NodeRef], known: &[i64], t: TypeId, n: i64) -> Vec<i64> {
    let mut gone: Vec<i64> = erased
        .iter()
        .filter(|e| e.node_type == t && i64::from(e.index) < n)
        .map(|e| i64::from(e.index))
        .chain(known.iter().copied().filter(|&i| i < n))
        .collect();
    gone.sort_unstable();
    gone.dedup();
    gone
}

/// The index's candidates `picked` scored exactly, as every row would be (`[picked]`).
pub(super) fn score_picked(
    served: &Served,
    target: &Target,
    translated: &Tensor,
    picked: &[i64],
) -> Result<Tensor, ApiError> {
    let idx = Tensor::from_slice(picked);
    let scores = score_targets(
        served.comparator,
        translated,
        &target.candidates.f_index_select(0, &idx)?,
    )
    .reshape([-1]);
    Ok(match target.bias {
        Some(b) => scores + b.f_index_select(0, &idx)?,
        None => scores,
    })
}

/// Every row scored (from the codes when the request asked for them), the `gone` rows at −∞;
/// with interests (even one) the mixture's log-probabilities over the queries' scores.
pub(super) fn score_every_row(
    served: &Served,
    target: &Target,
    translated: &Tensor,
    gone: &[i64],
    share: Option<&Tensor>,
) -> Tensor {
    // `[queries, rows]`.
    let mut scores = match (&served.codebooks, target.codes) {
        (Some(books), Some(codes)) => Tensor::stack(
            &(0..translated.size()[0])
                .map(|q| books.code_scores(served.comparator, &translated.get(q), codes))
                .collect::<Vec<_>>(),
            0,
        ),
        _ => score_targets(served.comparator, translated, target.candidates),
    };
    // The target bias of a biased type (`train.bias_types`), as the model scores.
    if let Some(b) = target.bias {
        scores += b;
    }
    // Left out before any softmax, so they take no interest's probability.
    if !gone.is_empty() {
        let _ = scores.index_fill_(1, &Tensor::from_slice(gone), f64::NEG_INFINITY);
    }
    match share {
        Some(share) => mixture(&scores, share),
        None => scores.reshape([-1]),
    }
}

/// The best `k` of `scores` (of `scored_rows` when given, else of rows `0..`) as nodes of type
/// `t`; rows at −∞ are never hits.
fn best_of(
    scores: &Tensor,
    scored_rows: Option<&[i64]>,
    t: TypeId,
    k: usize,
) -> Result<Vec<(f32, NodeRef)>, ApiError> {
    let take = (k as i64).min(scores.size()[0]);
    let (values, indices) = scores.f_topk(take, 0, true, true)?;
    let values = Vec::<f32>::try_from(&values.to_kind(Kind::Float))?;
    let indices = Vec::<i64>::try_from(&indices)?;
    Ok(values
        .into_iter()
        .zip(indices)
        .filter(|(score, _)| *score > f32::NEG_INFINITY)
        .map(|(score, i)| {
            let row = scored_rows.map_or(i, |r| r[i as usize]);
            (
                score,
                NodeRef {
                    node_type: t,
                    index: row as u32,
                },
            )
        })
        .collect())
}
