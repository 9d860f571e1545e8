//! Disk image formats read natively. For now: structural checks of VMDK sparse extents, which
//! `qemu-img` does not do (it reads grains past the end of a truncated file as zeros and
//! succeeds). The native conversion engine grows here.

pub mod vmdk;
