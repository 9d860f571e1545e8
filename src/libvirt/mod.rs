//! libvirt: domain XML.
pub mod domain_xml;
