//! One connection to libvirt: opened per job, closed when dropped.
//!
//! It is opened by the job and never shared between jobs.

use std::sync::Once;

use virt::connect::Connect;
use virt::error::ErrorNumber;

use super::LibvirtError;

/// An open connection to the libvirt at one URI.
///
/// Every call blocks (a remote URI means network round trips), so connections are used only
/// on the job's blocking thread, never on the async loop.
pub(crate) struct Connection {
    conn: Connect,
    uri: String,
}

impl Connection {
    /// Connects to `uri` (`qemu:///system`, `test:///default`, `qemu+ssh://host/system` …).
    pub(crate) fn open(uri: &str) -> Result<Connection, LibvirtError> {
        silence_default_error_printing();
        if uri.contains('\0') {
            return Err(LibvirtError::BadSetting { key: "LIBVIRT_URI" });
        }
        match Connect::open(Some(uri)) {
            Ok(conn) => Ok(Connection { conn, uri: uri.to_owned() }),
            Err(source) => Err(open_error(uri, source)),
        }
    }

    /// The URI this connection was opened with, as configured.
    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    /// The underlying `virt` connection.
    pub(crate) fn raw(&self) -> &Connect {
        &self.conn
    }

    /// libvirt's version as `major.minor.micro` (of the daemon side for a remote URI).
    pub(crate) fn version(&self) -> Result<String, LibvirtError> {
        let version = self.conn.get_lib_version().map_err(|source| self.call_error("reading its version", source))?;
        Ok(format!("{}.{}.{}", version / 1_000_000, version / 1000 % 1000, version % 1000))
    }

    /// Whether libvirt at this URI runs on another host, judged from the URI: a host in it
    /// other than the loopback one. Files this daemon writes are not visible there.
    pub(crate) fn is_remote(&self) -> bool {
        uri_is_remote(&self.uri)
    }

    /// A [`LibvirtError::Call`] for a failed call on this connection.
    pub(crate) fn call_error(&self, action: impl Into<String>, source: virt::error::Error) -> LibvirtError {
        LibvirtError::Call { uri: self.uri.clone(), action: action.into(), source }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Err(e) = self.conn.close() {
            tracing::debug!(uri = %self.uri, error = %e, "closing the libvirt connection failed");
        }
    }
}

/// Opens a connection and closes it again: is libvirt at `uri` there, and which version?
pub(crate) fn probe(uri: &str) -> Result<String, LibvirtError> {
    Connection::open(uri)?.version()
}

/// libvirt prints every error to stderr unless told otherwise; ours are reported through
/// [`LibvirtError`] and the logs instead.
fn silence_default_error_printing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

fn open_error(uri: &str, source: virt::error::Error) -> LibvirtError {
    let uri = uri.to_owned();
    match source.code() {
        ErrorNumber::AuthFailed
        | ErrorNumber::AuthCancelled
        | ErrorNumber::AuthUnavailable
        | ErrorNumber::AccessDenied
        | ErrorNumber::OperationDenied => LibvirtError::Denied { uri, source },
        // Permission denied on the socket arrives as a system error.
        ErrorNumber::SystemError if source.message().contains("Permission denied") => {
            LibvirtError::Denied { uri, source }
        }
        _ => LibvirtError::Unreachable { uri, source },
    }
}

fn uri_is_remote(uri: &str) -> bool {
    let Some((_, rest)) = uri.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    !matches!(host, "" | "localhost" | "127.0.0.1" | "::1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uris_are_those_naming_another_host() {
        for local in [
            "qemu:///system",
            "qemu:///session",
            "test:///default",
            "test:///tmp/x/node.xml",
            "qemu+unix:///system?socket=/run/x",
            "qemu+ssh://localhost/system",
            "qemu+tcp://127.0.0.1:16509/system",
            "qemu+tcp://[::1]/system",
            "default",
        ] {
            assert!(!uri_is_remote(local), "{local}");
        }
        for remote in ["qemu+ssh://root@kvm1/system", "qemu+tcp://kvm1:16509/system", "qemu+tls://[fd00::1]/system"] {
            assert!(uri_is_remote(remote), "{remote}");
        }
    }
}
