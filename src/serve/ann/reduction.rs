//! How a comparator's score becomes an HNSW graph's metric (see the `ann` module docs): what the
//! graph holds per row and what it is queried with.

use usearch::MetricKind;

use crate::train::Comparator;

/// How a comparator's score becomes the graph's metric (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reduction {
    /// Inner product; `unit`: rows and query scaled to unit length first (cos).
    Inner { unit: bool, biased: bool },
    /// Squared Euclidean distance.
    L2,
}

impl Reduction {
    pub(super) fn of(comparator: Comparator, biased: bool) -> Option<Reduction> {
        match comparator {
            Comparator::Dot => Some(Reduction::Inner {
                unit: false,
                biased,
            }),
            Comparator::Cos => Some(Reduction::Inner { unit: true, biased }),
            Comparator::L2 if !biased => Some(Reduction::L2),
            Comparator::L2 | Comparator::L1 => None,
        }
    }

    pub(super) fn metric(self) -> MetricKind {
        match self {
            Reduction::Inner { .. } => MetricKind::IP,
            Reduction::L2 => MetricKind::L2sq,
        }
    }

    pub(super) fn dims(self, dim: usize) -> usize {
        match self {
            Reduction::Inner { biased: true, .. } => dim + 1,
            _ => dim,
        }
    }

    /// A target row (with its bias) as the graph holds it.
    pub(super) fn item(self, row: &[f32], bias: Option<f32>, out: &mut Vec<f32>) {
        out.clear();
        match self {
            Reduction::Inner { unit, biased } => {
                push_scaled(row, unit, out);
                if biased {
                    out.push(bias.unwrap_or(0.0));
                }
            }
            Reduction::L2 => out.extend_from_slice(row),
        }
    }

    /// The translated source as the graph is searched with.
    pub(super) fn query(self, translated: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(translated.len() + 1);
        match self {
            Reduction::Inner { unit, biased } => {
                push_scaled(translated, unit, &mut out);
                if biased {
                    out.push(1.0);
                }
            }
            Reduction::L2 => out.extend_from_slice(translated),
        }
        out
    }
}

/// `row` appended to `out`, divided by its length when `unit` (as the cos score does: a zero
/// row stays zero).
pub(super) fn push_scaled(row: &[f32], unit: bool, out: &mut Vec<f32>) {
    let scale = if unit {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            1.0 / norm
        } else {
            1.0
        }
    } else {
        1.0
    };
    out.extend(row.iter().map(|x| x * scale));
}
