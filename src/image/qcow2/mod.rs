//! qcow2 (v3) written in one forward pass.
