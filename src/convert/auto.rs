//! The converter the daemon and the one-shot commands use: [`Native`] for the formats read
//! in Rust (VMDK, OVA, raw), [`QemuImg`] for the rest (vhd, vhdx, vdi, qcow2 input).
//!
//! It only chooses; it reads and writes nothing itself.

use std::path::Path;

use super::native::{reads_natively, Native};
use super::qemu_img::QemuImg;
use super::{ConversionRequest, ConvertError, Converter, JobControl};
use crate::image::SourceInfo;
use crate::manifest::SourceFormat;
use crate::source::SourceRoots;

/// Native where possible, qemu-img otherwise.
#[derive(Debug, Default, Clone)]
pub struct Auto {
    /// Converts the formats read natively (raw, VMDK, OVA).
    pub native: Native,
    /// Converts every other format (vhd, vhdx, vdi, qcow2).
    pub qemu_img: QemuImg,
}

impl Auto {
    fn pick(&self, format: SourceFormat) -> &dyn Converter {
        if reads_natively(format) {
            &self.native
        } else {
            &self.qemu_img
        }
    }
}

impl Converter for Auto {
    fn name(&self) -> &'static str {
        "native+qemu-img"
    }

    fn reads_natively(&self, format: SourceFormat) -> bool {
        reads_natively(format)
    }

    fn inspect(
        &self,
        source: &Path,
        format: SourceFormat,
        roots: &SourceRoots,
        control: &JobControl,
    ) -> Result<SourceInfo, ConvertError> {
        self.pick(format).inspect(source, format, roots, control)
    }

    fn convert(&self, request: &ConversionRequest<'_>, control: &JobControl) -> Result<(), ConvertError> {
        self.pick(request.format).convert(request, control)
    }
}
