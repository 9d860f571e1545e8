//! The Worker Job Protocol v1: `hyper2kvm run JOB.json` runs one operation (`inspect`,
//! `convert`) described by a job spec ([`spec`]), keeps its state machine in a file beside its
//! output ([`state`]), and ends with a result file and a documented exit status ([`run`]).
//! docs/WORKER.md is the reference.

pub mod run;
pub mod spec;
pub mod state;
