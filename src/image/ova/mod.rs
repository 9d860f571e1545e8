//! OVA archives read in place: the tar index, the `.mf` checksums and the OVF descriptor.
