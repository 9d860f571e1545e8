//! The Worker Job Protocol v1: `hyper2kvm run JOB.json` runs one operation (`inspect`,
//! `convert`) described by a job spec ([`spec`]), keeps its state machine in a file beside its
//! output ([`state`]), and ends with a result file and a documented exit status ([`run`]).
//! docs/WORKER.md is the reference.
//!
//! A `run` job has no claim and no queue: it must not touch WATCH_DIR, and everything it
//! writes stays in its spec's output path.

pub mod run;
pub mod spec;
pub mod state;
