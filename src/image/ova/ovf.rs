//! The OVF descriptor: a bounded, namespace-aware parse into references, disks (in boot order)
//! and the virtual hardware hyper2kvm cares about.
//!
//! The XML is read with `quick-xml` into a small tree whose size is bounded by the input
//! limit, [`MAX_XML_DEPTH`] and [`MAX_XML_ELEMENTS`]. A `DOCTYPE` is refused (so no entity can
//! expand). Elements and attributes are matched on their local names, because producers use
//! any prefixes; namespace URIs are checked where they decide meaning (the `Envelope` must be
//! an OVF envelope, `vmw:Config` and `vbox:Machine` must be VMware's and VirtualBox's).
//! OVF 0.9 (`<Section xsi:type="ovf:DiskSection_Type">`), 1.x and 2.x are read; OVF 2.x
//! `StorageItem` (`sasd:`) and `EthernetPortItem` (`epasd:`) count like `Item` (`rasd:`).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

use super::Limits;
use crate::image::ImageError;
use crate::mac::MacAddress;
use crate::manifest::{Firmware, Hardware, NicSpec};
use crate::text::shorten;

/// Deepest element nesting accepted in an OVF descriptor (real ones nest about 10 deep).
pub const MAX_XML_DEPTH: usize = 64;

/// Most elements accepted in an OVF descriptor (real ones have a few hundred to a few thousand).
pub const MAX_XML_ELEMENTS: usize = 100_000;

/// Most attributes accepted on one element (real ones have fewer than 20). Also keeps
/// quick-xml's duplicate-attribute check, quadratic in the attribute count, cheap.
pub const MAX_XML_ATTRIBUTES: usize = 256;

/// Most namespace declarations (`xmlns`, `xmlns:p`) accepted in a whole descriptor (real ones
/// have about ten). Bounds the cost of resolving every prefix.
pub const MAX_XML_NAMESPACES: usize = 256;

/// Most network interfaces accepted (vSphere allows 10 per VM, VirtualBox 36).
pub const MAX_NICS: usize = 64;

/// Longest `disk_id` produced, matching the manifest's rule for disk ids.
pub const MAX_DISK_ID_LEN: usize = 64;

/// A parsed OVF descriptor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ovf {
    /// `ovf:version` of the `Envelope` when given (`"1.0"`, `"2.0"`, `"0.9"` …).
    pub version: Option<String>,
    /// `References/File`, in document order.
    pub references: Vec<OvfFile>,
    /// The disks in boot order (the first is the boot disk): the order of the disk `Item`s
    /// (ResourceType 17) that reference them; disks no `Item` references follow in
    /// `DiskSection` order (with a warning when other disks are referenced).
    pub disks: Vec<OvfDisk>,
    /// The virtual hardware of the (one) VirtualSystem.
    pub hardware: OvfHardware,
    /// Oddities that did not stop the parse, phrased for a report.
    pub warnings: Vec<String>,
}

impl Ovf {
    /// The `References/File` a disk's data is in (`None` for a disk with no `ovf:fileRef`,
    /// which the OVF asks to be created empty).
    pub fn file_of(&self, disk: &OvfDisk) -> Option<&OvfFile> {
        let file_ref = disk.file_ref.as_deref()?;
        self.references.iter().find(|f| f.id == file_ref)
    }
}

/// One `References/File`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfFile {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href`, checked by [`check_href`]: relative, without `..`, not a URL.
    pub href: String,
    /// `ovf:size` in bytes, when given.
    pub size: Option<u64>,
    /// `ovf:compression` (`"gzip"` …), when given and not `"identity"`.
    pub compression: Option<String>,
    /// `ovf:chunkSize`, when given: the file is split into `href.000000000`, `href.000000001` …
    pub chunk_size: Option<u64>,
}

/// One `DiskSection/Disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// The sanitised id (see [`sanitize_disk_id`]), unique within the descriptor.
    pub disk_id: String,
    /// `ovf:diskId` as written.
    pub ovf_disk_id: String,
    /// `ovf:fileRef`: the `File` holding the disk, or `None` for a disk to be created empty.
    pub file_ref: Option<String>,
    /// `ovf:capacity` × `ovf:capacityAllocationUnits`, in bytes.
    pub capacity_bytes: u64,
    /// `ovf:format` (e.g. `…/vmdk.html#streamOptimized`), when given.
    pub format: Option<String>,
}

/// The virtual hardware an OVF describes, as far as a KVM domain needs it. Deployment options
/// are resolved: items of the default `Configuration` (or the first one) apply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OvfHardware {
    /// `VirtualSystem/Name`, else `VirtualSystem/@ovf:id`.
    pub name: Option<String>,
    /// VirtualQuantity of the ResourceType 3 item.
    pub cpu: Option<u32>,
    /// VirtualQuantity × AllocationUnits of the ResourceType 4 item, in MiB (rounded up).
    pub memory_mib: Option<u64>,
    /// `vmw:Config firmware=efi|bios`, or VirtualBox `Hardware/Firmware type="EFI…"|"BIOS"`.
    pub firmware: Option<Firmware>,
    /// `vmw:Config uefi.secureBoot.enabled` or `bootOptions.efiSecureBootEnabled` set to true.
    pub secure_boot: bool,
    /// `vmw:osType` of the OperatingSystemSection (e.g. `ubuntu64Guest`), else the
    /// VirtualBox `vbox:OSType` (e.g. `Ubuntu_64`).
    pub os_type: Option<String>,
    /// `OperatingSystemSection/Description` (e.g. `Microsoft Windows Server 2019 (64-bit)`).
    pub os_description: Option<String>,
    /// ResourceType 10 items, in order.
    pub nics: Vec<OvfNic>,
}

/// A network interface (ResourceType 10 item).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OvfNic {
    /// `rasd:Connection`: the network name.
    pub network: Option<String>,
    /// `rasd:Address`; `None` when absent or not a MAC address. VirtualBox puts MACs only in
    /// `vbox:Machine`; they are taken from there when the counts of NICs and enabled adapters
    /// agree.
    pub mac: Option<MacAddress>,
    /// `rasd:ResourceSubType` as written (`E1000`, `VmxNet3`, `VMXNET3 virtio` …).
    pub model: Option<String>,
    /// `rasd:ElementName` (or `rasd:Caption`), e.g. `Network adapter 1`.
    pub name: Option<String>,
}

impl OvfHardware {
    /// The manifest's view of this hardware, to fill what a manifest's `vm` block leaves out:
    /// memory in GiB, `os_version` = the guest type (`os_type`), `os_hint` = the OS
    /// description. Secure boot without a firmware setting implies UEFI.
    pub fn to_manifest_hardware(&self) -> Hardware {
        let firmware = self.firmware.or(if self.secure_boot { Some(Firmware::Uefi) } else { None });
        Hardware {
            cpu: self.cpu,
            mem_gb: self.memory_mib.map(|mib| mib as f64 / 1024.0),
            firmware,
            secureboot: self.secure_boot,
            os_hint: self.os_description.clone(),
            os_version: self.os_type.clone(),
        }
    }

    /// The NICs as the manifest's [`NicSpec`]s (`id` is the NIC's element name).
    pub fn to_nics(&self) -> Vec<NicSpec> {
        self.nics.iter().map(|n| NicSpec { id: n.name.clone(), mac: n.mac, network: n.network.clone() }).collect()
    }
}

/// Checks an untrusted `href` (or `.mf` file name) and returns it normalised (see
/// [`super::tar::normalize`]): refused are empty names, absolute paths (`/x`, `\x`, `C:…`),
/// any `..` component, backslashes, NUL and other control characters (as
/// [`ImageError::Corrupt`]) and URLs such as `http://…` or `file:…` (as
/// [`ImageError::Unsupported`]: remote files are not fetched).
pub fn check_href(href: &str) -> Result<String, ImageError> {
    let refuse = |why: &str| {
        ImageError::Corrupt(format!(
            "the OVF references file {href:?}, which {why}; an OVA may only reference files inside itself",
            href = shorten(href)
        ))
    };
    if href.trim().is_empty() {
        return Err(refuse("is empty"));
    }
    if href.chars().any(|c| c.is_control()) {
        return Err(refuse("contains control characters"));
    }
    if href.contains("://") || href.to_ascii_lowercase().starts_with("file:") {
        return Err(ImageError::Unsupported(format!(
            "the OVF references file {href:?} by URL; hyper2kvm does not download files: put the file in \
             the package and reference it by name",
            href = shorten(href)
        )));
    }
    if href.starts_with('/') {
        return Err(refuse("is an absolute path"));
    }
    if href.contains('\\') {
        return Err(refuse("contains a backslash"));
    }
    let bytes = href.as_bytes();
    if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
        return Err(refuse("is an absolute Windows path"));
    }
    if href.split('/').any(|c| c == "..") {
        return Err(refuse("climbs out of the package with '..'"));
    }
    let normalized = super::tar::normalize(href);
    if normalized.is_empty() {
        return Err(refuse("names no file"));
    }
    Ok(normalized)
}

/// Makes an `ovf:diskId` usable in file names (`V-<id>.qcow2`) and as a manifest disk id:
/// every character outside `[A-Za-z0-9_-]` becomes `_` (one `_` per character, so
/// `vmdisk1` stays `vmdisk1` and `disk.vmdk` becomes `disk_vmdk`), the result is cut to
/// [`MAX_DISK_ID_LEN`] characters, and an empty id becomes `disk<N>` (N = 1-based position in
/// the DiskSection). Uniqueness is handled by the caller (see [`parse_ovf`]).
pub fn sanitize_disk_id(id: &str, position: usize) -> String {
    let mut out: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    out.truncate(MAX_DISK_ID_LEN);
    if out.is_empty() {
        out = format!("disk{position}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A small bounded element tree.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ns {
    Ovf,
    Vmw,
    Vbox,
    Xsi,
    /// CIM settings data (`rasd`, `vssd`, `sasd`, `epasd`) and anything else.
    Other,
    /// No namespace.
    None,
}

fn classify(uri: &[u8]) -> Ns {
    match uri {
        b"http://www.vmware.com/schema/ovf/1/envelope" => Ns::Ovf,
        u if u.starts_with(b"http://schemas.dmtf.org/ovf/envelope/") => Ns::Ovf,
        b"http://www.vmware.com/schema/ovf" => Ns::Vmw,
        b"http://www.virtualbox.org/ovf/machine" => Ns::Vbox,
        b"http://www.w3.org/2001/XMLSchema-instance" => Ns::Xsi,
        _ => Ns::Other,
    }
}

fn ns_of(res: ResolveResult) -> Ns {
    match res {
        ResolveResult::Bound(ns) => classify(ns.0),
        ResolveResult::Unbound => Ns::None,
        ResolveResult::Unknown(_) => Ns::Other,
    }
}

#[derive(Debug)]
struct Attr {
    ns: Ns,
    name: String,
    value: String,
}

#[derive(Debug)]
struct Element {
    ns: Ns,
    /// Local name; for OVF 0.9 `Section`/`Content`, the name its `xsi:type` gives.
    name: String,
    attrs: Vec<Attr>,
    children: Vec<usize>,
    text: String,
}

struct Doc {
    nodes: Vec<Element>,
}

fn xml_error(e: impl std::fmt::Display, pos: u64) -> ImageError {
    ImageError::Corrupt(format!("the OVF descriptor is not well-formed XML ({e}, near byte {pos})"))
}

impl Doc {
    fn parse(xml: &[u8]) -> Result<Doc, ImageError> {
        if xml.starts_with(&[0xff, 0xfe]) || xml.starts_with(&[0xfe, 0xff]) {
            return Err(ImageError::Unsupported(
                "the OVF descriptor is UTF-16; re-export it as UTF-8 (every current exporter writes UTF-8)".into(),
            ));
        }
        let xml = xml.strip_prefix(b"\xef\xbb\xbf").unwrap_or(xml);
        let mut reader = NsReader::from_reader(xml);
        let mut nodes: Vec<Element> = Vec::new();
        let mut stack: Vec<usize> = Vec::new();
        let mut root_done = false;
        let mut namespaces = 0usize;
        loop {
            let event = reader.read_event().map_err(|e| xml_error(e, reader.error_position()))?;
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    if root_done {
                        return Err(xml_error("more than one root element", reader.buffer_position()));
                    }
                    if nodes.len() >= MAX_XML_ELEMENTS {
                        return Err(ImageError::Limit(format!(
                            "the OVF descriptor has more than {MAX_XML_ELEMENTS} elements; refused"
                        )));
                    }
                    if stack.len() >= MAX_XML_DEPTH {
                        return Err(ImageError::Limit(format!(
                            "the OVF descriptor nests elements more than {MAX_XML_DEPTH} deep; refused"
                        )));
                    }
                    let (res, local) = reader.resolve_element(e.name());
                    let ns = ns_of(res);
                    let mut name = String::from_utf8_lossy(local.as_ref()).into_owned();
                    let mut attrs = Vec::new();
                    for (n, attr) in e.attributes().enumerate() {
                        if n >= MAX_XML_ATTRIBUTES {
                            return Err(ImageError::Limit(format!(
                                "an element of the OVF descriptor has more than {MAX_XML_ATTRIBUTES} attributes; refused"
                            )));
                        }
                        let attr = attr.map_err(|err| xml_error(err, reader.buffer_position()))?;
                        let key = attr.key.as_ref();
                        if key == b"xmlns" || key.starts_with(b"xmlns:") {
                            namespaces += 1;
                            if namespaces > MAX_XML_NAMESPACES {
                                return Err(ImageError::Limit(format!(
                                    "the OVF descriptor declares more than {MAX_XML_NAMESPACES} namespaces; refused"
                                )));
                            }
                            continue;
                        }
                        let (res, local) = reader.resolve_attribute(attr.key);
                        let value =
                            attr.unescape_value().map_err(|err| xml_error(err, reader.buffer_position()))?.into_owned();
                        attrs.push(Attr {
                            ns: ns_of(res),
                            name: String::from_utf8_lossy(local.as_ref()).into_owned(),
                            value,
                        });
                    }
                    // OVF 0.9: <Section xsi:type="ovf:DiskSection_Type">, <Content xsi:type="…">.
                    if name == "Section" || name == "Content" {
                        if let Some(t) = attrs.iter().find(|a| a.ns == Ns::Xsi && a.name == "type") {
                            let t = t.value.rsplit(':').next().unwrap_or("");
                            if let Some(section) = t.strip_suffix("_Type") {
                                name = section.to_owned();
                            }
                        }
                    }
                    let id = nodes.len();
                    nodes.push(Element { ns, name, attrs, children: Vec::new(), text: String::new() });
                    if let Some(&parent) = stack.last() {
                        nodes[parent].children.push(id);
                    }
                    if matches!(event, Event::Start(_)) {
                        stack.push(id);
                    } else if stack.is_empty() {
                        root_done = true;
                    }
                }
                Event::End(_) => {
                    stack.pop();
                    if stack.is_empty() {
                        root_done = true;
                    }
                }
                Event::Text(ref t) => {
                    let text = t.unescape().map_err(|e| xml_error(e, reader.buffer_position()))?;
                    if let Some(&top) = stack.last() {
                        nodes[top].text.push_str(&text);
                    }
                }
                Event::CData(ref c) => {
                    let text = std::str::from_utf8(c.as_ref()).map_err(|e| xml_error(e, reader.buffer_position()))?;
                    if let Some(&top) = stack.last() {
                        nodes[top].text.push_str(text);
                    }
                }
                Event::DocType(_) => {
                    return Err(ImageError::Corrupt(
                        "the OVF descriptor has a DOCTYPE (OVF descriptors never do); refused so that no entity \
                         can expand"
                            .into(),
                    ));
                }
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
                Event::Eof => break,
            }
        }
        if !stack.is_empty() {
            return Err(xml_error("the document ends inside an element", reader.buffer_position()));
        }
        if nodes.is_empty() {
            return Err(ImageError::Corrupt("the OVF descriptor holds no XML element (it is empty or not XML)".into()));
        }
        Ok(Doc { nodes })
    }

    fn name(&self, id: usize) -> &str {
        &self.nodes[id].name
    }

    fn children(&self, id: usize) -> impl Iterator<Item = usize> + '_ {
        self.nodes[id].children.iter().copied()
    }

    fn children_named<'a>(&'a self, id: usize, name: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.children(id).filter(move |&c| self.nodes[c].name == name)
    }

    fn child(&self, id: usize, name: &str) -> Option<usize> {
        self.children_named(id, name).next()
    }

    /// Trimmed text of the first child named `name`, if not empty.
    fn child_text(&self, id: usize, name: &str) -> Option<&str> {
        self.children(id).filter(|&c| self.nodes[c].name.eq_ignore_ascii_case(name)).find_map(|c| self.text(c))
    }

    fn text(&self, id: usize) -> Option<&str> {
        Some(self.nodes[id].text.trim()).filter(|t| !t.is_empty())
    }

    /// An attribute by local name, preferring the OVF namespace, then no namespace, then any.
    fn attr(&self, id: usize, name: &str) -> Option<&str> {
        let attrs = &self.nodes[id].attrs;
        let named = || attrs.iter().filter(|a| a.name == name);
        named()
            .find(|a| a.ns == Ns::Ovf)
            .or_else(|| named().find(|a| a.ns == Ns::None))
            .or_else(|| named().next())
            .map(|a| a.value.as_str())
    }

    /// All descendants of `id` (not `id` itself), depth first, in document order.
    fn descendants(&self, id: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack: Vec<usize> = self.nodes[id].children.iter().rev().copied().collect();
        while let Some(n) = stack.pop() {
            out.push(n);
            stack.extend(self.nodes[n].children.iter().rev().copied());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Units and small values.

/// Bytes per unit of a DMTF programmatic unit for bytes: `byte`, `byte * 2^30`, `byte*1024`,
/// `byte * 10^9`, `KiloBytes`/`MegaBytes`/`GigaBytes`/`TeraBytes` (binary, as VMware and
/// VirtualBox mean them), `KB`/`MB`/`GB`/`TB`. `None` for anything else or an overflow.
pub fn parse_byte_units(units: &str) -> Option<u64> {
    let s: String = units.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    let named = match s.as_str() {
        "" | "byte" | "bytes" | "b" => Some(1),
        "kilobyte" | "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabyte" | "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabyte" | "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabyte" | "terabytes" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let rest = s.strip_prefix("byte*").or_else(|| s.strip_prefix("bytes*"))?;
    let mut product = 1u64;
    for factor in rest.split('*') {
        let value = match factor.split_once('^') {
            Some((base, exp)) => {
                let base: u64 = base.parse().ok()?;
                let exp: u32 = exp.parse().ok()?;
                base.checked_pow(exp)?
            }
            None => factor.parse().ok()?,
        };
        product = product.checked_mul(value)?;
    }
    Some(product)
}

fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

fn is_true(text: &str) -> bool {
    matches!(text.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes")
}

// ---------------------------------------------------------------------------------------------
// The descriptor.

/// One hardware item after the deployment option is applied.
#[derive(Debug)]
struct Item {
    node: usize,
    resource_type: Option<u32>,
    /// Whether the item is specific to the chosen configuration (it wins over a generic one).
    specific: bool,
}

/// Parses an OVF descriptor on its own (also for a standalone `.ovf` next to its disk files).
///
/// Over `limits.max_ovf_bytes`, more than `limits.max_disks` disks or `limits.max_members`
/// files, too deep or too many elements: [`ImageError::Limit`]. Malformed XML, a root that is
/// not an OVF `Envelope`, a disk `Item` naming no disk, a `fileRef` naming no file, duplicate
/// ids, an unsafe `href` (see [`check_href`]) or a capacity that overflows:
/// [`ImageError::Corrupt`]. Several virtual systems, a disk backed by a file reference
/// instead of a disk, units it cannot read, a gzip-compressed or chunked disk file:
/// [`ImageError::Unsupported`].
pub fn parse_ovf(xml: &[u8], limits: &Limits) -> Result<Ovf, ImageError> {
    if xml.len() as u64 > limits.max_ovf_bytes {
        return Err(ImageError::Limit(format!(
            "the OVF descriptor is {} bytes, over the {}-byte limit; real descriptors are a few KiB",
            xml.len(),
            limits.max_ovf_bytes
        )));
    }
    let doc = Doc::parse(xml)?;
    let root = 0;
    if doc.name(root) != "Envelope" || doc.nodes[root].ns != Ns::Ovf {
        return Err(ImageError::Corrupt(format!(
            "this is not an OVF descriptor: its root element is <{}>, not an OVF <Envelope>",
            doc.name(root)
        )));
    }
    let mut ovf = Ovf { version: doc.attr(root, "version").map(str::to_owned), ..Ovf::default() };

    parse_references(&doc, root, limits, &mut ovf)?;
    let section_disks = parse_disks(&doc, root, limits, &ovf)?;

    // The virtual system.
    let systems: Vec<usize> = doc.descendants(root).into_iter().filter(|&n| doc.name(n) == "VirtualSystem").collect();
    let system = match systems.as_slice() {
        [] => return Err(ImageError::Corrupt("the OVF descriptor has no VirtualSystem".into())),
        [one] => *one,
        many => {
            return Err(ImageError::Unsupported(format!(
                "the OVF describes {} virtual machines (a VirtualSystemCollection); hyper2kvm converts one VM \
                 per package: export each VM on its own",
                many.len()
            )))
        }
    };
    let items = hardware_items(&doc, root, system);
    ovf.disks = order_disks(&doc, &items, section_disks, &mut ovf.warnings)?;
    ovf.hardware = parse_hardware(&doc, system, &items)?;
    Ok(ovf)
}

fn parse_references(doc: &Doc, root: usize, limits: &Limits, ovf: &mut Ovf) -> Result<(), ImageError> {
    let Some(refs) = doc.child(root, "References") else { return Ok(()) };
    let mut ids = HashSet::new();
    for file in doc.children_named(refs, "File") {
        if ovf.references.len() >= limits.max_members {
            return Err(ImageError::Limit(format!(
                "the OVF references more than {} files; refused",
                limits.max_members
            )));
        }
        let id = doc.attr(file, "id").unwrap_or("").to_owned();
        if id.is_empty() {
            return Err(ImageError::Corrupt("the OVF has a References/File without ovf:id".into()));
        }
        if !ids.insert(id.clone()) {
            return Err(ImageError::Corrupt(format!(
                "the OVF has two References/File with ovf:id {id:?}",
                id = shorten(&id)
            )));
        }
        let href = doc
            .attr(file, "href")
            .ok_or_else(|| ImageError::Corrupt(format!("the OVF's File {id:?} has no ovf:href", id = shorten(&id))))?;
        check_href(href)?;
        let number = |name: &str| -> Result<Option<u64>, ImageError> {
            match doc.attr(file, name) {
                None => Ok(None),
                Some(v) => parse_u64(v).map(Some).ok_or_else(|| {
                    ImageError::Corrupt(format!(
                        "the OVF's File {id:?} has ovf:{name}={v:?}, which is not a number",
                        id = shorten(&id),
                        v = shorten(v)
                    ))
                }),
            }
        };
        let compression = doc
            .attr(file, "compression")
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
            .map(str::to_owned);
        ovf.references.push(OvfFile {
            id: id.clone(),
            href: href.to_owned(),
            size: number("size")?,
            compression,
            chunk_size: number("chunkSize")?,
        });
    }
    Ok(())
}

fn parse_disks(doc: &Doc, root: usize, limits: &Limits, ovf: &Ovf) -> Result<Vec<OvfDisk>, ImageError> {
    let mut disks: Vec<OvfDisk> = Vec::new();
    for section in doc.children_named(root, "DiskSection") {
        for disk in doc.children_named(section, "Disk") {
            if disks.len() >= limits.max_disks {
                return Err(ImageError::Limit(format!(
                    "the OVF defines more than {} disks; refused",
                    limits.max_disks
                )));
            }
            let ovf_disk_id = doc.attr(disk, "diskId").unwrap_or("").to_owned();
            if disks.iter().any(|d| d.ovf_disk_id == ovf_disk_id) {
                return Err(ImageError::Corrupt(format!(
                    "the OVF defines disk {ovf_disk_id:?} twice",
                    ovf_disk_id = shorten(&ovf_disk_id)
                )));
            }
            let file_ref = doc.attr(disk, "fileRef").map(str::to_owned).filter(|f| !f.is_empty());
            if let Some(f) = &file_ref {
                let file = ovf.references.iter().find(|r| &r.id == f).ok_or_else(|| {
                    ImageError::Corrupt(format!(
                        "the OVF's disk {ovf_disk_id:?} has ovf:fileRef {f:?}, but no References/File has that id",
                        ovf_disk_id = shorten(&ovf_disk_id),
                        f = shorten(f)
                    ))
                })?;
                check_disk_file(&ovf_disk_id, file)?;
            }
            let capacity_bytes = disk_capacity(doc, disk, &ovf_disk_id)?;
            let mut disk_id = sanitize_disk_id(&ovf_disk_id, disks.len() + 1);
            if disks.iter().any(|d| d.disk_id == disk_id) {
                disk_id = unique_id(&disk_id, |c| disks.iter().any(|d| d.disk_id == c));
            }
            disks.push(OvfDisk {
                disk_id,
                ovf_disk_id,
                file_ref,
                capacity_bytes,
                format: doc.attr(disk, "format").map(str::to_owned).filter(|f| !f.is_empty()),
            });
        }
    }
    Ok(disks)
}

/// `base_2`, `base_3` … (cut so that it stays within [`MAX_DISK_ID_LEN`]), the first not taken.
fn unique_id(base: &str, taken: impl Fn(&str) -> bool) -> String {
    (2usize..)
        .map(|n| {
            let suffix = format!("_{n}");
            let mut stem = base.to_owned();
            stem.truncate(MAX_DISK_ID_LEN - suffix.len());
            stem + &suffix
        })
        .find(|c| !taken(c))
        .expect("an unbounded range always finds a free id")
}

/// Refuses disk files that cannot be read in place.
fn check_disk_file(disk: &str, file: &OvfFile) -> Result<(), ImageError> {
    if let Some(c) = &file.compression {
        return Err(ImageError::Unsupported(format!(
            "disk {disk:?} (file {:?}) is stored compressed (ovf:compression=\"{c}\"); hyper2kvm reads disks in \
             place and does not decompress them: re-export the OVA without compression, or extract it, \
             decompress the disk and submit the VMDK",
            shorten(&file.href),
            disk = shorten(disk),
            c = shorten(c)
        )));
    }
    if let Some(chunk) = file.chunk_size {
        return Err(ImageError::Unsupported(format!(
            "disk {disk:?} (file {:?}) is split into chunks of {chunk} bytes (ovf:chunkSize); hyper2kvm does not \
             join chunks: re-export the OVA without chunking, or extract it, join the chunks \
             (cat {0}.0* > {0}) and submit the VMDK",
            shorten(&file.href),
            disk = shorten(disk)
        )));
    }
    Ok(())
}

fn disk_capacity(doc: &Doc, disk: usize, id: &str) -> Result<u64, ImageError> {
    let text = doc
        .attr(disk, "capacity")
        .ok_or_else(|| ImageError::Corrupt(format!("the OVF's disk {id:?} has no ovf:capacity", id = shorten(id))))?;
    let value = text.trim();
    if value.starts_with("${") {
        return Err(ImageError::Unsupported(format!(
            "the OVF's disk {id:?} takes its capacity from a property ({value}); set a number in the OVF",
            id = shorten(id),
            value = shorten(value)
        )));
    }
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ImageError::Corrupt(format!(
            "the OVF's disk {id:?} has ovf:capacity={text:?}, not a number",
            id = shorten(id),
            text = shorten(text)
        )));
    }
    let overflow =
        || {
            ImageError::Corrupt(format!(
            "the OVF's disk {id:?} has a capacity that overflows 64 bits (ovf:capacity={text:?}); the descriptor is \
             damaged", id = shorten(id), text = shorten(text)))
        };
    let value: u64 = value.parse().map_err(|_| overflow())?;
    let units = doc.attr(disk, "capacityAllocationUnits").unwrap_or("byte");
    let multiplier = parse_byte_units(units).ok_or_else(|| {
        ImageError::Unsupported(format!(
            "the OVF's disk {id:?} has ovf:capacityAllocationUnits={units:?}, which hyper2kvm cannot read; use \
             a unit such as \"byte * 2^30\"",
            id = shorten(id),
            units = shorten(units)
        ))
    })?;
    value.checked_mul(multiplier).ok_or_else(overflow)
}

/// The items of the first VirtualHardwareSection, with the deployment option applied: items
/// for another configuration are dropped, `ovf:bound` min/max items are dropped, and an item
/// specific to the chosen configuration replaces a generic one with the same InstanceID.
fn hardware_items(doc: &Doc, root: usize, system: usize) -> Vec<Item> {
    let chosen: Option<String> = doc.child(root, "DeploymentOptionSection").and_then(|section| {
        let configs: Vec<usize> = doc.children_named(section, "Configuration").collect();
        configs
            .iter()
            .find(|&&c| doc.attr(c, "default").is_some_and(is_true))
            .or(configs.first())
            .and_then(|&c| doc.attr(c, "id"))
            .map(str::to_owned)
    });
    let Some(section) = doc.child(system, "VirtualHardwareSection") else { return Vec::new() };
    let mut items: Vec<Item> = Vec::new();
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    for node in doc.children(section) {
        if !matches!(doc.name(node), "Item" | "StorageItem" | "EthernetPortItem") {
            continue;
        }
        if doc.attr(node, "bound").is_some_and(|b| !b.trim().eq_ignore_ascii_case("normal")) {
            continue;
        }
        let specific = match doc.attr(node, "configuration") {
            None => false,
            Some(list) if list.trim().is_empty() => false,
            Some(list) => match &chosen {
                Some(c) if list.split_whitespace().any(|x| x == c) => true,
                _ => continue,
            },
        };
        let resource_type = doc.child_text(node, "ResourceType").and_then(|t| t.parse().ok());
        let instance = doc.child_text(node, "InstanceID").map(str::to_owned);
        let item = Item { node, resource_type, specific };
        if let Some(id) = instance {
            match by_instance.entry(id) {
                Entry::Occupied(slot) => {
                    let slot = &mut items[*slot.get()];
                    if item.specific || !slot.specific {
                        *slot = item;
                    }
                    continue;
                }
                Entry::Vacant(slot) => {
                    slot.insert(items.len());
                }
            }
        }
        items.push(item);
    }
    items
}

fn order_disks(
    doc: &Doc,
    items: &[Item],
    section_disks: Vec<OvfDisk>,
    warnings: &mut Vec<String>,
) -> Result<Vec<OvfDisk>, ImageError> {
    let mut slots: Vec<Option<OvfDisk>> = section_disks.into_iter().map(Some).collect();
    let mut ordered = Vec::new();
    for item in items.iter().filter(|i| i.resource_type == Some(17)) {
        let Some(host) = doc.child_text(item.node, "HostResource") else { continue };
        let path = host.strip_prefix("ovf:").unwrap_or(host);
        let path = path.trim_start_matches('/');
        let id = if let Some(id) = path.strip_prefix("disk/") {
            id
        } else if path.starts_with("file/") {
            return Err(ImageError::Unsupported(format!(
                "a disk Item of the OVF is backed by a file ({host}) rather than a DiskSection disk; \
                 hyper2kvm cannot tell its format: extract the file and submit it as a disk",
                host = shorten(host)
            )));
        } else {
            return Err(ImageError::Corrupt(format!(
                "a disk Item of the OVF has HostResource {host:?}, which is not ovf:/disk/<diskId>",
                host = shorten(host)
            )));
        };
        let slot = slots.iter_mut().find(|s| s.as_ref().is_some_and(|d| d.ovf_disk_id == id));
        match slot {
            Some(slot) => ordered.push(slot.take().expect("found a filled slot")),
            None if ordered.iter().any(|d: &OvfDisk| d.ovf_disk_id == id) => {
                return Err(ImageError::Corrupt(format!(
                    "two disk Items of the OVF attach the same disk {id:?}",
                    id = shorten(id)
                )));
            }
            None => {
                return Err(ImageError::Corrupt(format!(
                    "a disk Item of the OVF has HostResource {host:?}, but the DiskSection has no disk {id:?}",
                    host = shorten(host),
                    id = shorten(id)
                )));
            }
        }
    }
    let rest: Vec<OvfDisk> = slots.into_iter().flatten().collect();
    if !ordered.is_empty() {
        for d in &rest {
            warnings.push(format!(
                "disk {:?} is defined but attached by no hardware Item; it is kept, after the attached disks",
                shorten(&d.ovf_disk_id)
            ));
        }
    }
    ordered.extend(rest);
    Ok(ordered)
}

fn parse_hardware(doc: &Doc, system: usize, items: &[Item]) -> Result<OvfHardware, ImageError> {
    let mut hw = OvfHardware {
        name: doc.child_text(system, "Name").or_else(|| doc.attr(system, "id")).map(str::to_owned),
        ..OvfHardware::default()
    };

    if let Some(os) = doc.child(system, "OperatingSystemSection") {
        let vmw = doc.nodes[os].attrs.iter().find(|a| a.name == "osType" && a.ns == Ns::Vmw);
        let any = doc.nodes[os].attrs.iter().find(|a| a.name == "osType");
        hw.os_type = vmw
            .or(any)
            .map(|a| a.value.trim().to_owned())
            .or_else(|| doc.child_text(os, "OSType").map(str::to_owned))
            .filter(|s| !s.is_empty());
        hw.os_description = doc.child_text(os, "Description").map(str::to_owned);
    }

    // CPU and memory: a configuration-specific item wins over a generic one; else the first.
    let mut cpu: Option<(u32, bool)> = None;
    let mut memory: Option<(u64, bool)> = None;
    for item in items {
        let quantity = doc.child_text(item.node, "VirtualQuantity").and_then(parse_u64);
        match (item.resource_type, quantity) {
            (Some(3), Some(n)) => {
                let Ok(n) = u32::try_from(n) else { continue };
                if n > 0 && (cpu.is_none() || (item.specific && !cpu.is_some_and(|c| c.1))) {
                    cpu = Some((n, item.specific));
                }
            }
            (Some(4), Some(n)) => {
                let units = doc.child_text(item.node, "AllocationUnits").unwrap_or("byte * 2^20");
                let Some(multiplier) = parse_byte_units(units) else { continue };
                let bytes = n.checked_mul(multiplier).ok_or_else(|| {
                    ImageError::Corrupt(format!(
                        "the OVF's memory item ({n} × {units:?}) overflows 64 bits; the descriptor is damaged",
                        units = shorten(units)
                    ))
                })?;
                let mib = bytes.div_ceil(1 << 20);
                if mib > 0 && (memory.is_none() || (item.specific && !memory.is_some_and(|m| m.1))) {
                    memory = Some((mib, item.specific));
                }
            }
            _ => {}
        }
    }
    hw.cpu = cpu.map(|c| c.0);
    hw.memory_mib = memory.map(|m| m.0);

    for item in items.iter().filter(|i| i.resource_type == Some(10)) {
        if hw.nics.len() >= MAX_NICS {
            return Err(ImageError::Limit(format!(
                "the OVF describes more than {MAX_NICS} network interfaces; refused"
            )));
        }
        hw.nics.push(OvfNic {
            network: doc.child_text(item.node, "Connection").map(str::to_owned),
            mac: doc.child_text(item.node, "Address").and_then(|t| t.parse().ok()),
            model: doc.child_text(item.node, "ResourceSubType").map(str::to_owned),
            name: doc
                .child_text(item.node, "ElementName")
                .or_else(|| doc.child_text(item.node, "Caption"))
                .map(str::to_owned),
        });
    }

    // VMware settings: vmw:Config / vmw:ExtraConfig of the hardware section (not of an Item).
    let mut config_nodes: Vec<usize> = doc.children(system).collect();
    if let Some(section) = doc.child(system, "VirtualHardwareSection") {
        config_nodes.extend(doc.children(section));
    }
    for node in config_nodes {
        let el = &doc.nodes[node];
        if !(el.name == "Config" || el.name == "ExtraConfig") || el.ns != Ns::Vmw {
            continue;
        }
        let (Some(key), Some(value)) = (doc.attr(node, "key"), doc.attr(node, "value")) else { continue };
        match key.trim().to_ascii_lowercase().as_str() {
            "firmware" => match value.trim().to_ascii_lowercase().as_str() {
                "efi" | "uefi" => hw.firmware = Some(Firmware::Uefi),
                "bios" => hw.firmware = Some(Firmware::Bios),
                _ => {}
            },
            "uefi.secureboot.enabled" | "bootoptions.efisecurebootenabled" if is_true(value) => hw.secure_boot = true,
            _ => {}
        }
    }

    // VirtualBox: vbox:Machine carries the firmware, the OS type and the MACs.
    if let Some(machine) = doc.children(system).find(|&c| doc.name(c) == "Machine" && doc.nodes[c].ns == Ns::Vbox) {
        let inside = doc.descendants(machine);
        if hw.firmware.is_none() {
            let firmware = inside.iter().find(|&&n| doc.name(n) == "Firmware").and_then(|&n| doc.attr(n, "type"));
            hw.firmware = match firmware.map(|t| t.trim().to_ascii_uppercase()) {
                Some(t) if t.starts_with("EFI") => Some(Firmware::Uefi),
                Some(t) if t == "BIOS" => Some(Firmware::Bios),
                _ => None,
            };
        }
        if hw.os_type.is_none() {
            hw.os_type = doc.attr(machine, "OSType").map(str::to_owned).filter(|s| !s.is_empty());
        }
        let adapters: Vec<Option<MacAddress>> = inside
            .iter()
            .filter(|&&n| doc.name(n) == "Adapter" && doc.attr(n, "enabled").is_some_and(is_true))
            .map(|&n| doc.attr(n, "MACAddress").and_then(|t| t.parse().ok()))
            .collect();
        if !hw.nics.is_empty() && adapters.len() == hw.nics.len() && hw.nics.iter().all(|n| n.mac.is_none()) {
            for (nic, mac) in hw.nics.iter_mut().zip(adapters) {
                nic.mac = mac;
            }
        }
    }
    Ok(hw)
}
