//! twhin-lab: measurements of twhin-stream on fixed datasets, whose tables
//! `docs/measurements.md` quotes. It uses the product only through its public API.
//!
//! The rule that puts a command here rather than in `twhin-stream`: the product holds what an
//! operator runs, or a user runs on their own graph or stream (`train`/`eval`, `stream-eval` with
//! its baselines, which the daemon computes live too); the lab holds experiments that measure the
//! product on MovieLens-100k or the synthetic stream to fill a table, and the helpers only they
//! use.
//!
//! | module | measures |
//! |---|---|
//! | [`stability`] | a classifier fitted on version 1, frozen, scored on later versions, drift control on and off |
//! | [`retrain`] | a full retrain published raw, rotated by Procrustes, and warm-started with the pull |
//! | [`pq_tradeoff`] | what product quantization costs a version's consumers (bytes, error, retrieval, classifier) |
//! | [`downstream`] | a recommender's classifier with and without a version's embeddings |
//! | [`genre`] | a movie's genres from a version trained without the genre relations |
//! | [`exchange`] | the gradient exchange of two trainers on one store, without Kafka or delay, beside one trainer and two apart |
//! | [`warm_start`] | prequential quality on new nodes' first edges, warm start against random rows |
//! | [`classifier`] | the plain logistic regression the measurements fit, and its accuracies |
//! | [`movielens`] | MovieLens-100k streamed through the daemon's trainer, and its labelled nodes |

pub mod classifier;
pub mod downstream;
pub mod exchange;
pub mod genre;
pub mod movielens;
pub mod pq_tradeoff;
pub mod retrain;
pub mod stability;
pub mod warm_start;
