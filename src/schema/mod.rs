//! The network's schema and the engagement-event contract (docs/architecture.md §2, §3).
//!
//! [`Schema`] resolves node-type and relation names to the small integer ids used everywhere
//! else; [`decode_event`] turns one Kafka payload into a validated [`Event`] or an
//! [`InvalidEvent`] whose [`InvalidReason`] is the label used in metrics and DLQ headers.
//! Everything here is pure: no I/O, no clocks (the fallback timestamp is passed in).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Dense id of a node type (its position in `schema.node_types`).
pub type TypeId = u16;
/// Dense id of a relation (its position in `schema.relations`).
pub type RelId = u16;

/// One relation as written in the config: a name and the node types it may connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationDef {
    pub name: String,
    /// Allowed source type(s): a single name or a list.
    pub src: OneOrMany,
    /// Allowed target type(s): a single name or a list.
    pub dst: OneOrMany,
}

/// A type name or a list of them (`src = "user"` or `src = ["movie", "entity"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn names(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// The schema section of the config, before resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaConfig {
    pub node_types: Vec<String>,
    pub relations: Vec<RelationDef>,
}

/// A relation with its endpoint types resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub name: String,
    pub src_types: Vec<TypeId>,
    pub dst_types: Vec<TypeId>,
}

/// A resolved schema: names ↔ ids for node types and relations.
#[derive(Debug, Clone)]
pub struct Schema {
    node_types: Vec<String>,
    relations: Vec<Relation>,
    type_ids: HashMap<String, TypeId>,
    rel_ids: HashMap<String, RelId>,
}

/// Why a schema section cannot be used; `key` is the config key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct SchemaError {
    pub key: String,
    pub problem: String,
}

impl Schema {
    /// Resolve and validate a schema section. Errors name the offending config key.
    pub fn new(cfg: &SchemaConfig) -> Result<Self, SchemaError> {
        let err = |key: String, problem: String| SchemaError { key, problem };
        if cfg.node_types.is_empty() {
            return Err(err(
                "schema.node_types".into(),
                "must list at least one node type".into(),
            ));
        }
        if cfg.node_types.len() > TypeId::MAX as usize {
            return Err(err(
                "schema.node_types".into(),
                "too many node types".into(),
            ));
        }
        let mut type_ids = HashMap::new();
        for (i, name) in cfg.node_types.iter().enumerate() {
            let key = format!("schema.node_types[{i}]");
            if !is_valid_name(name) || name.contains(':') {
                return Err(err(
                    key,
                    format!("{name:?} is not a valid type name (1-64 chars, no ':' or whitespace)"),
                ));
            }
            if type_ids.insert(name.clone(), i as TypeId).is_some() {
                return Err(err(key, format!("node type {name:?} is listed twice")));
            }
        }
        if cfg.relations.is_empty() {
            return Err(err(
                "schema.relations".into(),
                "must list at least one relation".into(),
            ));
        }
        if cfg.relations.len() > RelId::MAX as usize {
            return Err(err("schema.relations".into(), "too many relations".into()));
        }
        let mut rel_ids = HashMap::new();
        let mut relations = Vec::with_capacity(cfg.relations.len());
        for (i, rel) in cfg.relations.iter().enumerate() {
            let key = format!("schema.relations[{i}]");
            if !is_valid_name(&rel.name) {
                return Err(err(
                    format!("{key}.name"),
                    format!(
                        "{:?} is not a valid relation name (1-64 chars, no whitespace)",
                        rel.name
                    ),
                ));
            }
            if rel_ids.insert(rel.name.clone(), i as RelId).is_some() {
                return Err(err(
                    format!("{key}.name"),
                    format!("relation {:?} is listed twice", rel.name),
                ));
            }
            let resolve = |side: &str, names: &OneOrMany| -> Result<Vec<TypeId>, SchemaError> {
                if names.names().is_empty() {
                    return Err(err(
                        format!("{key}.{side}"),
                        "must name at least one node type".into(),
                    ));
                }
                names
                    .names()
                    .iter()
                    .map(|n| {
                        type_ids.get(n).copied().ok_or_else(|| {
                            err(
                                format!("{key}.{side}"),
                                format!("unknown node type {n:?} (not in schema.node_types)"),
                            )
                        })
                    })
                    .collect()
            };
            relations.push(Relation {
                name: rel.name.clone(),
                src_types: resolve("src", &rel.src)?,
                dst_types: resolve("dst", &rel.dst)?,
            });
        }
        Ok(Schema {
            node_types: cfg.node_types.clone(),
            relations,
            type_ids,
            rel_ids,
        })
    }

    pub fn node_types(&self) -> &[String] {
        &self.node_types
    }

    pub fn relations(&self) -> &[Relation] {
        &self.relations
    }

    pub fn type_id(&self, name: &str) -> Option<TypeId> {
        self.type_ids.get(name).copied()
    }

    pub fn rel_id(&self, name: &str) -> Option<RelId> {
        self.rel_ids.get(name).copied()
    }

    pub fn type_name(&self, id: TypeId) -> &str {
        &self.node_types[id as usize]
    }

    pub fn relation(&self, id: RelId) -> &Relation {
        &self.relations[id as usize]
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

mod decode;

pub(crate) use decode::InvalidEvent;
pub use decode::{decode_event, DecodeLimits, Event, EventOp, InvalidReason, NodeKey};

#[cfg(test)]
mod tests;
