//! The stream-evaluation protocol's arithmetic (docs/architecture.md §4), pure: the realistic rank of one
//! event's target among all candidates with the user's earlier targets filtered, and the
//! accounting of ranks into slices (per relation, any rating, history-length buckets, new
//! users' 2nd–5th ratings) and phases (the first 20% of the stream, where settings are chosen,
//! and the last 80%, where they are reported). Every method (the model and the baselines) goes
//! through the same functions, so their `ranked` counts are equal by construction.

use std::collections::BTreeMap;

use serde::Serialize;

/// Realistic rank of candidate `truth` by `keys` (higher is better), with the candidates in
/// `filtered` removed (`truth` itself is never removed; duplicates in `filtered` count once).
/// Ties count realistically: half of the tied other candidates are ahead, so a constant scorer
/// gets the middle rank `(n + 1) / 2`.
pub(crate) fn realistic_rank<K: PartialOrd>(keys: &[K], truth: usize, filtered: &[usize]) -> f64 {
    let t = &keys[truth];
    let (mut higher, mut tied) = (0usize, 0usize);
    for (j, k) in keys.iter().enumerate() {
        if j == truth {
            continue;
        }
        if k > t {
            higher += 1;
        } else if k == t {
            tied += 1;
        }
    }
    let mut seen = Vec::with_capacity(filtered.len());
    for &f in filtered {
        if f == truth || f >= keys.len() || seen.contains(&f) {
            continue;
        }
        seen.push(f);
        let k = &keys[f];
        if k > t {
            higher -= 1;
        } else if k == t {
            tied -= 1;
        }
    }
    1.0 + higher as f64 + tied as f64 / 2.0
}

/// Hits@10 and @50 (with one held-out target per event, Recall@10 and @50 of the candidates),
/// MRR and the count of one method on one slice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Figures {
    #[serde(rename = "hits@10")]
    pub hits10: f64,
    #[serde(rename = "hits@50")]
    pub hits50: f64,
    pub mrr: f64,
    pub ranked: usize,
}

/// Running sums behind [`Figures`].
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    hits10: f64,
    hits50: f64,
    reciprocal: f64,
    n: usize,
}

impl Tally {
    pub(super) fn add(&mut self, rank: f64) {
        self.reciprocal += 1.0 / rank;
        if rank <= 10.0 {
            self.hits10 += 1.0;
        }
        if rank <= 50.0 {
            self.hits50 += 1.0;
        }
        self.n += 1;
    }

    pub(super) fn figures(&self) -> Figures {
        let n = self.n.max(1) as f64;
        Figures {
            hits10: self.hits10 / n,
            hits50: self.hits50 / n,
            mrr: self.reciprocal / n,
            ranked: self.n,
        }
    }
}

/// The history bucket of an event whose user has `earlier` earlier ratings (`None` for 0: such
/// events are not ranked).
pub(super) fn history_bucket(earlier: usize) -> Option<&'static str> {
    match earlier {
        0 => None,
        1..=5 => Some("1-5"),
        6..=20 => Some("6-20"),
        21..=50 => Some("21-50"),
        _ => Some(">50"),
    }
}

/// The buckets in reporting order.
pub(crate) const HISTORY_BUCKETS: [&str; 4] = ["1-5", "6-20", "21-50", ">50"];

/// Where an event falls in the stream: the first `tune_fraction` of the rating stream (settings
/// are chosen there) or the rest (figures are reported there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    Tune,
    Report,
}

impl Phase {
    /// The phase of the `index`-th rating (0-based) of a stream of `total`.
    pub(crate) fn of(index: usize, total: usize, tune_fraction: f64) -> Phase {
        if (index as f64) < tune_fraction * total as f64 {
            Phase::Tune
        } else {
            Phase::Report
        }
    }
}

/// One ranked event, as the accounting sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RankedEvent<'a> {
    pub relation: &'a str,
    /// The user's earlier ratings (either relation), at least 1.
    pub earlier: usize,
    pub phase: Phase,
}

/// The slice of new users' 2nd–5th ratings (over the whole stream).
pub(crate) const NEW_USERS: &str = "new_users_2_5";
/// The slice of every rating event.
pub(crate) const ANY: &str = "any";

/// Ranks per phase, slice and method. Slices: each relation's name, [`ANY`], and each history
/// bucket (`by_history:<bucket>`); plus [`NEW_USERS`], which ignores the phase.
#[derive(Debug, Default)]
pub(crate) struct Accounting {
    tallies: BTreeMap<(Option<Phase>, String, String), Tally>,
}

impl Accounting {
    /// Add `ranks[i]` of method `methods[i]` for `event`.
    pub(crate) fn record(&mut self, event: RankedEvent<'_>, methods: &[&str], ranks: &[f64]) {
        let mut slices = vec![(Some(event.phase), event.relation.to_owned())];
        slices.push((Some(event.phase), ANY.to_owned()));
        if let Some(b) = history_bucket(event.earlier) {
            slices.push((Some(event.phase), format!("by_history:{b}")));
        }
        if (1..=4).contains(&event.earlier) {
            slices.push((None, NEW_USERS.to_owned()));
        }
        for (phase, slice) in slices {
            for (&m, &r) in methods.iter().zip(ranks) {
                self.tallies
                    .entry((phase, slice.clone(), m.to_owned()))
                    .or_default()
                    .add(r);
            }
        }
    }

    /// The figures of `method` on `slice` in `phase` (`None`: over the whole stream, the
    /// phase-free [`NEW_USERS`] slice); zero figures when nothing was ranked.
    pub(crate) fn figures(&self, phase: Option<Phase>, slice: &str, method: &str) -> Figures {
        self.tallies
            .get(&(phase, slice.to_owned(), method.to_owned()))
            .map(Tally::figures)
            .unwrap_or_default()
    }

    /// `{method: figures}` for `slice`.
    pub(crate) fn slice(
        &self,
        phase: Option<Phase>,
        slice: &str,
        methods: &[&str],
    ) -> BTreeMap<String, Figures> {
        methods
            .iter()
            .map(|&m| (m.to_owned(), self.figures(phase, slice, m)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_realistic_ranks() {
        // Scores 5 4 4 4 1: the truth at index 2 has one higher and two tied others.
        let s = [5.0, 4.0, 4.0, 4.0, 1.0];
        assert_eq!(realistic_rank(&s, 2, &[]), 1.0 + 1.0 + 1.0);
        // Filtering the higher one and a tied one: rank 1 + 0 + 0.5.
        assert_eq!(realistic_rank(&s, 2, &[0, 3]), 1.5);
        // The truth itself is never filtered; duplicates and out-of-range count once / not.
        assert_eq!(realistic_rank(&s, 2, &[2, 0, 0, 99]), 1.0 + 1.0);
        // A constant scorer: the middle rank.
        assert_eq!(realistic_rank(&[0.0; 9], 4, &[]), 5.0);
        // Lexicographic keys: popularity breaks a tie in the first component.
        let k = [(1.0, 3), (1.0, 5), (0.0, 9)];
        assert_eq!(realistic_rank(&k, 0, &[]), 2.0);
        assert_eq!(realistic_rank(&k, 2, &[]), 3.0);
    }

    #[test]
    fn tally_golden_figures() {
        let mut t = Tally::default();
        for r in [1.0, 2.0, 10.0, 10.5, 40.0, 50.5] {
            t.add(r);
        }
        let f = t.figures();
        assert_eq!(f.ranked, 6);
        assert!((f.hits10 - 0.5).abs() < 1e-12);
        assert!((f.hits50 - 5.0 / 6.0).abs() < 1e-12);
        let mrr = (1.0 + 0.5 + 0.1 + 1.0 / 10.5 + 0.025 + 1.0 / 50.5) / 6.0;
        assert!((f.mrr - mrr).abs() < 1e-12);
        assert_eq!(Tally::default().figures().ranked, 0);
    }

    #[test]
    fn buckets_and_phases() {
        let got: Vec<_> = [0, 1, 5, 6, 20, 21, 50, 51, 500]
            .map(history_bucket)
            .into_iter()
            .collect();
        assert_eq!(
            got,
            vec![
                None,
                Some("1-5"),
                Some("1-5"),
                Some("6-20"),
                Some("6-20"),
                Some("21-50"),
                Some("21-50"),
                Some(">50"),
                Some(">50")
            ]
        );
        assert_eq!(Phase::of(19, 100, 0.2), Phase::Tune);
        assert_eq!(Phase::of(20, 100, 0.2), Phase::Report);
    }

    #[test]
    fn accounting_fills_every_slice_once_per_method() {
        let mut a = Accounting::default();
        let methods = ["model", "popularity"];
        let ev = |relation, earlier, phase| RankedEvent {
            relation,
            earlier,
            phase,
        };
        a.record(ev("rated_high", 2, Phase::Tune), &methods, &[1.0, 20.0]);
        a.record(ev("rated_high", 3, Phase::Report), &methods, &[4.0, 2.0]);
        a.record(ev("rated_low", 60, Phase::Report), &methods, &[100.0, 5.0]);
        let f = |p, s, m| a.figures(p, s, m);
        assert_eq!(
            f(Some(Phase::Report), "rated_high", "model"),
            Figures {
                hits10: 1.0,
                hits50: 1.0,
                mrr: 0.25,
                ranked: 1
            }
        );
        assert_eq!(f(Some(Phase::Report), ANY, "popularity").ranked, 2);
        assert!((f(Some(Phase::Report), ANY, "popularity").mrr - 0.35).abs() < 1e-12);
        assert_eq!(f(Some(Phase::Report), "by_history:>50", "model").ranked, 1);
        assert_eq!(f(Some(Phase::Report), "by_history:1-5", "model").ranked, 1);
        // New users' slice spans both phases; the user with 60 earlier ratings is not in it.
        let new = f(None, NEW_USERS, "model");
        assert_eq!((new.ranked, new.hits10), (2, 1.0));
        assert_eq!(f(Some(Phase::Tune), "rated_low", "model").ranked, 0);
        assert_eq!(a.slice(None, NEW_USERS, &methods).len(), 2);
    }
}
