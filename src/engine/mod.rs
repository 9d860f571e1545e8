//! The native conversion engine.
