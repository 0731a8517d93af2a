//! `/v1/embeddings/{type}/{id}` and `/v1/neighbors/{type}/{id}`: rows of the served (committed)
//! version, and exact top-k targets by the model's score.

use actix_web::{get, web};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::publish::PublishedView;
use crate::schema::TypeId;
use crate::serve::{ApiError, HttpState, DEFAULT_K, MAX_K};
use crate::store::{GraphStore, NodeRef};
use crate::train::{history_sum, history_targets, history_weights, score_targets, translate};

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

fn resolve_type(store: &GraphStore, name: &str) -> Result<TypeId, ApiError> {
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
    let index = store
        .node_index(node_type, id)?
        .ok_or_else(|| ApiError::UnknownNode(key.to_owned()))?;
    let node = NodeRef { node_type, index };
    if store.is_erased(node) {
        return Err(ApiError::Erased(key.to_owned()));
    }
    Ok(node)
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
    pub version: u64,
    pub epoch: u64,
    /// Event time (ms) of the newest event that touched the row, when the version records it.
    pub ts: Option<i64>,
    pub vector: Vec<f32>,
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
    let node = resolve_node(&state.store, node_type, id, &key)?;
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
        })
    })
}

#[derive(Debug, Deserialize)]
pub struct NeighborsQuery {
    pub rel: Option<String>,
    /// A string so that a bad value gets our error naming `k`, not the extractor's.
    pub k: Option<String>,
}

/// `GET /v1/neighbors/{type}/{id}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NeighborsResponse {
    pub node: String,
    pub rel: String,
    pub version: u64,
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

#[get("/v1/neighbors/{type}/{id:.+}")]
pub(super) async fn neighbor_ranking(
    state: web::Data<HttpState>,
    path: web::Path<(String, String)>,
    query: web::Query<NeighborsQuery>,
) -> Result<web::Json<NeighborsResponse>, ApiError> {
    let (type_name, id) = path.into_inner();
    let NeighborsQuery { rel, k } = query.into_inner();
    let k = parse_k(k.as_deref())?;
    let rel = rel.filter(|r| !r.is_empty()).ok_or(ApiError::BadParam {
        param: "rel",
        problem: "required: the relation to rank targets by".into(),
    })?;
    let out = web::block(move || rank_neighbors(&state, &type_name, &id, &rel, k)).await??;
    Ok(web::Json(out))
}

/// The `k` best targets of `rel` for the node, scored by the served version with its comparator
/// against every row of every target type of `rel` (exact; the node itself and its known
/// targets included).
fn rank_neighbors(
    state: &HttpState,
    type_name: &str,
    id: &str,
    rel: &str,
    k: usize,
) -> Result<NeighborsResponse, ApiError> {
    let store = &state.store;
    let schema = store.stored_schema();
    let key = format!("{type_name}:{id}");
    let node_type = resolve_type(store, type_name)?;
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
    let node = resolve_node(store, node_type, id, &key)?;
    let (version, ranked) = state.serving.with(|view| {
        let view = served(view)?;
        let src = node_row(view, node, &key)?;
        let relation =
            row(&view.relations, rel_id as i64).ok_or_else(|| ApiError::RelationNotServed {
                rel: rel.to_owned(),
                version: view.version,
            })?;
        // A history-type source is its row plus the sum of its recent targets' served rows, per
        // target type, as the model scores it.
        let mut sources = Vec::with_capacity(dst_types.len());
        for &t in &dst_types {
            let rows_of = view.tables.get(t as usize);
            let recent = match (&state.train, rows_of) {
                (Some(p), Some(table)) => {
                    let n = rows(table);
                    let mut h = history_targets(p, store, node, t as usize, u64::MAX)?;
                    h.retain(|&(i, _)| i < n);
                    history_sum(table, &history_weights(&h, None))
                }
                _ => None,
            };
            sources.push(match recent {
                Some(sum) => &src + sum,
                None => src.shallow_clone(),
            });
        }
        let erased = store.erasures_since(0);
        let ranked =
            tch::no_grad(|| top_targets(view, &sources, &relation, &dst_types, &erased, k))?;
        Ok::<_, ApiError>((view.version, ranked))
    })?;
    let mut neighbors = Vec::with_capacity(ranked.len());
    for (score, target) in ranked {
        let id = store.node_id(target)?.ok_or(ApiError::MissingId {
            node_type: target.node_type,
            index: target.index,
        })?;
        let type_name = &schema.node_types[target.node_type as usize];
        neighbors.push(ScoredNode {
            node: format!("{type_name}:{id}"),
            score,
        });
    }
    Ok(NeighborsResponse {
        node: key,
        rel: rel.to_owned(),
        version,
        neighbors,
    })
}

/// Best `k` of each target type (libtorch's top-k; `sources`: the source's vector for each),
/// then merged: a best `k` overall is within the union. Ties go to the lower type id, then the
/// lower row. `erased` nodes are never candidates.
fn top_targets(
    view: &PublishedView,
    sources: &[Tensor],
    relation: &Tensor,
    dst_types: &[TypeId],
    erased: &[NodeRef],
    k: usize,
) -> Result<Vec<(f32, NodeRef)>, ApiError> {
    let mut hits = Vec::new();
    for (&t, src) in dst_types.iter().zip(sources) {
        let translated = translate(&src.unsqueeze(0), &relation.unsqueeze(0));
        let Some(candidates) = view.tables.get(t as usize).filter(|c| rows(c) > 0) else {
            continue;
        };
        let mut scores = score_targets(view.comparator, &translated, candidates).reshape([-1]);
        // The target bias of a biased type (`train.bias_types`), as the model scores.
        if let Some(Some(b)) = view.biases.get(t as usize) {
            scores += b;
        }
        let gone: Vec<i64> = erased
            .iter()
            .filter(|n| n.node_type == t && i64::from(n.index) < rows(candidates))
            .map(|n| i64::from(n.index))
            .collect();
        if !gone.is_empty() {
            let _ = scores.index_fill_(0, &Tensor::from_slice(&gone), f64::NEG_INFINITY);
        }
        let take = (k as i64).min(rows(candidates));
        let (values, indices) = scores.f_topk(take, 0, true, true)?;
        let values = Vec::<f32>::try_from(&values.to_kind(Kind::Float))?;
        let indices = Vec::<i64>::try_from(&indices)?;
        hits.extend(
            values
                .into_iter()
                .zip(indices)
                .filter(|(score, _)| *score > f32::NEG_INFINITY)
                .map(|(score, i)| {
                    (
                        score,
                        NodeRef {
                            node_type: t,
                            index: i as u32,
                        },
                    )
                }),
        );
    }
    hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    hits.truncate(k);
    Ok(hits)
}
